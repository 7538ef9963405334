"""Building blocks of the decoder: RMSNorm, rotary position embeddings and the SwiGLU MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig, RopeScaling


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise the last axis by its root mean square, in float32, then scale by `weight`."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype) * weight.astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Return the inverse frequencies of each rotated pair, [head_dim // 2], with Llama 3 scaling."""
    # float32 throughout, as the HF reference computes it, so positions far into the context
    # get the same angles.
    exponents = np.arange(0, config.head_dim, 2).astype(np.float32) / np.float32(config.head_dim)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Divide low frequencies by `factor`, keep high ones, and interpolate smoothly in between.

    Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled,
    those shorter than original_max_position_embeddings / high_freq_factor are not.
    """
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq

    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, interpolated, scaled)


def rope_angles(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return cos and sin of position * frequency, [..., head_dim // 2], in float32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of each head of x [batch, seq, heads, head_dim] (HF `rotate_half`).

    cos and sin are [batch, seq, head_dim // 2].
    """
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, constrain) -> jax.Array:
    """Compute w_down(silu(x w_gate) * x w_up); `constrain` shards the [batch, seq, mlp] hidden."""
    gate = jnp.einsum("bte,em->btm", x, w_gate)
    up = jnp.einsum("bte,em->btm", x, w_up)
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "sequence", "mlp"))
    return jnp.einsum("btm,me->bte", hidden, w_down)
