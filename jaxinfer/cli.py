"""Command-line interface: jaxinfer generate | batch | bench | convert | inspect.

JAX is imported only after the rules table is read, because the number of simulated CPU
devices (an XLA flag) must be set before JAX initialises and follows from the table's mesh.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from jaxinfer.mesh import device_count_for, ensure_host_devices, parse_mesh_spec

logger = logging.getLogger("jaxinfer")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Orbax logs routine warnings through absl, and aborted reads of a corrupt checkpoint
        # through asyncio; the error line printed below reports the failure.
        for name in ("absl", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.debug:
            raise
        print(f"error: {_describe(error)}", file=sys.stderr)
        return 1


def _describe(error: Exception) -> str:
    from jaxinfer.default_model import DownloadError

    message = str(error).strip() or type(error).__name__
    # Invalid input and missing files carry messages written for the user.
    if isinstance(error, ValueError | OSError | DownloadError):
        return message
    return f"{type(error).__name__}: {message} (run with --debug for the traceback)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxinfer",
        description="LLM inference on JAX with sharding declared in rules tables.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument(
        "--model", help="jaxinfer checkpoint directory, HF directory (config.json and safetensors), "
        ".gguf file or llama2.c .bin file; default: SmolLM2-135M-Instruct (downloaded once)")
    model_args.add_argument("--tokenizer", help="tokenizer for a llama2.c checkpoint "
                            "(tokenizer.bin or .model); default: looked up next to the checkpoint")
    model_args.add_argument("--rules", help="rules table: a path, or the name of a table in "
                            "sharding_rules/ (default: tp_mlp)")
    model_args.add_argument("--mesh", help="mesh axis sizes overriding the table's [mesh], "
                            "e.g. 'data=2,tensor=4'")
    model_args.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                            help="dtype of weights and KV cache (default: float32)")

    request_args = argparse.ArgumentParser(add_help=False)
    request_args.add_argument("--temperature", type=float, default=0.0,
                              help="sampling temperature; 0 decodes greedily (default: 0)")
    request_args.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest "
                              "tokens; 0 disables the cut (default: 0)")
    request_args.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set "
                              "of tokens whose probability reaches p; 1 disables the cut (default: 1)")
    request_args.add_argument("--seed", type=int, default=0,
                              help="random seed for sampling (default: 0)")
    request_args.add_argument("--stop", action="append", default=[], metavar="TEXT",
                              help="stop when the output contains TEXT (repeatable)")
    request_args.add_argument("--chat", action="store_true", help="wrap each prompt in the "
                              "checkpoint's chat template as a user message")
    request_args.add_argument("--max-seq-len", type=int,
                              help="KV cache positions per slot (default: the longest prompt plus "
                              "--max-new-tokens, rounded up to a power of two)")
    request_args.add_argument("--steps-per-call", type=int, default=8,
                              help="decode steps per host call (default: 8)")

    gen = sub.add_parser("generate", parents=[common, model_args, request_args],
                         help="complete prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens to generate per prompt at most (default: 64)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt instead of text")
    gen.set_defaults(run=run_generate)

    batch = sub.add_parser(
        "batch", parents=[common, model_args, request_args],
        help="run a JSONL file of requests with continuous batching, resumably",
        description="Run every request of INPUT (JSONL: a 'prompt' or 'messages' field, optional "
        "'id', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed', 'stop') and append "
        "one JSON result per request to OUTPUT as soon as it finishes. Run again with the same "
        "OUTPUT to resume: requests whose id is already there are skipped.")
    batch.add_argument("input", help="JSONL file of requests")
    batch.add_argument("output", help="JSONL file the results are appended to")
    batch.add_argument("--slots", type=int, default=8,
                       help="requests decoded together (default: 8)")
    batch.add_argument("--max-new-tokens", type=int, default=256,
                       help="default token limit for requests that set none (default: 256)")
    batch.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    batch.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    batch.set_defaults(run=run_batch)

    bench = sub.add_parser("bench", parents=[common, model_args],
                           help="measure TTFT, TTIT and tokens/s of a model under a rules table")
    bench.add_argument("--prompt-lengths", type=_int_list, default=(16, 128, 512),
                       help="prompt lengths for TTFT, comma-separated (default: 16,128,512)")
    bench.add_argument("--batch-sizes", type=_int_list, default=(1, 8, 32),
                       help="decode batch sizes, comma-separated (default: 1,8,32)")
    bench.add_argument("--decode-tokens", type=int, default=64,
                       help="tokens decoded per request after the first (default: 64)")
    bench.add_argument("--repeats", type=int, default=5,
                       help="timed runs per figure, after one untimed run (default: 5)")
    bench.add_argument("--steps-per-call", type=int, default=8,
                       help="decode steps per host call (default: 8)")
    bench.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    bench.set_defaults(run=run_bench)

    conv = sub.add_parser("convert", parents=[common], help="convert a checkpoint to Orbax")
    conv.add_argument("source", help="HF directory, .gguf file or llama2.c .bin file")
    conv.add_argument("output", help="new directory for the jaxinfer checkpoint")
    conv.add_argument("--tokenizer", help="tokenizer for a llama2.c checkpoint")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="dtype the weights are stored in (default: float32)")
    conv.set_defaults(run=run_convert)

    insp = sub.add_parser("inspect", parents=[common, model_args],
                          help="print the resolved sharding of every array")
    insp.add_argument("--config", help="a HF config.json to inspect instead of a checkpoint "
                      "(no weights needed)")
    insp.add_argument("--slots", type=int, default=8, help="request slots (default: 8)")
    insp.add_argument("--max-seq-len", type=int, default=1024,
                      help="KV cache positions per slot (default: 1024)")
    insp.add_argument("--json", metavar="FILE", help="also write the listing as JSON to FILE "
                      "('-' for stdout only), for diffing two tables")
    insp.set_defaults(run=run_inspect)
    return parser


# Set-up shared by the commands that place arrays on devices.

def _table_and_devices(args: argparse.Namespace):
    """Load the rules table, size the simulated CPU devices from it, then import JAX."""
    from jaxinfer.load import load_table

    mesh = parse_mesh_spec(args.mesh) if args.mesh else None
    table = load_table(args.rules, mesh)
    ensure_host_devices(device_count_for(table.mesh))
    import jax

    return table, jax.devices()


def _load_model(args: argparse.Namespace):
    """Load the table, size the devices, resolve the checkpoint and its tokenizer."""
    from jaxinfer.checkpoint import read_checkpoint_info
    from jaxinfer.load import resolve_checkpoint

    table, devices = _table_and_devices(args)
    checkpoint = resolve_checkpoint(args.model, args.tokenizer)
    info = read_checkpoint_info(checkpoint)
    tokenizer = info.load_tokenizer()
    if tokenizer is None:
        raise ValueError(f"checkpoint {checkpoint} has no tokenizer; convert it with --tokenizer")
    return table, devices, info, tokenizer


def _check_max_seq_len(args: argparse.Namespace) -> None:
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise ValueError(f"--max-seq-len={args.max_seq_len} is invalid; use an integer >= 1")


def _sampling(args: argparse.Namespace):
    from jaxinfer.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed)


def run_generate(args: argparse.Namespace) -> int:
    from jaxinfer.config import next_power_of_two
    from jaxinfer.engine import Request
    from jaxinfer.load import build_engine

    sampling = _sampling(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid; use an integer >= 1")
    _check_max_seq_len(args)
    table, devices, info, tokenizer = _load_model(args)
    checkpoint = info.directory
    # Undecodable bytes in argv arrive as surrogates, which tokenizers cannot encode.
    prompts = [p.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in args.prompts]
    prompt_ids = [_encode_prompt(tokenizer, prompt, args.chat) for prompt in prompts]

    longest = max(len(ids) for ids in prompt_ids) + args.max_new_tokens
    cache_len = args.max_seq_len or min(next_power_of_two(longest), info.config.max_seq_len)
    load_start = time.perf_counter()
    engine = build_engine(checkpoint, table, dtype=args.dtype, devices=devices,
                          slots=len(prompt_ids), cache_len=cache_len,
                          steps_per_call=args.steps_per_call)
    requests = [Request(ids, args.max_new_tokens, sampling, tuple(args.stop), id=i)
                for i, ids in enumerate(prompt_ids)]
    for request in requests:
        engine.check_request(request)
    load_s = time.perf_counter() - load_start
    compile_s = engine.warmup(len(ids) for ids in prompt_ids)

    start = time.perf_counter()
    results = sorted(engine.generate(requests), key=lambda r: r.request.id)
    wall = time.perf_counter() - start

    for prompt, result in zip(prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, **result.to_record()}), flush=True)
        else:
            print(result.text if len(results) == 1 else f"[{result.request.id}] {result.text}")
    _print_summary(results, wall, load_s, compile_s, engine, file=sys.stderr if args.json
                   else sys.stdout)
    return 0


def _encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt)
    return tokenizer.encode_chat([{"role": "user", "content": prompt}])


def _print_summary(results, wall: float, load_s: float, compile_s: float, engine, file) -> None:
    tokens = sum(len(r.token_ids) for r in results)
    ttft = sum(r.ttft_s for r in results) / len(results)
    ttits = [r.ttit_s for r in results if r.ttit_s is not None]
    ttit = f"{1000 * sum(ttits) / len(ttits):.1f} ms" if ttits else "n/a"
    mesh = ",".join(f"{k}={v}" for k, v in engine.plan.mesh_shape.items())
    print(f"--- {tokens} tokens in {wall:.2f} s: TTFT {1000 * ttft:.1f} ms, TTIT {ttit}, "
          f"{tokens / wall:.1f} tokens/s | mesh {mesh} ({engine.table.name}), "
          f"load {load_s:.1f} s, compile {compile_s:.1f} s", file=file)


def run_batch(args: argparse.Namespace) -> int:
    from jaxinfer import batch
    from jaxinfer.load import build_engine

    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {str(input_path)!r} not found")
    defaults = batch.JobDefaults(args.max_new_tokens, _sampling(args), tuple(args.stop), args.chat)
    _check_max_seq_len(args)
    table, devices, info, tokenizer = _load_model(args)
    checkpoint = info.directory

    done = batch.finished_ids(output_path)
    jobs, malformed = batch.read_requests(input_path, tokenizer, defaults,
                                          report=lambda message: print(message, file=sys.stderr))
    todo = [job for job in jobs if batch.id_key(job.id) not in done]
    summary = batch.JobSummary(total=len(jobs), skipped_done=len(jobs) - len(todo), malformed=malformed)

    engine = None
    if any(job.request is not None for job in todo):
        cache_len = batch.cache_length_for(todo, info.config.max_seq_len, args.max_seq_len)
        engine = build_engine(checkpoint, table, dtype=args.dtype, devices=devices, slots=args.slots,
                              cache_len=cache_len, steps_per_call=args.steps_per_call)
        compile_s = engine.warmup(len(job.request.prompt_ids) for job in todo
                                  if job.request is not None)
        logger.info("compiled in %.1f s", compile_s)

    with batch.ResultWriter(output_path) as writer, batch.ProgressBar(
            total=len(jobs), done=summary.skipped_done, enabled=not args.no_progress) as bar:
        batch.run_job(engine, todo, writer, summary, bar.update)

    print(summary.format())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def run_bench(args: argparse.Namespace) -> int:
    from jaxinfer.bench import BenchSettings, format_report, run_benchmark
    from jaxinfer.checkpoint import read_checkpoint_info
    from jaxinfer.load import build_engine, resolve_checkpoint

    settings = BenchSettings(prompt_lengths=args.prompt_lengths, batch_sizes=args.batch_sizes,
                             decode_tokens=args.decode_tokens, repeats=args.repeats,
                             steps_per_call=args.steps_per_call)
    table, devices = _table_and_devices(args)
    checkpoint = resolve_checkpoint(args.model, args.tokenizer)
    config = read_checkpoint_info(checkpoint).config

    def make_engine(slots: int, cache_len: int):
        return build_engine(checkpoint, table, dtype=args.dtype, devices=devices, slots=slots,
                            cache_len=min(cache_len, config.max_seq_len),
                            steps_per_call=args.steps_per_call)

    report = run_benchmark(make_engine, config, settings)
    report["model"] = {"checkpoint": str(checkpoint), "parameters": config.num_params(), "dtype": args.dtype}
    report["rules"] = table.name
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.convert import load_source

    start = time.perf_counter()
    model = load_source(Path(args.source), Path(args.tokenizer) if args.tokenizer else None)
    out = save_checkpoint(Path(args.output), model, dtype=args.dtype)
    config = model.config
    print(f"converted {args.source} ({config.family}, {config.num_params() / 1e6:.1f}M parameters, "
          f"{config.num_layers} layers) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from jaxinfer.config import ModelConfig
    from jaxinfer.mesh import make_mesh
    from jaxinfer.sharding import ShardingPlan, format_placements

    table, devices = _table_and_devices(args)
    if args.config:
        try:
            hf_config = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {args.config} is not valid JSON ({error}); pass a HF "
                             "config.json") from None
        config = ModelConfig.from_hf_config(hf_config)
    else:
        from jaxinfer.checkpoint import read_checkpoint_info
        from jaxinfer.load import resolve_checkpoint

        config = read_checkpoint_info(resolve_checkpoint(args.model, args.tokenizer)).config

    mesh = make_mesh(table.mesh, devices, where=table.name)
    plan = ShardingPlan.build(config, table, mesh, args.slots,
                              min(args.max_seq_len, config.max_seq_len))
    rows = plan.placements()
    listing = {"rules": table.name, "mesh": plan.mesh_shape, "model": config.to_dict(),
               "arrays": [row.to_dict() for row in rows]}
    if args.json == "-":
        print(json.dumps(listing, indent=2))
        return 0
    print(format_placements(rows, plan.mesh_shape))
    if args.json:
        Path(args.json).write_text(json.dumps(listing, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
