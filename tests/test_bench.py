"""The benchmark harness on a small random model: every figure is measured and plausible."""

import jax
import pytest

from jaxinfer.bench import BenchSettings, format_report, run_benchmark
from jaxinfer.config import ModelConfig
from jaxinfer.engine import Engine
from jaxinfer.model.params import init_random_params
from jaxinfer.rules import load_rules

CONFIG = ModelConfig(family="llama", vocab_size=512, embed_dim=64, mlp_dim=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=256, eos_token_ids=(2,))


def test_benchmark_report():
    params = init_random_params(CONFIG, scale=0.3)
    created = []

    def make_engine(slots, cache_len):
        created.append((slots, cache_len))
        return Engine(CONFIG, params, load_rules("single"), devices=jax.devices()[:1], slots=slots,
                      cache_len=cache_len, steps_per_call=4)

    settings = BenchSettings(prompt_lengths=(5, 40), batch_sizes=(1, 3), decode_tokens=8, repeats=2)
    report = run_benchmark(make_engine, CONFIG, settings)

    assert created == [(1, 64), (1, 64), (3, 64)]
    assert [row["bucket"] for row in report["prefill"]["rows"]] == [16, 64]
    assert all(row["ttft_s"]["median"] > 0 for row in report["prefill"]["rows"])
    assert [row["batch"] for row in report["decode"]] == [1, 3]
    for row in report["decode"]:
        assert row["ttit_s"]["min"] <= row["ttit_s"]["median"] <= row["ttit_s"]["max"]
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] / row["ttit_s"]["median"])
        assert row["compile_s"] > 0
    assert "| 3 |" in format_report(report)


def test_settings_rejected():
    with pytest.raises(ValueError, match="repeats=0 is invalid"):
        BenchSettings(repeats=0)
    with pytest.raises(ValueError, match="batch_sizes=.* is invalid"):
        BenchSettings(batch_sizes=())
