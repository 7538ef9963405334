"""Grouped-query attention: projections, RoPE, masked softmax attention and the output projection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.model.layers import apply_rope, rms_norm

# Constrain(x, logical_axes) -> x places an activation according to the rules table.
Constrain = Callable[[jax.Array, tuple[str, ...]], jax.Array]

# Finite, so a query whose keys are all masked gets a uniform softmax rather than NaN.
MASK_VALUE = -1e30


def project_qkv(
    layer: dict[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array, config: ModelConfig,
    constrain: Constrain,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Project x [b, t, embed] to rotated q [b, t, q_heads, d] and k, v [b, t, kv_heads, d]."""
    q = jnp.einsum("bte,ehd->bthd", x, layer["wq"])
    k = jnp.einsum("bte,ehd->bthd", x, layer["wk"])
    v = jnp.einsum("bte,ehd->bthd", x, layer["wv"])
    if config.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)

    q = constrain(apply_rope(q, cos, sin), ("batch", "sequence", "q_heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "sequence", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "sequence", "kv_heads", "head_dim"))
    return q, k, v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of q [b, t, H, d] over k, v [b, K, s, d], grouping H / K queries per KV head.

    `mask` [b, t, s] is True where a query may attend a key. Scores and softmax are float32.
    """
    b, t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    grouped = q.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim)

    scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)

    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, num_heads, head_dim)


def attend_cache_blocks(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, positions: jax.Array,
                        block: int) -> jax.Array:
    """Attend one query per slot, q [b, 1, H, d], to cache positions 0..position, block by block.

    The loop visits only the blocks up to the largest position in the batch, so a step reads
    as much of the KV cache as the longest sequence needs rather than the whole cache. Blocks
    merge by online softmax: running max, running sum and a rescaled accumulator, in float32.
    """
    b, _, num_heads, head_dim = q.shape
    num_kv_heads = cache_k.shape[1]
    groups = num_heads // num_kv_heads
    grouped = q.reshape(b, num_kv_heads, groups, head_dim)
    scale = head_dim**-0.5

    def visit(index, carry):
        running_max, running_sum, acc = carry
        start = index * block
        keys = jax.lax.dynamic_slice_in_dim(cache_k, start, block, axis=2)
        values = jax.lax.dynamic_slice_in_dim(cache_v, start, block, axis=2)

        scores = jnp.einsum("bkgd,bksd->bkgs", grouped, keys, preferred_element_type=jnp.float32) * scale
        visible = (start + jnp.arange(block))[None, :] <= positions[:, None]  # [b, block]
        scores = jnp.where(visible[:, None, None, :], scores, MASK_VALUE)

        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + probs.sum(axis=-1)
        update = jnp.einsum("bkgs,bksd->bkgd", probs.astype(values.dtype), values,
                            preferred_element_type=jnp.float32)
        return new_max, running_sum, acc * rescale[..., None] + update

    init = (jnp.full((b, num_kv_heads, groups), MASK_VALUE, jnp.float32),
            jnp.zeros((b, num_kv_heads, groups), jnp.float32),
            jnp.zeros((b, num_kv_heads, groups, head_dim), jnp.float32))
    num_blocks = jnp.max(positions) // block + 1
    _, total, acc = jax.lax.fori_loop(0, num_blocks, visit, init)
    out = (acc / total[..., None]).astype(q.dtype)
    return out.reshape(b, 1, num_heads, head_dim)


def project_output(layer: dict[str, Any], attn: jax.Array, config: ModelConfig) -> jax.Array:
    """Project attention output [b, t, q_heads, d] back to [b, t, embed]."""
    # One contraction over heads x head_dim, as a plain matmul: contracting the two axes
    # separately makes XLA:CPU copy wo into another layout on every call.
    b, t, num_heads, head_dim = attn.shape
    wo = layer["wo"].reshape(num_heads * head_dim, -1)
    out = jnp.einsum("btf,fe->bte", attn.reshape(b, t, num_heads * head_dim), wo)
    if config.out_bias:
        out = out + layer["bo"]
    return out
