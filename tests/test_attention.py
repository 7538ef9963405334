"""Decode attention read block by block equals attention over the whole masked cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model.attention import attend, attend_cache_blocks


@pytest.mark.parametrize("positions", [[0, 5, 127, 128], [300, 2, 511, 129], [0, 0, 0, 0]])
def test_blocks_match_full_attention(positions):
    batch, kv_heads, groups, length, head_dim = 4, 2, 3, 512, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, 1, kv_heads * groups, head_dim))
    cache_k = jax.random.normal(keys[1], (batch, kv_heads, length, head_dim))
    cache_v = jax.random.normal(keys[2], (batch, kv_heads, length, head_dim))
    positions = jnp.array(positions)

    mask = (jnp.arange(length)[None, :] <= positions[:, None])[:, None, :]
    expected = attend(q, cache_k, cache_v, mask)
    got = attend_cache_blocks(q, cache_k, cache_v, positions, block=128)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_blocks_ignore_positions_past_the_longest():
    batch, kv_heads, length, head_dim = 2, 1, 256, 8
    q = jnp.ones((batch, 1, kv_heads, head_dim))
    cache_k = jnp.zeros((batch, kv_heads, length, head_dim))
    # Positions past each slot's own hold stale values from earlier requests, which must not count.
    cache_v = jnp.ones((batch, kv_heads, length, head_dim)).at[0, :, 4:].set(1e6).at[1, :, 130:].set(-1e6)
    out = attend_cache_blocks(q, cache_k, cache_v, jnp.array([3, 129]), block=64)
    np.testing.assert_array_equal(np.asarray(out), np.ones((batch, 1, kv_heads, head_dim)))
