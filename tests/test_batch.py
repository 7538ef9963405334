"""Batch jobs: continuous batching, resumption after a kill, and bad input lines."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from jaxinfer import batch
from jaxinfer.checkpoint import save_checkpoint
from jaxinfer.convert import load_source
from jaxinfer.engine import Request
from jaxinfer.load import build_engine
from jaxinfer.rules import load_rules

PROMPTS = ["Once upon a time", "Lily", "The dog was", "A big red ball", "Tom and Sue went"]


@pytest.fixture(scope="module")
def stories(stories260k_dir, tmp_path_factory):
    """The stories260K model as a checkpoint, and a folder with its llama2.c files."""
    folder = tmp_path_factory.mktemp("stories_batch")
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copy(stories260k_dir / name, folder / name)
    checkpoint = save_checkpoint(folder / "ckpt", load_source(folder / "stories260K.bin"))
    return checkpoint, folder


@pytest.fixture(scope="module")
def engine(stories):
    checkpoint, _ = stories
    return build_engine(checkpoint, load_rules("single"), devices=jax.devices()[:1], slots=3,
                        cache_len=512, steps_per_call=4)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def job_requests(engine, records, tmp_path):
    reports = []
    jobs, malformed = batch.read_requests(write_jsonl(tmp_path / "in.jsonl", records), engine.tokenizer,
                                          batch.JobDefaults(max_new_tokens=20), reports.append)
    return jobs, malformed, reports


def run(engine, jobs, tmp_path):
    output = tmp_path / "out.jsonl"
    summary = batch.JobSummary(total=len(jobs), skipped_done=0, malformed=0)
    with batch.ResultWriter(output) as writer:
        batch.run_job(engine, jobs, writer, summary)
    return {record["id"]: record for record in read_jsonl(output)}, summary


def test_continuous_batching_matches_alone(engine, tmp_path):
    records = [{"id": i, "prompt": PROMPTS[i % 5], "max_new_tokens": 5 + 9 * i} for i in range(9)]
    jobs, _, _ = job_requests(engine, records, tmp_path)
    results, summary = run(engine, jobs, tmp_path)
    assert summary.completed == 9
    for job in jobs:
        (alone,) = list(engine.generate([Request(job.request.prompt_ids, job.request.max_new_tokens)]))
        assert results[job.id]["token_ids"] == alone.token_ids, f"request {job.id}"
        assert results[job.id]["text"] == alone.text


def test_request_longer_than_context(engine, tmp_path):
    records = [{"id": "long", "prompt": "Lily " * 600}, {"id": "ok", "prompt": "Lily"}]
    jobs, _, _ = job_requests(engine, records, tmp_path)
    results, summary = run(engine, jobs, tmp_path)
    assert results["long"]["finish_reason"] == "error"
    assert "more than" in results["long"]["error"]
    assert results["ok"]["finish_reason"] == "length"
    assert summary.failed == 1
    assert summary.completed == 1


def test_invalid_settings_become_error_records(engine, tmp_path):
    records = [{"id": "t", "prompt": "Lily", "temperature": -1},
               {"id": "m", "prompt": "Lily", "max_new_tokens": 0},
               {"id": "chat", "messages": [{"role": "user", "content": "hi"}]}]
    jobs, _, _ = job_requests(engine, records, tmp_path)
    results, _ = run(engine, jobs, tmp_path)
    assert "temperature=-1 is invalid" in results["t"]["error"]
    assert "max_new_tokens=0 is invalid" in results["m"]["error"]
    assert "chat template" in results["chat"]["error"]


def test_malformed_lines_reported_and_skipped(engine, tmp_path):
    records = [{"id": "a", "prompt": "Lily"}, "{not json", "[1, 2]", {"id": "b"},
               {"id": "c", "prompt": "Tom", "colour": "red"}, {"id": "a", "prompt": "again"},
               {"id": "d", "prompt": "Sue"}]
    jobs, malformed, reports = job_requests(engine, records, tmp_path)
    assert [job.id for job in jobs] == ["a", "d"]
    assert malformed == 5
    assert "line 2: invalid JSON" in reports[0]
    assert "line 3: expected a JSON object, got list" in reports[1]
    assert "line 4: give exactly one of 'prompt'" in reports[2]
    assert "line 5: unknown field 'colour'" in reports[3]
    assert "line 6: duplicate id 'a' (first on line 1)" in reports[4]


def test_torn_last_line_is_dropped(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": 1, "text": "x"}) + "\n" + '{"id": 2, "te')
    assert batch.finished_ids(output) == {"1"}
    assert output.read_text().endswith("}\n")


def test_ids_keep_their_type(tmp_path):
    output = write_jsonl(tmp_path / "out.jsonl", [{"id": 7}, {"id": "7"}])
    assert batch.finished_ids(output) == {"7", '"7"'}


def test_summary_percentiles():
    summary = batch.JobSummary(total=3, skipped_done=0, malformed=0, completed=3, generated_tokens=30,
                               wall_s=2.0, ttft_s=[0.1, 0.2, 0.3], ttit_s=[0.01, 0.02, 0.03])
    data = summary.to_dict()
    assert data["tokens_per_s"] == 15.0
    assert data["ttft_s"]["p50"] == pytest.approx(0.2)
    assert data["ttit_s"]["p90"] == pytest.approx(0.028)
    assert "TTFT ms: p50 200.0, p90 280.0, p99 298.0" in summary.format()


# The command line, in fresh processes, as a user runs it.

def jaxinfer_batch(folder, input_path, output_path, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAXINFER_CACHE"] = str(folder / "cache")
    command = [sys.executable, "-m", "jaxinfer.cli", "batch", str(input_path), str(output_path),
               "--model", str(folder / "stories260K.bin"), "--rules", "single", "--no-progress", *extra]
    return command, env


def test_empty_input_file(stories, tmp_path):
    _, folder = stories
    input_path = write_jsonl(tmp_path / "in.jsonl", [])
    command, env = jaxinfer_batch(folder, input_path, tmp_path / "out.jsonl")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "requests: 0 (0 completed" in result.stdout
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_killed_job_resumes_without_loss(stories, engine, tmp_path):
    _, folder = stories
    records = [{"id": f"r{i}", "prompt": PROMPTS[i % 5], "max_new_tokens": 40 + (i * 7) % 50}
               for i in range(40)]
    input_path = write_jsonl(tmp_path / "in.jsonl", records)
    output = tmp_path / "out.jsonl"
    command, env = jaxinfer_batch(folder, input_path, output, "--slots", "2", "--steps-per-call", "2")

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and len(output.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the job finished before it could be killed; make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_jsonl(output)
    assert 5 <= len(partial) < len(records)

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"{len(partial)} already done" in result.stdout
    final = read_jsonl(output)
    ids = [record["id"] for record in final]
    assert sorted(ids) == sorted(r["id"] for r in records)
    assert len(ids) == len(set(ids))

    jobs, _, _ = job_requests(engine, records, tmp_path)
    expected = {r.request.id: r.token_ids for r in engine.generate([job.request for job in jobs])}
    assert {r["id"]: r["token_ids"] for r in final} == expected
