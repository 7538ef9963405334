"""A sharding plan: every array the engine places, resolved from logical axes to mesh axes.

The plan turns the rules table into NamedShardings for the weights and the KV cache, into
sharding constraints on activations per phase, and into the listing `jaxinfer inspect` prints.
Building the listing resolves every array, so it doubles as the validation of a table against
a model and a mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxinfer.config import ModelConfig
from jaxinfer.mesh import MESH_AXES
from jaxinfer.model.params import axis_sizes, map_tree, param_axes
from jaxinfer.model.transformer import CACHE_AXES
from jaxinfer.rules import PHASES, Layout, RulesTable

# Shortest prefill bucket; shorter prompts are padded to it.
MIN_BUCKET = 16

# Activations the model constrains, with their logical axes; shapes come from the engine.
ACTIVATIONS = {
    "residual": ("batch", "sequence", "embed"),
    "queries": ("batch", "sequence", "q_heads", "head_dim"),
    "keys_values": ("batch", "sequence", "kv_heads", "head_dim"),
    "mlp_hidden": ("batch", "sequence", "mlp"),
    "logits": ("batch", "vocab"),
}


@dataclasses.dataclass(frozen=True)
class ArrayPlacement:
    """One row of the plan: an array, its logical axes, shape and resolved PartitionSpec."""

    name: str
    kind: str  # "weight", "cache" or "activation"
    phase: str  # "all" for weights and cache
    logical_axes: tuple[str, ...]
    shape: tuple[int, ...]
    spec: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "phase": self.phase,
                "logical_axes": list(self.logical_axes), "shape": list(self.shape),
                "spec": [list(s) if isinstance(s, tuple) else s for s in self.spec]}


class ShardingPlan:
    """Shardings of weights, KV cache and activations for one model, table and mesh."""

    def __init__(self, config: ModelConfig, table: RulesTable, mesh, slots: int, cache_len: int,
                 prefill_batch: int, min_bucket: int):
        self.config = config
        self.table = table
        self.mesh = mesh
        self.mesh_shape = {axis: int(mesh.shape[axis]) for axis in MESH_AXES}
        self.slots = slots
        self.cache_len = cache_len
        self.prefill_batch = prefill_batch
        self.min_bucket = min_bucket
        self.weights = Layout(table, self.mesh_shape, None)
        self.phases = {phase: Layout(table, self.mesh_shape, phase) for phase in PHASES}

    @classmethod
    def build(cls, config: ModelConfig, table: RulesTable, mesh, slots: int, cache_len: int,
              min_bucket: int = MIN_BUCKET) -> ShardingPlan:
        """Plan for an engine, with the shapes rounded to what the table's sharding divides.

        Slots round up to a multiple of the batch shards, the prefill batch is one row per
        batch shard, and buckets and the cache length are multiples of the sequence shards.
        """
        probe = cls(config, table, mesh, slots, cache_len, 1, min_bucket)
        slots = _round_up(slots, math.lcm(probe.shards("decode", "batch"),
                                          probe.shards(None, "cache_batch")))
        prefill_batch = probe.shards("prefill", "batch")
        min_bucket = max(min_bucket, probe.shards("prefill", "sequence"))
        cache_len = min(max(_round_up(cache_len, min_bucket), min_bucket), config.max_seq_len)
        return cls(config, table, mesh, slots, cache_len, prefill_batch, min_bucket)

    # Placement of persistent arrays.

    def param_shardings(self) -> dict[str, Any]:
        sizes = axis_sizes(self.config)
        return map_tree(
            lambda axes: self.weights.sharding(self.mesh, axes, [sizes[a] for a in axes],
                                               f"weight {list(axes)}"),
            param_axes(self.config),
        )

    def cache_shape(self) -> tuple[int, ...]:
        return (self.slots, self.config.num_kv_heads, self.cache_len, self.config.head_dim)

    def cache_sharding(self):
        return self.weights.sharding(self.mesh, CACHE_AXES, self.cache_shape(), "KV cache")

    def replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec())

    # Activations.

    def constrain_fn(self, phase: str):
        """Return constrain(x, logical_axes), which pins an activation to the phase's layout."""
        import jax

        layout = self.phases[phase]

        def constrain(x, axes):
            sharding = layout.sharding(self.mesh, axes, x.shape, f"{phase} activation {list(axes)}")
            return jax.lax.with_sharding_constraint(x, sharding)

        return constrain

    def shards(self, phase: str | None, logical_axis: str) -> int:
        """Return how many shards a logical axis is split into (1 when replicated)."""
        layout = self.weights if phase is None else self.phases[phase]
        rule = layout.rules.get(logical_axis)
        return math.prod(self.mesh_shape[m] for m in rule.mesh_axes) if rule else 1

    # The listing.

    def placements(self) -> list[ArrayPlacement]:
        """Resolve every array; raises RulesError for the first that the table cannot place."""
        rows = []
        sizes = axis_sizes(self.config)
        flat_axes = _flatten(param_axes(self.config))
        for name, axes in flat_axes:
            shape = tuple(sizes[a] for a in axes)
            spec = self.weights.spec(axes, shape, f"weight {name}")
            rows.append(ArrayPlacement(name, "weight", "all", axes, shape, tuple(spec)))
        cache_spec = self.weights.spec(CACHE_AXES, self.cache_shape(), "KV cache")
        for part in ("k", "v"):
            rows.append(ArrayPlacement(f"cache.{part}[*]", "cache", "all", CACHE_AXES,
                                       self.cache_shape(), tuple(cache_spec)))
        for phase in PHASES:
            batch, seq = ((self.prefill_batch, self.min_bucket) if phase == "prefill"
                          else (self.slots, 1))
            dims = {**sizes, "batch": batch, "sequence": seq}
            for name, axes in ACTIVATIONS.items():
                shape = tuple(dims[a] for a in axes)
                spec = self.phases[phase].spec(axes, shape, f"{phase} activation {name}")
                rows.append(ArrayPlacement(name, "activation", phase, axes, shape, tuple(spec)))
        return rows


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """Flatten a tree of logical axes into (dotted name, axes), collapsing identical layers."""
    if isinstance(tree, dict):
        out = []
        for key, value in tree.items():
            out.extend(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(tree, list):
        # Every layer has the same axes, so one entry stands for all of them.
        return _flatten(tree[0], f"{prefix}[*]") if tree else []
    return [(prefix, tree)]


def format_placements(rows: list[ArrayPlacement], mesh_shape: dict[str, int]) -> str:
    """Render the plan as an aligned text table."""
    header = ("array", "kind", "phase", "logical axes", "shape", "PartitionSpec")
    lines = [(r.name, r.kind, r.phase, ", ".join(r.logical_axes),
              "x".join(str(s) for s in r.shape), _format_spec(r.spec)) for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    mesh_desc = ", ".join(f"{axis}={size}" for axis, size in mesh_shape.items())
    out = [f"mesh: {mesh_desc}",
           "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in lines]
    return "\n".join(out)


def _format_spec(spec: tuple[Any, ...]) -> str:
    parts = []
    for entry in spec:
        if entry is None:
            parts.append("None")
        elif isinstance(entry, tuple):
            parts.append("(" + ", ".join(entry) + ")")
        else:
            parts.append(entry)
    return "P(" + ", ".join(parts) + ")"
