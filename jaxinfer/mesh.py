"""Device mesh with the named axes data, context, tensor and expert.

This module avoids importing JAX at module level, so the CLI can size the simulated CPU
device count (an XLA flag read once at start-up) from the mesh before JAX initialises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

MESH_AXES = ("data", "context", "tensor", "expert")

# Size of an axis that takes every device the other axes leave.
FILL = -1

# Devices simulated on a CPU-only host when the mesh leaves an axis at FILL.
DEFAULT_CPU_DEVICES = 8

# Larger meshes are not simulated: XLA takes minutes to create thousands of CPU devices, and
# such meshes are meant for accelerator pods, where the flag has no effect.
MAX_SIMULATED_DEVICES = 512


class MeshError(ValueError):
    """A mesh that is malformed or does not fit the devices present."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parse "data=2,tensor=4" into axis sizes; axes left out are not set."""
    shape: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if name in shape:
            raise MeshError(f"mesh axis {name} is given twice in {spec!r}; give each axis once")
        if not sep or name not in MESH_AXES:
            raise MeshError(
                f"invalid mesh entry {item!r} in {spec!r}; expected NAME=SIZE with NAME one of "
                f"{', '.join(MESH_AXES)}, e.g. 'data=2,tensor=4'"
            )
        try:
            shape[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name} has size {value!r}; expected an integer") from None
    return shape


def check_mesh_shape(shape: Mapping[str, Any], where: str) -> dict[str, int]:
    """Validate axis names and sizes (positive, or -1 for one axis); fill in missing axes as 1."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"{where}: unknown mesh axis {unknown[0]!r}; mesh axes are {', '.join(MESH_AXES)}")
    full = {axis: shape.get(axis, 1) for axis in MESH_AXES}
    for axis, size in full.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != FILL):
            raise MeshError(
                f"{where}: mesh axis {axis} = {size!r} is invalid; use a positive integer, "
                f"or {FILL} for all devices the other axes leave"
            )
    filled = [axis for axis, size in full.items() if size == FILL]
    if len(filled) > 1:
        raise MeshError(f"{where}: only one mesh axis may be {FILL}, got {', '.join(filled)}")
    return full


def device_count_for(shape: Mapping[str, int]) -> int:
    """Return how many devices a mesh needs (DEFAULT_CPU_DEVICES when one axis is FILL)."""
    if FILL in shape.values():
        return DEFAULT_CPU_DEVICES
    return math.prod(shape.values())


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int, where: str) -> dict[str, int]:
    """Fill the FILL axis and check that the mesh uses exactly `num_devices` devices."""
    full = check_mesh_shape(shape, where)
    fixed = math.prod(size for size in full.values() if size != FILL)
    fill_axes = [axis for axis, size in full.items() if size == FILL]
    if fill_axes:
        if num_devices % fixed:
            raise MeshError(
                f"{where}: the fixed mesh axes use {fixed} devices, which does not divide the "
                f"{num_devices} devices present, so {fill_axes[0]} = {FILL} cannot be filled"
            )
        full[fill_axes[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"{where}: mesh {format_mesh(full)} uses {fixed} devices but {num_devices} are present; "
            f"make the axis sizes multiply to {num_devices} (e.g. --mesh tensor={num_devices}), "
            f"or set one axis to {FILL} to take the remaining devices"
        )
    return full


def format_mesh(shape: Mapping[str, int]) -> str:
    return ",".join(f"{axis}={shape[axis]}" for axis in MESH_AXES if axis in shape)


def ensure_host_devices(count: int) -> None:
    """Ask XLA for `count` simulated CPU devices; call before JAX initialises its backends.

    The flag only affects the CPU backend, so it is harmless on GPU and TPU hosts. An existing
    device-count flag in XLA_FLAGS wins, and counts above MAX_SIMULATED_DEVICES are not
    simulated (a CPU-only host then reports the mesh's mismatch with its devices).
    """
    if count > MAX_SIMULATED_DEVICES:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None, where: str = "mesh"):
    """Build a `jax.sharding.Mesh` over `devices` (default: all devices of the default backend).

    Axes are Auto, so XLA propagates shardings between the explicit in/out shardings of the
    jitted steps and the constraints placed on activations.
    """
    import jax
    from jax.sharding import AxisType

    devices = list(devices) if devices is not None else jax.devices()
    full = resolve_mesh_shape(shape, len(devices), where)
    sizes = tuple(full[axis] for axis in MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
