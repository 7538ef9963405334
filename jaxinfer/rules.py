"""Sharding rules tables: TOML files that map logical axes to mesh axes.

A table has these sections:

    [mesh]        sizes of the mesh axes data, context, tensor, expert (-1: all remaining devices)
    [rules]       logical axis -> mesh axis, list of mesh axes, or [] (replicated)
    [prefill]     overrides of [rules] for the activations of the prefill step
    [decode]      overrides of [rules] for the activations of the decode step
    [attention]   context_parallel = "all_gather" (XLA gathers sharded K/V)
    [collectives] all_reduce = "xla"

Weights and the KV cache persist across both steps, so they always follow [rules]; the phase
sections change only how activations are laid out. Logical axes a table leaves out are
replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxinfer.mesh import MESH_AXES, MeshError, check_mesh_shape

logger = logging.getLogger(__name__)

WEIGHT_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "experts", "expert_mlp")
ACTIVATION_AXES = ("batch", "sequence")
CACHE_AXES = ("cache_batch", "cache_sequence", "cache_heads")
LOGICAL_AXES = WEIGHT_AXES + ACTIVATION_AXES + CACHE_AXES
PHASES = ("prefill", "decode")

# Axes with fewer entries than devices are replicated instead of rejected: KV heads under a
# tensor axis wider than the KV head count (each device then stores every KV head it needs).
REPLICATE_WHEN_FEWER = ("kv_heads", "cache_heads")

SECTION_OPTIONS = {
    "attention": {"context_parallel": ("all_gather",)},
    "collectives": {"all_reduce": ("xla",)},
}
SECTIONS = ("mesh", "rules", *PHASES, *SECTION_OPTIONS)

def _shipped_rules_dir() -> Path:
    """Return the folder of the shipped tables: package data when installed, else the repository's."""
    import importlib

    try:
        # A namespace package (the folder has no __init__.py), so its __path__ lists the folder.
        for folder in importlib.import_module("jaxinfer.sharding_rules").__path__:
            if any(Path(folder).glob("*.toml")):
                return Path(folder)
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "sharding_rules"


RULES_DIR = _shipped_rules_dir()


