"""The jaxinfer command line, run as a user runs it: in a fresh process that sizes its own devices."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def jaxinfer(*args: str, cache=None, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if cache is not None:
        env["JAXINFER_CACHE"] = str(cache)
    result = subprocess.run([sys.executable, "-m", "jaxinfer.cli", *args], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def stories_model(stories260k_dir, tmp_path_factory):
    """A private copy of stories260K with its tokenizer, and a private conversion cache."""
    folder = tmp_path_factory.mktemp("stories")
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copy(stories260k_dir / name, folder / name)
    return folder / "stories260K.bin", folder / "cache"


@pytest.fixture(scope="module")
def published_ids(stories260k_dir):
    return [int(t) for t in (stories260k_dir / "greedy_from_bos_256.ids").read_text().split()]


def test_generate_json(stories_model, published_ids):
    model, cache = stories_model
    # An empty prompt encodes to BOS alone, so the output is llama2.c's published greedy story.
    result = jaxinfer("generate", "--model", str(model), "--rules", "single", "--max-new-tokens", "40",
                      "--json", "", cache=cache)
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["token_ids"] == published_ids[:40]
    assert record["text"].startswith("Once upon a time")
    assert record["finish_reason"] == "length"
    assert record["ttft_s"] > 0
    assert record["ttit_s"] > 0
    assert "tokens/s" in result.stderr


def test_generate_text_prints_timings(stories_model):
    model, cache = stories_model
    result = jaxinfer("generate", "--model", str(model), "--rules", "dp_tp", "--max-new-tokens", "16",
                      "Once upon a time", "Lily saw a cat", cache=cache)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[0] ")
    assert lines[1].startswith("[1] ")
    assert "TTFT" in lines[-1]
    assert "TTIT" in lines[-1]
    assert "tokens/s" in lines[-1]
    assert "mesh data=2,context=1,tensor=4,expert=1 (dp_tp.toml)" in lines[-1]


def test_table_that_does_not_fit_model(stories_model):
    model, cache = stories_model
    result = jaxinfer("generate", "--model", str(model), "--rules", "tp", "hello", cache=cache, check=False)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: tp.toml: [rules] mlp = ['tensor'] splits weight")
    assert "shard counts that divide 172: 1, 2, 4, 43" in result.stderr


def test_truncated_checkpoint(stories_model, tmp_path):
    model, _ = stories_model
    broken = tmp_path / "broken.bin"
    broken.write_bytes(model.read_bytes()[:5000])
    shutil.copy(model.parent / "tok512.bin", tmp_path / "tok512.bin")
    result = jaxinfer("generate", "--model", str(broken), "--rules", "single", "hi", cache=tmp_path / "cache",
                      check=False)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "truncated" in result.stderr


def test_invalid_sampling_parameter(stories_model):
    model, cache = stories_model
    result = jaxinfer("generate", "--model", str(model), "--rules", "single", "--top-p", "0", "hi",
                      cache=cache, check=False)
    assert result.returncode == 1
    assert result.stderr == "error: top_p=0.0 is invalid; use a number in (0, 1] (1 disables it)\n"


def test_prompt_longer_than_context(stories_model):
    model, cache = stories_model
    result = jaxinfer("generate", "--model", str(model), "--rules", "single", "--max-new-tokens", "600",
                      "hi", cache=cache, check=False)
    assert result.returncode == 1
    assert "more than the model's context of 512" in result.stderr


def test_convert_then_generate(stories_model, tmp_path, published_ids):
    model, _ = stories_model
    out = tmp_path / "converted"
    converted = jaxinfer("convert", str(model), str(out))
    assert "converted" in converted.stdout
    assert (out / "jaxinfer.json").exists()
    result = jaxinfer("generate", "--model", str(out), "--rules", "single", "--max-new-tokens", "8",
                      "--json", "")
    assert json.loads(result.stdout)["token_ids"] == published_ids[:8]


def test_inspect_json_diffs_tables(tmp_path):
    config = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 8192, "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    listings = {}
    for table in ("tp", "dp_tp"):
        out = tmp_path / f"{table}.json"
        result = jaxinfer("inspect", "--config", str(tmp_path / "config.json"), "--rules", table,
                          "--json", str(out))
        assert "layers[*].wq" in result.stdout
        listings[table] = {(a["name"], a["phase"]): a["spec"] for a in json.loads(out.read_text())["arrays"]}
    assert listings["tp"][("layers[*].wq", "all")] == [None, "tensor", None]
    assert listings["tp"][("cache.k[*]", "all")] == [None, "tensor", None, None]
    assert listings["dp_tp"][("cache.k[*]", "all")] == ["data", "tensor", None, None]
    assert listings["dp_tp"][("residual", "decode")] == ["data", None, None]


@pytest.mark.slow
def test_default_model_answers(smollm2_gguf):
    # README's first command: the default model, its default table, eight CPU devices.
    result = jaxinfer("generate", "--chat", "What is the capital of France?")
    assert "Paris" in result.stdout
    assert "mesh data=1,context=1,tensor=8,expert=1 (tp_mlp.toml)" in result.stdout
    assert "TTFT" in result.stdout


def test_undecodable_prompt_bytes(stories_model):
    model, cache = stories_model
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAXINFER_CACHE"] = str(cache)
    command = [sys.executable.encode(), b"-m", b"jaxinfer.cli", b"generate", b"--model", str(model).encode(),
               b"--rules", b"single", b"--max-new-tokens", b"4", b"\xff\xfeLily"]
    result = subprocess.run(command, capture_output=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def test_invalid_max_seq_len(stories_model):
    model, cache = stories_model
    result = jaxinfer("generate", "--model", str(model), "--rules", "single", "--max-seq-len", "0", "hi",
                      cache=cache, check=False)
    assert result.stderr == "error: --max-seq-len=0 is invalid; use an integer >= 1\n"
