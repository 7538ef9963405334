"""The inference engine: jitted prefill and decode steps over a fixed set of request slots.

Requests flow through slots with continuous batching. A free slot takes the next request,
and its prompt, padded to a power-of-two bucket, is prefilled straight into that slot's rows
of the KV cache. Every active slot then advances together in the decode step, several
tokens per host call. When a request stops (EOS, a stop string, or its token limit), its slot
takes the next request while the others keep decoding.

Compiled programs: one prefill per bucket length, one decode (plus one that also returns
logits, when asked). Shapes never change during steady decode, so it never recompiles.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import DTYPES, ModelConfig, next_power_of_two
from jaxinfer.mesh import make_mesh
from jaxinfer.model import transformer
from jaxinfer.model.layers import rope_frequencies
from jaxinfer.rules import RulesTable
from jaxinfer.sampling import SamplingParams, SlotSampling, sample
from jaxinfer.sharding import ShardingPlan
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

class RequestError(ValueError):
    """A request the engine cannot run (prompt too long for the context, invalid settings)."""


@dataclasses.dataclass
class Request:
    """One prompt to complete."""

    prompt_ids: Sequence[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    id: Any = None
    ignore_eos: bool = False  # generate max_new_tokens even past EOS, as benchmarks do


@dataclasses.dataclass
class Result:
    """A finished request: generated ids (EOS included when it stopped on one), text and timings.

    TTFT runs from the request's admission into a slot to its first token on the host; queue
    time is the wait before admission. TTIT is the mean time per token after the first.
    """

    request: Request
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    queue_s: float
    ttft_s: float
    ttit_s: float | None
    logits: np.ndarray | None = None  # [generated, vocab] float32, when requested

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    def to_record(self) -> dict[str, Any]:
        """Return the JSON-ready fields that `generate --json` and batch jobs write."""
        return {
            "id": self.request.id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": len(self.token_ids),
            "ttft_s": round(self.ttft_s, 6),
            "ttit_s": None if self.ttit_s is None else round(self.ttit_s, 6),
            "queue_s": round(self.queue_s, 6),
        }


@dataclasses.dataclass
class _Active:
    """Host-side state of a request occupying a slot."""

    request: Request
    slot: int
    arrival: float
    admitted: float
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    tokens: list[int] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None


class Engine:
    """Prefill and decode steps for one model on one mesh under one rules table."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]],
        table: RulesTable,
        *,
        tokenizer: Tokenizer | None = None,
        mesh=None,
        devices: Sequence[Any] | None = None,
        slots: int = 8,
        cache_len: int | None = None,
        steps_per_call: int = 8,
        dtype: str = "float32",
        return_logits: bool = False,
    ):
        """Build the engine from `params`: a tree of host or device arrays, or a function that
        takes the tree of target shardings and returns the arrays placed in them (used to
        restore a checkpoint straight into the sharded layout).

        `mesh` defaults to one built from the table over `devices` (default: all devices).
        `cache_len` (KV cache positions per slot) defaults to the model's context length.
        With `return_logits`, results carry the float32 logits of every generated token.
        """
        self.config = config
        self.tokenizer = tokenizer
        self.table = table
        self.mesh = mesh if mesh is not None else make_mesh(table.mesh, devices, where=table.name)
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        for name, value in (("slots", slots), ("steps_per_call", steps_per_call)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; use an integer >= 1")
        if cache_len is not None and (not isinstance(cache_len, int) or cache_len < 1):
            raise ValueError(f"cache_len={cache_len!r} is invalid; use an integer >= 1 (--max-seq-len)")
        self.dtype = jnp.dtype(dtype)
        self.steps_per_call = steps_per_call
        self.return_logits = return_logits

        cache_len = cache_len or config.max_seq_len
        if cache_len > config.max_seq_len:
            raise RequestError(
                f"cache length {cache_len} exceeds the model's context of {config.max_seq_len} "
                "tokens; lower --max-seq-len"
            )
        self.plan = ShardingPlan.build(config, table, self.mesh, slots, cache_len)
        self.slots, self.cache_len = self.plan.slots, self.plan.cache_len
        self.prefill_batch, self.min_bucket = self.plan.prefill_batch, self.plan.min_bucket
        if self.slots != slots:
            logger.info("rounded %d slots up to %d, a multiple of the batch shards", slots, self.slots)
        self.plan.placements()  # validates every array against the table before any work

        self.params = self._place_params(params)
        self.inv_freq = jnp.asarray(rope_frequencies(config))
        self.cache = self._new_cache()
        self._prefill = self._build_prefill()
        self._decode = self._build_decode()

    # Construction.

    def _place_params(self, params) -> dict[str, Any]:
        shardings = self.plan.param_shardings()
        if callable(params):
            return params(shardings)
        leaves = jax.tree.leaves(params)
        if leaves and all(isinstance(x, jax.Array) for x in leaves):
            return jax.tree.map(lambda x, s: jax.device_put(x.astype(self.dtype), s), params, shardings)
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x).astype(self.dtype), s),
                            params, shardings)

    def _new_cache(self) -> dict[str, list[jax.Array]]:
        shape, sharding = self.plan.cache_shape(), self.plan.cache_sharding()
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)
        return {"k": [zeros() for _ in range(self.config.num_layers)],
                "v": [zeros() for _ in range(self.config.num_layers)]}

    def _cache_shardings(self) -> dict[str, list[Any]]:
        sharding = self.plan.cache_sharding()
        return {part: [sharding] * self.config.num_layers for part in ("k", "v")}

    def _build_prefill(self) -> Callable:
        config, inv_freq = self.config, self.inv_freq
        constrain = self.plan.constrain_fn("prefill")

        def prefill_step(params, cache, tokens, lengths, slots, temperature, top_k, top_p, seed):
            logits, new_kv = transformer.prefill(params, tokens, lengths, inv_freq, config, constrain)
            seq_len = tokens.shape[1]
            # Padding rows carry slot index == number of slots; mode="drop" discards them.
            for i, (k, v) in enumerate(new_kv):
                cache["k"][i] = cache["k"][i].at[slots, :, :seq_len].set(k, mode="drop")
                cache["v"][i] = cache["v"][i].at[slots, :, :seq_len].set(v, mode="drop")
            first = sample(logits, lengths, temperature, top_k, top_p, seed)
            return cache, first, logits

        return self._jit_step(prefill_step, host_inputs=7)

    def _build_decode(self) -> Callable:
        config, inv_freq, cache_len = self.config, self.inv_freq, self.cache_len
        constrain = self.plan.constrain_fn("decode")
        num_steps, return_logits = self.steps_per_call, self.return_logits
        blocked = self.plan.shards(None, "cache_sequence") == 1

        def decode_steps(params, cache, tokens, positions, temperature, top_k, top_p, seed):
            def step(carry, _):
                cache, tokens, positions = carry
                logits, cache = transformer.decode(params, cache, tokens, positions, inv_freq,
                                                   config, constrain, blocked)
                next_positions = positions + 1
                new_tokens = sample(logits, next_positions, temperature, top_k, top_p, seed)
                # Finished slots run on until the host frees them; keep their writes in bounds.
                next_positions = jnp.minimum(next_positions, cache_len - 1)
                return (cache, new_tokens, next_positions), (new_tokens,
                                                             logits if return_logits else None)

            (cache, _, _), (out_tokens, out_logits) = jax.lax.scan(
                step, (cache, tokens, positions), None, length=num_steps)
            return cache, out_tokens, out_logits

        return self._jit_step(decode_steps, host_inputs=6)

    def _jit_step(self, step: Callable, host_inputs: int) -> Callable:
        """Jit step(params, cache, *host_inputs) -> (cache, tokens, logits) with explicit shardings.

        Parameters and the KV cache keep the table's sharding, and the cache is donated so XLA
        updates it in place. The small host inputs and outputs are replicated.
        """
        replicated = self.plan.replicated()
        return jax.jit(
            step,
            donate_argnums=(1,),
            in_shardings=(self.plan.param_shardings(), self._cache_shardings(),
                          *[replicated] * host_inputs),
            out_shardings=(self._cache_shardings(), replicated, replicated),
        )

    # Requests.

    def bucket_for(self, prompt_len: int) -> int:
        """Return the padded prefill length of a prompt: a power of two, at most the cache length."""
        return min(max(self.min_bucket, next_power_of_two(prompt_len)), self.cache_len)

    def check_request(self, request: Request) -> None:
        """Raise RequestError when the request cannot run on this engine."""
        prompt_len = len(request.prompt_ids)
        if not all(isinstance(t, int | np.integer) for t in request.prompt_ids):
            raise RequestError("prompt_ids must be integers (token ids)")
        if prompt_len == 0:
            raise RequestError("the prompt is empty; give at least one token")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens={request.max_new_tokens!r} is invalid; "
                               "use an integer >= 1")
        needed = prompt_len + request.max_new_tokens
        if needed > self.cache_len:
            limit = ("the model's context" if self.cache_len == self.config.max_seq_len
                     else "the KV cache length")
            raise RequestError(
                f"prompt of {prompt_len} tokens plus max_new_tokens={request.max_new_tokens} needs "
                f"{needed} positions, more than {limit} of {self.cache_len}; shorten the prompt or "
                "lower max_new_tokens"
                + ("" if limit == "the model's context" else ", or raise --max-seq-len")
            )
        if any(t < 0 or t >= self.config.vocab_size for t in request.prompt_ids):
            raise RequestError(f"prompt contains token ids outside the vocabulary of "
                               f"{self.config.vocab_size}")
        if isinstance(request.stop, str) or not all(isinstance(s, str) and s for s in request.stop):
            raise RequestError(f"stop={request.stop!r} is invalid; use a tuple of non-empty strings")
        if request.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; the engine has none")

    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Run requests with continuous batching and yield each result as soon as it finishes.

        Requests are admitted in order. Invalid ones raise RequestError when their turn comes;
        call `check_request` first to handle them one by one.
        """
        pending: deque[tuple[Request, float]] = deque()
        source = iter(requests)
        free = list(range(self.slots))[::-1]
        active: dict[int, _Active] = {}
        tokens = np.zeros(self.slots, np.int32)
        positions = np.zeros(self.slots, np.int32)
        sampling = SlotSampling.empty(self.slots)
        exhausted = False

        def refill() -> None:
            """Pull requests from the source until there is one waiting per free slot."""
            nonlocal exhausted
            while not exhausted and len(pending) < len(free):
                request = next(source, None)
                if request is None:
                    exhausted = True
                else:
                    pending.append((request, time.perf_counter()))

        while True:
            refill()
            while free and pending:
                batch = self._take_prefill_batch(pending, len(free))
                slots = [free.pop() for _ in batch]
                for state in self._run_prefill(batch, slots, tokens, positions, sampling):
                    active[state.slot] = state
                yield from self._release_finished(active, free, positions)
                refill()  # slots freed by requests that ended on their first token

            if not active:
                if exhausted and not pending:
                    return
                continue

            self._run_decode(active, tokens, positions, sampling)
            yield from self._release_finished(active, free, positions)

    def _take_prefill_batch(self, pending: deque, free: int) -> list[tuple[Request, float]]:
        """Pop up to prefill_batch consecutive pending requests that share a bucket."""
        first, arrival = pending.popleft()
        self.check_request(first)
        batch = [(first, arrival)]
        bucket = self.bucket_for(len(first.prompt_ids))
        while (pending and len(batch) < min(self.prefill_batch, free)
               and self.bucket_for(len(pending[0][0].prompt_ids)) == bucket):
            request, arrival = pending[0]
            self.check_request(request)
            batch.append(pending.popleft())
        return batch

    def _run_prefill(self, batch, slots, tokens, positions, sampling) -> list[_Active]:
        admitted = time.perf_counter()
        bucket = self.bucket_for(len(batch[0][0].prompt_ids))
        rows = self.prefill_batch
        padded = np.zeros((rows, bucket), np.int32)
        lengths = np.ones(rows, np.int32)
        slot_ids = np.full(rows, self.slots, np.int32)
        row_sampling = SlotSampling.empty(rows)
        for row, ((request, _), slot) in enumerate(zip(batch, slots, strict=True)):
            ids = np.asarray(request.prompt_ids, np.int32)
            padded[row, : len(ids)] = ids
            lengths[row] = len(ids)
            slot_ids[row] = slot
            row_sampling.set(row, request.sampling)

        self.cache, first, logits = self._prefill(self.params, self.cache, padded, lengths, slot_ids,
                                                  *row_sampling.arrays())
        first = np.asarray(first)
        logits = np.asarray(logits) if self.return_logits else None
        now = time.perf_counter()

        states = []
        for row, ((request, arrival), slot) in enumerate(zip(batch, slots, strict=True)):
            state = _Active(request, slot, arrival, admitted, first_token_at=now, last_token_at=now)
            tokens[slot] = first[row]
            positions[slot] = lengths[row]
            sampling.set(slot, request.sampling)
            self._append_tokens(state, [int(first[row])],
                                None if logits is None else logits[row : row + 1])
            states.append(state)
        return states

    def _run_decode(self, active: dict[int, _Active], tokens, positions, sampling) -> None:
        self.cache, out_tokens, out_logits = self._decode(self.params, self.cache, tokens, positions,
                                                          *sampling.arrays())
        out_tokens = np.asarray(out_tokens)  # [steps, slots]
        out_logits = np.asarray(out_logits) if self.return_logits else None
        now = time.perf_counter()
        for slot, state in active.items():
            if state.finish_reason is not None:
                continue
            tokens[slot] = out_tokens[-1, slot]
            positions[slot] += self.steps_per_call
            state.last_token_at = now
            self._append_tokens(state, out_tokens[:, slot].tolist(),
                                None if out_logits is None else out_logits[:, slot])

    def _append_tokens(self, state: _Active, new_tokens: list[int], logits) -> None:
        """Add tokens to a request until it stops on EOS, a stop string or its token limit."""
        request = state.request
        eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            eos_ids.update(self.tokenizer.eos_ids)
        start = len(state.tokens)
        for i, token in enumerate(new_tokens):
            state.tokens.append(token)
            if logits is not None:
                state.logits.append(logits[i])
            if token in eos_ids and not request.ignore_eos:
                state.finish_reason = "stop"
                break
            if len(state.tokens) >= request.max_new_tokens:
                state.finish_reason = "length"
                break
        if request.stop:
            self._apply_stop_strings(state, start)

    def _apply_stop_strings(self, state: _Active, start: int) -> None:
        """Cut the output at the first stop string, if one appeared among the tokens from `start`."""
        text = self._completion_text(state.request, state.tokens)
        cut = min((i for i in (text.find(s) for s in state.request.stop) if i >= 0), default=-1)
        if cut < 0:
            return
        # Keep the fewest tokens whose text already contains the stop string.
        for end in range(max(start, 1), len(state.tokens) + 1):
            partial = self._completion_text(state.request, state.tokens[:end])
            if any(s in partial for s in state.request.stop):
                del state.tokens[end:]
                del state.logits[end:]
                break
        state.text = text[:cut]
        state.finish_reason = "stop"

    def _completion_text(self, request: Request, generated: list[int]) -> str:
        """Decode generated ids in the context of the prompt, so leading spaces survive."""
        if self.tokenizer is None:
            return ""
        prompt = list(request.prompt_ids)
        full = self.tokenizer.decode(prompt + generated)
        prefix = self.tokenizer.decode(prompt)
        if full.startswith(prefix):
            return full[len(prefix):]
        return self.tokenizer.decode(generated)

    def _release_finished(self, active: dict[int, _Active], free: list[int],
                          positions: np.ndarray) -> Iterator[Result]:
        for slot in [s for s, state in active.items() if state.finish_reason is not None]:
            state = active.pop(slot)
            free.append(slot)
            positions[slot] = 0
            yield self._result(state)

    def _result(self, state: _Active) -> Result:
        text = state.text if state.text is not None else self._completion_text(state.request,
                                                                                state.tokens)
        count = len(state.tokens)
        ttit = (state.last_token_at - state.first_token_at) / (count - 1) if count > 1 else None
        logits = np.stack(state.logits) if state.logits else None
        return Result(
            request=state.request,
            token_ids=list(state.tokens),
            text=text,
            finish_reason=state.finish_reason or "length",
            queue_s=state.admitted - state.arrival,
            ttft_s=state.first_token_at - state.admitted,
            ttit_s=ttit,
            logits=logits,
        )

    def warmup(self, prompt_lengths: Iterable[int]) -> float:
        """Compile the prefill for the buckets of these prompt lengths and the decode step.

        Call it before `generate`: the decode call writes into the first positions of every
        slot, which each request's prefill overwrites. Returns the seconds spent.
        """
        start = time.perf_counter()
        rows = self.prefill_batch
        idle = SlotSampling.empty(rows)
        for bucket in sorted({self.bucket_for(n) for n in prompt_lengths}):
            self.cache, first, _ = self._prefill(
                self.params, self.cache, np.zeros((rows, bucket), np.int32), np.ones(rows, np.int32),
                np.full(rows, self.slots, np.int32), *idle.arrays())
            first.block_until_ready()
        zeros = np.zeros(self.slots, np.int32)
        self.cache, out_tokens, _ = self._decode(self.params, self.cache, zeros, zeros,
                                                 *SlotSampling.empty(self.slots).arrays())
        out_tokens.block_until_ready()
        return time.perf_counter() - start

    # Introspection.

    def compiled_programs(self) -> dict[str, int]:
        """Return how many programs each step has compiled (one per distinct input shape)."""
        return {"prefill": self._prefill._cache_size(), "decode": self._decode._cache_size()}
