"""Batch generation jobs: JSONL requests in, one JSONL result per request out, resumable.

Input lines are JSON objects with a `prompt` string or a `messages` list (chat), and optional
`id`, `max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed` and `stop`. Each result is
appended to the output file, flushed and fsynced as soon as its request finishes, so a job
killed at any point loses only the requests in flight. Started again with the same output
file, the job skips every id already there. A line that is not a JSON object with a prompt is
reported with its line number and skipped. A request the engine cannot run (longer than the
context, invalid sampling settings) gets an error record in the output instead of a result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import next_power_of_two
from jaxinfer.engine import Request, RequestError
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

REQUEST_FIELDS = {"id", "prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                  "stop"}
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed")


class MalformedLine(ValueError):
    """An input line that is not a usable request; the message starts with its line number."""


@dataclasses.dataclass(frozen=True)
class JobDefaults:
    """Settings for requests that do not give their own."""

    max_new_tokens: int = 256
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    chat: bool = False  # wrap `prompt` strings in the chat template as a user message


@dataclasses.dataclass
class JobRequest:
    """One parsed input line: its id, source line, and the engine request or why it cannot run."""

    id: Any
    line: int
    request: Request | None
    error: str | None = None


@dataclasses.dataclass
class JobSummary:
    """Counts and latency percentiles of one run of a job."""

    total: int
    skipped_done: int
    malformed: int
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    ttit_s: list[float] = dataclasses.field(default_factory=list)

    def percentiles(self, values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p90": None, "p99": None}
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.total,
            "skipped_already_done": self.skipped_done,
            "malformed_lines": self.malformed,
            "completed": self.completed,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.generated_tokens / self.wall_s if self.wall_s else None,
            "ttft_s": self.percentiles(self.ttft_s),
            "ttit_s": self.percentiles(self.ttit_s),
        }

    def format(self) -> str:
        data = self.to_dict()
        lines = [
            f"requests: {self.total} ({self.completed} completed, {self.failed} failed, "
            f"{self.skipped_done} already done, {self.malformed} malformed lines skipped)",
            f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated in "
            f"{self.wall_s:.1f} s ({data['tokens_per_s'] or 0:.1f} tokens/s)",
        ]
        for name in ("ttft_s", "ttit_s"):
            p = data[name]
            label = name[:-2].upper()
            if p["p50"] is None:
                lines.append(f"{label}: n/a")
            else:
                lines.append(f"{label} ms: p50 {1000 * p['p50']:.1f}, p90 {1000 * p['p90']:.1f}, "
                             f"p99 {1000 * p['p99']:.1f}")
        return "\n".join(lines)


# Reading the input.

def parse_line(text: str, line: int, tokenizer: Tokenizer, defaults: JobDefaults) -> JobRequest:
    """Parse one input line into a request; raise MalformedLine when it is not a usable request.

    Settings the engine would reject (invalid sampling values) produce a JobRequest with an
    error, so the output records them under the request's id.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedLine(f"line {line}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise MalformedLine(f"line {line}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise MalformedLine(f"line {line}: unknown field {unknown[0]!r}; fields are "
                            f"{', '.join(sorted(REQUEST_FIELDS))}")
    request_id = data.get("id", f"line-{line}")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        raise MalformedLine(f"line {line}: id must be a string or an integer, got {request_id!r}")

    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise MalformedLine(f"line {line}: give exactly one of 'prompt' (a string) or 'messages' "
                            "(a list of {role, content} objects)")
    if prompt is not None and not isinstance(prompt, str):
        raise MalformedLine(f"line {line}: 'prompt' must be a string")
    if messages is not None and not _valid_messages(messages):
        raise MalformedLine(f"line {line}: 'messages' must be a non-empty list of objects with "
                            "string 'role' and 'content'")

    try:
        request = Request(
            prompt_ids=_encode(tokenizer, prompt, messages, defaults.chat),
            max_new_tokens=data.get("max_new_tokens", defaults.max_new_tokens),
            sampling=_sampling(data, defaults.sampling),
            stop=_stop_strings(data.get("stop", defaults.stop)),
            id=request_id,
        )
    except (ValueError, TypeError) as error:
        return JobRequest(request_id, line, None, str(error))
    return JobRequest(request_id, line, request)


def _valid_messages(messages: Any) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in messages))


