"""Forward passes of the decoder: prefill over a padded prompt, and one decode step over the KV cache.

The KV cache is a dict {"k": [layers], "v": [layers]} of [slots, kv_heads, cache_len, head_dim]
arrays. Heads come before positions so that attention reads the cache as a batched matmul
without transposing it, a copy that would cost as much memory traffic as the read. Prefill
returns the new keys and values for the caller to write into the cache; decode writes the one
new position of every slot itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.model.attention import Constrain, attend, attend_cache_blocks, project_output, project_qkv
from jaxinfer.model.layers import rms_norm, rope_angles, swiglu

CACHE_AXES = ("cache_batch", "cache_heads", "cache_sequence", "head_dim")

# Cache positions decode attends per loop step when it reads the cache block by block.
DECODE_BLOCK = 128


def no_constraint(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Leave the activation where XLA puts it (single device, or tests of the math alone)."""
    del axes
    return x


def embed_tokens(params: dict[str, Any], tokens: jax.Array, constrain: Constrain) -> jax.Array:
    x = jnp.take(params["embed"], tokens, axis=0)
    return constrain(x, ("batch", "sequence", "embed"))


def output_logits(params: dict[str, Any], x: jax.Array, config: ModelConfig,
                  constrain: Constrain) -> jax.Array:
    """Final norm and output projection of x [b, embed] to float32 logits [b, vocab]."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if config.tie_embeddings:
        logits = jnp.einsum("be,ve->bv", x, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("be,ev->bv", x, params["lm_head"], preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "vocab"))


def mlp_block(layer: dict[str, Any], x: jax.Array, config: ModelConfig, constrain: Constrain) -> jax.Array:
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
        out = swiglu(h, layer["w_gate"], layer["w_up"], layer["w_down"], constrain)
    return constrain(x + out, ("batch", "sequence", "embed"))


def prefill(
    params: dict[str, Any],
    tokens: jax.Array,
    lengths: jax.Array,
    inv_freq: jax.Array,
    config: ModelConfig,
    constrain: Constrain,
) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """Run prompts tokens [n, T] (padded after `lengths`) from position 0.

    Returns the logits of each prompt's last real token [n, vocab] and, per layer, the keys and
    values [n, kv_heads, T, head_dim]. Padding positions get keys and values too; decode masks
    them until it overwrites them.
    """
    n, seq_len = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq_len), (n, seq_len))
    cos, sin = rope_angles(inv_freq, positions)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    mask = jnp.broadcast_to(causal, (n, seq_len, seq_len))

    x = embed_tokens(params, tokens, constrain)
    new_kv = []
    for layer in params["layers"]:
        with jax.named_scope("attention"):
            h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
            q, k, v = project_qkv(layer, h, cos, sin, config, constrain)
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            attn = attend(q, k, v, mask)
            x = constrain(x + project_output(layer, attn, config), ("batch", "sequence", "embed"))
        x = mlp_block(layer, x, config, constrain)
        new_kv.append((k, v))

    last = x[jnp.arange(n), lengths - 1]
    return output_logits(params, last, config, constrain), new_kv


def decode(
    params: dict[str, Any],
    cache: dict[str, list[jax.Array]],
    tokens: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    config: ModelConfig,
    constrain: Constrain,
    blocked: bool = True,
) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
    """Run one token per slot, tokens [B] at `positions` [B]; return logits [B, vocab] and the cache.

    Each slot writes its key and value at its position, then attends positions 0..position.
    With `blocked`, attention reads the cache in DECODE_BLOCK blocks up to the longest
    position. Pass False when the cache's sequence axis is sharded, because slicing it would
    make XLA gather it. Attention then reads the whole cache with a mask.
    """
    batch = tokens.shape[0]
    cache_len = cache["k"][0].shape[2]
    cos, sin = rope_angles(inv_freq, positions[:, None])
    mask = (jnp.arange(cache_len)[None, :] <= positions[:, None])[:, None, :]
    slots = jnp.arange(batch)
    blocked = blocked and cache_len > DECODE_BLOCK and cache_len % DECODE_BLOCK == 0

    x = embed_tokens(params, tokens[:, None], constrain)
    new_cache: dict[str, list[jax.Array]] = {"k": [], "v": []}
    for layer, cache_k, cache_v in zip(params["layers"], cache["k"], cache["v"], strict=True):
        with jax.named_scope("attention"):
            h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
            q, k, v = project_qkv(layer, h, cos, sin, config, constrain)
            cache_k = constrain(cache_k.at[slots, :, positions].set(k[:, 0]), CACHE_AXES)
            cache_v = constrain(cache_v.at[slots, :, positions].set(v[:, 0]), CACHE_AXES)
            if blocked:
                attn = attend_cache_blocks(q, cache_k, cache_v, positions, DECODE_BLOCK)
            else:
                attn = attend(q, cache_k, cache_v, mask)
            x = constrain(x + project_output(layer, attn, config), ("batch", "sequence", "embed"))
        x = mlp_block(layer, x, config, constrain)
        new_cache["k"].append(cache_k)
        new_cache["v"].append(cache_v)

    return output_logits(params, x[:, 0], config, constrain), new_cache
