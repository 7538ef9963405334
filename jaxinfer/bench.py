"""Prefill and decode benchmarks of one model under one rules table.

Measures TTFT per prompt length, and TTIT with aggregate tokens/s per batch size. Compilation
is timed separately (each engine's `warmup`), one untimed run precedes the timed ones, and
every figure is the median of the repeated runs. Prompts are random token ids and requests
ignore EOS, so every run generates the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig, next_power_of_two
from jaxinfer.engine import Engine, Request


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Benchmark settings: what to measure, and how often."""

    prompt_lengths: tuple[int, ...] = (16, 128, 512)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_tokens: int = 64
    decode_prompt_len: int = 32
    repeats: int = 5
    steps_per_call: int = 8

    def __post_init__(self) -> None:
        for name in ("decode_tokens", "decode_prompt_len", "repeats", "steps_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use an integer >= 1")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ValueError(f"prompt_lengths={self.prompt_lengths} is invalid; give lengths >= 1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes={self.batch_sizes} is invalid; give sizes >= 1")


# Builds an engine for the given number of slots and KV cache length.
EngineFactory = Callable[[int, int], Engine]


def random_prompt(config: ModelConfig, length: int, rng: np.random.Generator) -> list[int]:
    """Draw prompt ids that avoid the special ids at the bottom of most vocabularies."""
    low = min(256, config.vocab_size // 2)
    return rng.integers(low, config.vocab_size, size=length).tolist()


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_prefill(make_engine: EngineFactory, config: ModelConfig, settings: BenchSettings,
                  rng: np.random.Generator) -> dict[str, Any]:
    """Measure TTFT (prefill plus the first token on the host) at batch 1 per prompt length."""
    cache_len = next_power_of_two(max(settings.prompt_lengths) + 1)
    engine = make_engine(1, cache_len)
    compile_s = engine.warmup(settings.prompt_lengths)
    rows = []
    for length in settings.prompt_lengths:
        times = []
        for run in range(settings.repeats + 1):
            request = Request(random_prompt(config, length, rng), max_new_tokens=1, ignore_eos=True)
            (result,) = list(engine.generate([request]))
            if run > 0:  # the first run warms caches and is not counted
                times.append(result.ttft_s)
        rows.append({"prompt_len": length, "bucket": engine.bucket_for(length), "ttft_s": stats(times)})
    return {"compile_s": compile_s, "cache_len": engine.cache_len, "rows": rows}


def bench_decode(make_engine: EngineFactory, config: ModelConfig, settings: BenchSettings, batch: int,
                 rng: np.random.Generator) -> dict[str, Any]:
    """Measure TTIT and tokens/s with `batch` requests decoding together."""
    new_tokens = settings.decode_tokens + 1  # the first comes from prefill
    cache_len = next_power_of_two(settings.decode_prompt_len + new_tokens)
    engine = make_engine(batch, cache_len)
    compile_s = engine.warmup([settings.decode_prompt_len])

    ttits, walls = [], []
    for run in range(settings.repeats + 1):
        requests = [Request(random_prompt(config, settings.decode_prompt_len, rng), new_tokens,
                            ignore_eos=True) for _ in range(batch)]
        start = time.perf_counter()
        results = list(engine.generate(requests))
        wall = time.perf_counter() - start
        if run > 0:
            ttits.append(statistics.median(r.ttit_s for r in results))
            walls.append(wall)

    ttit = statistics.median(ttits)
    return {
        "batch": batch,
        "slots": engine.slots,
        "cache_len": engine.cache_len,
        "compile_s": compile_s,
        "ttit_s": stats(ttits),
        # Steady-state decode rate of all slots together, from the median TTIT.
        "decode_tokens_per_s": batch / ttit,
        # Everything the run generated over its wall time, prefills included.
        "end_to_end_tokens_per_s": batch * new_tokens / statistics.median(walls),
    }


def run_benchmark(make_engine: EngineFactory, config: ModelConfig, settings: BenchSettings,
                  seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "settings": dataclasses.asdict(settings),
        "prefill": bench_prefill(make_engine, config, settings, rng),
        "decode": [bench_decode(make_engine, config, settings, batch, rng) for batch in settings.batch_sizes],
    }


def format_report(report: dict[str, Any]) -> str:
    """Render a benchmark report as two Markdown tables."""
    lines = ["| prompt tokens | bucket | TTFT ms (median) | min | max |", "| --- | --- | --- | --- | --- |"]
    for row in report["prefill"]["rows"]:
        t = row["ttft_s"]
        lines.append(f"| {row['prompt_len']} | {row['bucket']} | {1000 * t['median']:.1f} | "
                     f"{1000 * t['min']:.1f} | {1000 * t['max']:.1f} |")
    lines.append(f"\nprefill compile: {report['prefill']['compile_s']:.1f} s\n")
    lines += ["| batch | TTIT ms (median) | decode tokens/s | end-to-end tokens/s | compile s |",
              "| --- | --- | --- | --- | --- |"]
    for row in report["decode"]:
        lines.append(f"| {row['batch']} | {1000 * row['ttit_s']['median']:.2f} | "
                     f"{row['decode_tokens_per_s']:.1f} | {row['end_to_end_tokens_per_s']:.1f} | "
                     f"{row['compile_s']:.1f} |")
    return "\n".join(lines)