class RulesError(ValueError):
    """An invalid rules table, or one that does not fit the model and mesh."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """The mesh axes one logical axis maps to, and the table entry that maps it."""

    mesh_axes: tuple[str, ...]
    key: str  # e.g. "[rules] q_heads" or "[decode] sequence"


@dataclasses.dataclass(frozen=True)
class RulesTable:
    """A parsed and syntax-checked rules table."""

    name: str
    mesh: dict[str, int]
    rules: dict[str, tuple[str, ...]]
    overrides: dict[str, dict[str, tuple[str, ...]]]
    options: dict[str, dict[str, str]]

    @classmethod
    def from_file(cls, path: str | Path) -> RulesTable:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RulesError(f"rules table {str(path)!r} is not a UTF-8 text file; "
                             "a rules table is TOML") from None
        except IsADirectoryError:
            raise RulesError(f"rules table {str(path)!r} is a directory; pass a .toml file") from None
        except FileNotFoundError:
            available = ", ".join(sorted(p.name for p in RULES_DIR.glob("*.toml")))
            raise RulesError(
                f"rules table {str(path)!r} not found; tables shipped with jaxinfer: {available}"
            ) from None
        return cls.from_string(text, name=path.name)

    @classmethod
    def from_string(cls, text: str, name: str = "<string>") -> RulesTable:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise RulesError(f"{name}: invalid TOML: {error}") from None

        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise RulesError(f"{name}: unknown section [{unknown[0]}]; sections are "
                             + ", ".join(f"[{s}]" for s in SECTIONS))
        for section, value in data.items():
            if not isinstance(value, dict):
                raise RulesError(f"{name}: {section} = {value!r} must be a section; write it as "
                                 f"[{section}] followed by its entries")
        try:
            mesh = check_mesh_shape(data.get("mesh", {}), f"{name} [mesh]")
        except MeshError as error:
            raise RulesError(str(error)) from None

        rules = _parse_mapping(data.get("rules", {}), name, "rules")
        overrides = {phase: _parse_mapping(data.get(phase, {}), name, phase) for phase in PHASES}
        for phase, mapping in overrides.items():
            for axis in mapping:
                if axis in CACHE_AXES:
                    raise RulesError(
                        f"{name}: [{phase}] {axis}: the KV cache is shared by prefill and decode, "
                        f"so its axes can only be set in [rules]"
                    )
        options = {section: _parse_options(data.get(section, {}), name, section)
                   for section in SECTION_OPTIONS}
        return cls(name=name, mesh=mesh, rules=rules, overrides=overrides, options=options)

    def with_mesh(self, mesh: Mapping[str, int]) -> RulesTable:
        """Return a copy whose mesh axes are replaced by `mesh` (e.g. from --mesh)."""
        merged = check_mesh_shape({**self.mesh, **mesh}, f"{self.name} with --mesh")
        return dataclasses.replace(self, mesh=merged)

    def resolve(self, phase: str | None) -> dict[str, Rule]:
        """Return the rule of every mapped logical axis for a phase (None: weights and cache)."""
        resolved = {axis: Rule(mesh_axes, f"[rules] {axis}") for axis, mesh_axes in self.rules.items()}
        if phase is not None:
            resolved.update({axis: Rule(mesh_axes, f"[{phase}] {axis}")
                             for axis, mesh_axes in self.overrides[phase].items()})
        return resolved


def load_rules(name_or_path: str | Path) -> RulesTable:
    """Load a table from a path, or by name ("tp" or "tp.toml") from the shipped tables."""
    path = Path(name_or_path)
    if not path.exists() and path.parent == Path("."):
        shipped = RULES_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
        if shipped.exists():
            path = shipped
    return RulesTable.from_file(path)


def _parse_mapping(section: Any, name: str, section_name: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(section, dict):
        raise RulesError(f"{name}: [{section_name}] must be a table of logical axis = mesh axes")
    mapping = {}
    for axis, value in section.items():
        key = f"{name}: [{section_name}] {axis}"
        if axis not in LOGICAL_AXES:
            raise RulesError(f"{key}: unknown logical axis {axis!r}; logical axes are "
                             f"{', '.join(LOGICAL_AXES)}")
        mesh_axes = (value,) if isinstance(value, str) else value
        if not isinstance(mesh_axes, list | tuple) or not all(isinstance(m, str) for m in mesh_axes):
            raise RulesError(f'{key} = {value!r}: expected a mesh axis name, a list of them, '
                             f'or [] to replicate (e.g. {axis} = "tensor")')
        for mesh_axis in mesh_axes:
            if mesh_axis not in MESH_AXES:
                raise RulesError(f"{key} = {value!r}: unknown mesh axis {mesh_axis!r}; mesh axes are "
                                 f"{', '.join(MESH_AXES)}")
        if len(set(mesh_axes)) != len(mesh_axes):
            raise RulesError(f"{key} = {value!r} names a mesh axis twice")
        mapping[axis] = tuple(mesh_axes)
    return mapping


def _parse_options(section: Any, name: str, section_name: str) -> dict[str, str]:
    allowed = SECTION_OPTIONS[section_name]
    options = {key: values[0] for key, values in allowed.items()}
    for key, value in section.items():
        if key not in allowed:
            raise RulesError(f"{name}: unknown option [{section_name}] {key}; options are "
                             f"{', '.join(allowed)}")
        if value not in allowed[key]:
            raise RulesError(f"{name}: [{section_name}] {key} = {value!r} is not supported; "
                             f"supported values: {', '.join(allowed[key])}")
        options[key] = value
    return options


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Layout:
    """Logical-to-physical sharding for one phase, on one mesh.

    `spec` turns an array's logical axes and shape into a PartitionSpec and raises RulesError,
    naming the table entry and a fix, for a layout that cannot work.
    """

    def __init__(self, table: RulesTable, mesh_shape: Mapping[str, int], phase: str | None):
        self.table = table
        self.mesh_shape = dict(mesh_shape)
        self.phase = phase
        self.rules = table.resolve(phase)

    def spec(self, axes: Sequence[str], shape: Sequence[int], what: str):
        """Return the PartitionSpec of array `what` with logical `axes` and `shape`."""
        from jax.sharding import PartitionSpec

        if len(axes) != len(shape):
            raise ValueError(f"{what}: {len(axes)} logical axes {axes} for shape {tuple(shape)}")
        used: dict[str, str] = {}
        entries: list[Any] = []
        for axis, size in zip(axes, shape, strict=True):
            rule = self.rules.get(axis)
            mesh_axes = self._check_divides(rule, axis, size, what) if rule else ()
            for mesh_axis in mesh_axes:
                if mesh_axis in used:
                    raise RulesError(
                        f"{self.table.name}: {what} has logical axes {used[mesh_axis]!r} and "
                        f"{axis!r} both on mesh axis {mesh_axis!r} ({self.rules[used[mesh_axis]].key} "
                        f"and {rule.key}); map one of them to another mesh axis or to []"
                    )
                used[mesh_axis] = axis
            entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                           else tuple(mesh_axes))
        return PartitionSpec(*entries)

    def _check_divides(self, rule: Rule, axis: str, size: int, what: str) -> tuple[str, ...]:
        shards = math.prod(self.mesh_shape[m] for m in rule.mesh_axes)
        if size % shards == 0:
            return rule.mesh_axes
        if axis in REPLICATE_WHEN_FEWER and size < shards and shards % size == 0:
            logger.info("%s: %s has %d entries, fewer than the %d shards of %s; replicating it",
                        self.table.name, axis, size, shards, rule.key)
            return ()
        mesh_desc = " x ".join(f"{m}={self.mesh_shape[m]}" for m in rule.mesh_axes)
        working = ", ".join(str(d) for d in divisors(size) if d <= 64)
        if self.phase is not None and rule.key.startswith("[rules]"):
            fix = (f"add [{self.phase}] {axis} = [] to replicate it in the {self.phase} step only, "
                   "or change the mesh size")
        else:
            fix = f"change the mesh size, or set {axis} = [] to replicate it"
        raise RulesError(
            f"{self.table.name}: {rule.key} = {list(rule.mesh_axes)} splits {what} axis {axis} "
            f"(size {size}) into {shards} shards ({mesh_desc}), which does not divide it; "
            f"shard counts that divide {size}: {working}. To fix it, {fix}"
        )

    def sharding(self, mesh, axes: Sequence[str], shape: Sequence[int], what: str):
        from jax.sharding import NamedSharding

        return NamedSharding(mesh, self.spec(axes, shape, what))
