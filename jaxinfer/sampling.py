"""Token sampling: greedy, temperature, top-k and top-p, seeded per request.

Each slot carries its own settings. The random key of a token is derived from the request's
seed and the token's position, so a seeded request draws the same tokens whatever else is in
the batch and however many decode steps run per host call.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} is invalid; use a number >= 0 "
                             "(0 for greedy decoding)")
        if (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                or not 0 <= self.top_k < 2**31):
            raise ValueError(f"top_k={self.top_k!r} is invalid; use an integer >= 0 and below 2**31 "
                             "(0 disables it)")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} is invalid; use a number in (0, 1] "
                             "(1 disables it)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} is invalid; use an integer in [0, 2**32)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class SlotSampling:
    """Sampling settings of every slot, as arrays the jitted steps take."""

    temperature: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int32
    top_p: np.ndarray  # [B] float32
    seed: np.ndarray  # [B] uint32

    @classmethod
    def empty(cls, slots: int) -> SlotSampling:
        return cls(np.zeros(slots, np.float32), np.zeros(slots, np.int32),
                   np.ones(slots, np.float32), np.zeros(slots, np.uint32))

    def set(self, slot: int, params: SamplingParams) -> None:
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.seed[slot] = params.seed

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.temperature, self.top_k, self.top_p, self.seed


def sample(logits: jax.Array, positions: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, seed: jax.Array) -> jax.Array:
    """Pick the token at `positions` [B] from float32 logits [B, vocab] under each slot's settings.

    The sort that top-k and top-p need runs only when some slot samples.
    """
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled_tokens() -> jax.Array:
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed, positions)
        drawn = jax.vmap(_sample_one)(logits, keys, temperature, top_k, top_p)
        return jnp.where(temperature > 0, drawn, greedy_tokens)

    return jax.lax.cond(jnp.any(temperature > 0), sampled_tokens, lambda: greedy_tokens)


def _sample_one(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Sample one token from logits [vocab] with temperature, then top-k, then top-p."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    ranks = jnp.arange(scaled.shape[0])

    keep = (top_k <= 0) | (ranks < top_k)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits)
    # A token stays when the probability mass before it is below top_p, so the first always stays.
    mass_before = jnp.cumsum(probs) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)

    choice = jax.random.categorical(key, sorted_logits)
    return order[choice].astype(jnp.int32)
