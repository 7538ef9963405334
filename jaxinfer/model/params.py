"""Parameter tree of the dense decoder: names, shapes and logical axes.

Every converter produces this tree of host arrays, and the Orbax checkpoint stores it:

    embed        [vocab, embed]
    final_norm   [embed]
    lm_head      [embed, vocab]             only when the output embedding is not tied
    layers       list of num_layers dicts:
      attn_norm  [embed]
      wq         [embed, q_heads, head_dim]
      wk, wv     [embed, kv_heads, head_dim]
      wo         [q_heads, head_dim, embed]
      bq         [q_heads, head_dim]         qkv_bias
      bk, bv     [kv_heads, head_dim]        qkv_bias
      bo         [embed]                     out_bias
      q_norm     [head_dim]                  qk_norm
      k_norm     [head_dim]                  qk_norm
      mlp_norm   [embed]
      w_gate     [embed, mlp]
      w_up       [embed, mlp]
      w_down     [mlp, embed]

Layers are a list rather than one stacked array, because XLA:CPU decodes about twice as
fast with unrolled per-layer arrays as with `lax.scan` over stacked ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig

Axes = tuple[str, ...]


def layer_axes(config: ModelConfig) -> dict[str, Axes]:
    """Return the logical axes of one layer's arrays."""
    axes: dict[str, Axes] = {
        "attn_norm": ("embed",),
        "wq": ("embed", "q_heads", "head_dim"),
        "wk": ("embed", "kv_heads", "head_dim"),
        "wv": ("embed", "kv_heads", "head_dim"),
        "wo": ("q_heads", "head_dim", "embed"),
        "mlp_norm": ("embed",),
        "w_gate": ("embed", "mlp"),
        "w_up": ("embed", "mlp"),
        "w_down": ("mlp", "embed"),
    }
    if config.qkv_bias:
        axes.update(bq=("q_heads", "head_dim"), bk=("kv_heads", "head_dim"),
                    bv=("kv_heads", "head_dim"))
    if config.out_bias:
        axes["bo"] = ("embed",)
    if config.qk_norm:
        axes.update(q_norm=("head_dim",), k_norm=("head_dim",))
    return axes


def param_axes(config: ModelConfig) -> dict[str, Any]:
    """Return the tree of logical axes, with the same structure as the parameters."""
    tree: dict[str, Any] = {
        "embed": ("vocab", "embed"),
        "final_norm": ("embed",),
        "layers": [layer_axes(config) for _ in range(config.num_layers)],
    }
    if not config.tie_embeddings:
        tree["lm_head"] = ("embed", "vocab")
    return tree


def axis_sizes(config: ModelConfig) -> dict[str, int]:
    """Return the size of every logical weight axis."""
    return {
        "vocab": config.vocab_size,
        "embed": config.embed_dim,
        "q_heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "mlp": config.mlp_dim,
    }


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """Return the tree of parameter shapes."""
    sizes = axis_sizes(config)
    return map_tree(lambda axes: tuple(sizes[a] for a in axes), param_axes(config))


def map_tree(fn, tree: Any, *others: Any) -> Any:
    """Apply `fn` leaf by leaf to trees of the parameter structure (nested dicts and lists).

    Unlike `jax.tree.map`, tuples are leaves, so trees of shapes and logical axes work too.
    """
    if isinstance(tree, dict):
        return {k: map_tree(fn, v, *(o[k] for o in others)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tree(fn, v, *(o[i] for o in others)) for i, v in enumerate(tree)]
    return fn(tree, *others)


def check_params(config: ModelConfig, params: dict[str, Any]) -> None:
    """Raise ValueError naming the first array whose name or shape differs from the config."""
    expected = param_shapes(config)

    def walk(exp: Any, got: Any, path: str) -> None:
        if isinstance(exp, dict):
            if not isinstance(got, dict) or set(exp) != set(got):
                missing = sorted(set(exp) - set(got or {}))
                extra = sorted(set(got or {}) - set(exp))
                raise ValueError(f"parameters at {path or '/'}: missing {missing}, unexpected {extra}")
            for k in exp:
                walk(exp[k], got[k], f"{path}/{k}")
        elif isinstance(exp, list):
            if not isinstance(got, list) or len(got) != len(exp):
                raise ValueError(f"parameters at {path}: expected {len(exp)} layers")
            for i, (e, g) in enumerate(zip(exp, got, strict=True)):
                walk(e, g, f"{path}/{i}")
        elif tuple(np.shape(got)) != exp:
            raise ValueError(f"parameter {path} has shape {tuple(np.shape(got))}, expected {exp}")

    walk(expected, params, "")


def init_random_params(config: ModelConfig, seed: int = 0, dtype=np.float32,
                       scale: float = 0.02) -> dict[str, Any]:
    """Draw random parameters for tests and benchmarks.

    Norm weights are one; everything else, biases included, is normal with std `scale`.
    """
    rng = np.random.default_rng(seed)
    axes = param_axes(config)
    sizes = axis_sizes(config)

    def draw(leaf_axes: Axes, name: str) -> np.ndarray:
        shape = tuple(sizes[a] for a in leaf_axes)
        if name.endswith("norm"):
            return np.ones(shape, dtype)
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    return map_tree(draw, axes, _leaf_names(axes))


def _leaf_names(tree: Any, name: str = "") -> Any:
    """Return a tree of the same structure whose leaves are their own key names."""
    if isinstance(tree, dict):
        return {k: _leaf_names(v, k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_leaf_names(v, name) for v in tree]
    return name