def _encode(tokenizer: Tokenizer, prompt: str | None, messages: list | None, chat: bool) -> list[int]:
    if messages is not None:
        return tokenizer.encode_chat(messages)
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def _sampling(data: dict[str, Any], default: SamplingParams) -> SamplingParams:
    overrides = {name: data[name] for name in SAMPLING_FIELDS if name in data}
    return dataclasses.replace(default, **overrides) if overrides else default


def _stop_strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ValueError(f"stop={value!r} is invalid; use a string or a list of strings")


def read_requests(path: Path, tokenizer: Tokenizer, defaults: JobDefaults,
                  report: Callable[[str], None]) -> tuple[list[JobRequest], int]:
    """Parse every line of a JSONL file; return the requests and the number of malformed lines.

    `report` receives one message per malformed line. Blank lines are ignored. A repeated id
    is malformed, because results are matched to requests by id.
    """
    requests: list[JobRequest] = []
    first_line: dict[str, int] = {}
    malformed = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                job = parse_line(text, line_number, tokenizer, defaults)
                key = id_key(job.id)
                if key in first_line:
                    raise MalformedLine(f"line {line_number}: duplicate id {job.id!r} "
                                        f"(first on line {first_line[key]})")
            except MalformedLine as error:
                malformed += 1
                report(f"{path}: {error}; skipped")
                continue
            first_line[key] = line_number
            requests.append(job)
    return requests, malformed


def id_key(request_id: Any) -> str:
    """Return the key that matches results to requests; it distinguishes 7 from "7"."""
    return json.dumps(request_id)


# The output file.

def finished_ids(path: Path) -> set[str]:
    """Return the id keys of the results already in `path`, dropping a torn last line.

    A job killed while writing can leave a last line without its newline. That line is cut
    off, so the request runs again and its new result starts on a line of its own.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        logger.warning("%s: removing an incomplete last line left by an interrupted run", path)
        with open(path, "r+b") as handle:
            handle.truncate(complete_end)
    done = set()
    for line_number, line in enumerate(data[:complete_end].splitlines(), start=1):
        try:
            done.add(id_key(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s: line %d is not a result record; ignored", path, line_number)
    return done


class ResultWriter:
    """Writer that appends one JSON line per finished request and makes it durable before returning."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar of finished requests, with generated tokens per second and an ETA."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, unit="req", disable=not enabled, dynamic_ncols=True)
        self._start = time.perf_counter()
        self._tokens = 0

    def update(self, requests: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
        self._bar.update(requests)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.close()


def error_record(job: JobRequest, message: str) -> dict[str, Any]:
    return {"id": job.id, "finish_reason": "error", "error": message, "line": job.line}


# Running.

def cache_length_for(jobs: Iterable[JobRequest], context: int, cap: int | None) -> int:
    """Return the KV cache length for a job: the longest request's need as a power of two.

    It never exceeds the model's context or `cap`; requests that need more get an error record.
    """
    needs = [len(job.request.prompt_ids) + job.request.max_new_tokens for job in jobs
             if job.request is not None and isinstance(job.request.max_new_tokens, int)]
    length = min(next_power_of_two(max(needs, default=1)), context)
    return min(length, cap) if cap else length


def run_job(engine, jobs: Iterable[JobRequest], writer: ResultWriter, summary: JobSummary,
            on_progress: Callable[[int, int], None] = lambda requests, tokens: None) -> JobSummary:
    """Run jobs with continuous batching, writing each result or error as it finishes.

    `on_progress(requests, tokens)` is called after each write with the request count (1)
    and the tokens it generated.
    """
    runnable = []
    for job in jobs:
        message = job.error
        if message is None:
            try:
                engine.check_request(job.request)
            except RequestError as error:
                message = str(error)
        if message is None:
            runnable.append(job.request)
            continue
        writer.write(error_record(job, message))
        summary.failed += 1
        on_progress(1, 0)

    start = time.perf_counter()
    for result in engine.generate(runnable) if runnable else ():
        writer.write(result.to_record())
        summary.completed += 1
        summary.prompt_tokens += result.num_prompt_tokens
        summary.generated_tokens += len(result.token_ids)
        summary.ttft_s.append(result.ttft_s)
        if result.ttit_s is not None:
            summary.ttit_s.append(result.ttit_s)
        on_progress(1, len(result.token_ids))
    summary.wall_s = time.perf_counter() - start
    return summary
