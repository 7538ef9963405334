"""Engine behaviour on a small random model: batching, compilation, sampling and stopping."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.engine import Engine, Request, RequestError
from jaxinfer.model.params import init_random_params
from jaxinfer.rules import load_rules
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer

CONFIG = ModelConfig(family="llama", vocab_size=64, embed_dim=64, mlp_dim=128, num_layers=2,
                     num_heads=8, num_kv_heads=4, head_dim=8, max_seq_len=128)
# Weights large enough that greedy decoding does not collapse onto one repeated token.
PARAMS = init_random_params(CONFIG, seed=1, scale=0.3)
PROMPTS = [[5, 9, 2], list(range(1, 18)), [int(t) for t in np.arange(40) % 60 + 3], [7, 7, 8, 1, 2]]


class CharTokenizer(Tokenizer):
    """One token per character of 'a'..., enough to exercise stop strings."""

    bos_id = None
    eos_ids = ()
    add_bos = False
    chat_template = None
    vocab_size = 26

    def encode(self, text, add_bos=None):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)

    def save(self, directory):
        raise NotImplementedError


def make_engine(slots=4, steps_per_call=4, config=CONFIG, tokenizer=None, table="tp",
                devices=None, **options):
    return Engine(config, PARAMS, load_rules(table), slots=slots, cache_len=128,
                  steps_per_call=steps_per_call, tokenizer=tokenizer, devices=devices, **options)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def run_one(engine, request):
    (result,) = list(engine.generate([request]))
    return result


def test_batch_matches_each_alone(engine):
    requests = [Request(p, max_new_tokens=12, id=i) for i, p in enumerate(PROMPTS)]
    batched = {r.request.id: r.token_ids for r in engine.generate(requests)}
    for request in requests:
        assert batched[request.id] == run_one(engine, request).token_ids, f"prompt {request.id}"


def test_continuous_batching_matches_alone():
    engine = make_engine(slots=2)
    requests = [Request(PROMPTS[i % 4], max_new_tokens=3 + 5 * i, id=i) for i in range(6)]
    results = {r.request.id: r for r in engine.generate(requests)}
    assert sorted(results) == list(range(6))
    for request in requests:
        alone = run_one(engine, dataclasses.replace(request))
        assert results[request.id].token_ids == alone.token_ids, f"request {request.id}"
        assert len(alone.token_ids) == request.max_new_tokens


def test_results_arrive_as_requests_finish(engine):
    requests = [Request(PROMPTS[0], max_new_tokens=20, id="long"),
                Request(PROMPTS[1], max_new_tokens=2, id="short")]
    order = [r.request.id for r in engine.generate(requests)]
    assert order == ["short", "long"]


def test_steady_decode_does_not_recompile(engine, caplog):
    requests = [Request(p, max_new_tokens=10) for p in PROMPTS]
    list(engine.generate(requests))
    before = engine.compiled_programs()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            list(engine.generate([Request(p[::-1], max_new_tokens=30) for p in PROMPTS]))
    finally:
        jax.config.update("jax_log_compiles", False)
    assert engine.compiled_programs() == before
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []


def test_one_prefill_program_per_bucket():
    engine = make_engine()
    engine.warmup([3, 17, 40, 5])
    assert engine.compiled_programs() == {"prefill": 3, "decode": 1}


def test_seeded_sampling_reproducible(engine):
    sampling = SamplingParams(temperature=1.0, seed=7)
    first = run_one(engine, Request(PROMPTS[0], 20, sampling)).token_ids
    second = run_one(engine, Request(PROMPTS[0], 20, sampling)).token_ids
    assert first == second


def test_different_seeds_differ(engine):
    a = run_one(engine, Request(PROMPTS[0], 20, SamplingParams(temperature=1.0, seed=1))).token_ids
    b = run_one(engine, Request(PROMPTS[0], 20, SamplingParams(temperature=1.0, seed=2))).token_ids
    assert a != b


def test_sampling_independent_of_batch_and_steps(engine):
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3)
    alone = run_one(engine, Request(PROMPTS[1], 16, sampling)).token_ids
    others = [Request(p, 16, SamplingParams(temperature=1.0, seed=i), id=i) for i, p in enumerate(PROMPTS)]
    batch = list(engine.generate([*others, Request(PROMPTS[1], 16, sampling, id="x")]))
    in_batch = next(r for r in batch if r.request.id == "x").token_ids
    one_step = run_one(make_engine(steps_per_call=1), Request(PROMPTS[1], 16, sampling)).token_ids
    assert in_batch == alone
    assert one_step == alone


def test_top_k_one_is_greedy(engine):
    greedy = run_one(engine, Request(PROMPTS[2], 12)).token_ids
    top1 = run_one(engine, Request(PROMPTS[2], 12, SamplingParams(temperature=1.5, top_k=1, seed=5)))
    assert top1.token_ids == greedy


def test_tiny_top_p_is_greedy(engine):
    greedy = run_one(engine, Request(PROMPTS[2], 12)).token_ids
    nucleus = run_one(engine, Request(PROMPTS[2], 12, SamplingParams(temperature=1.5, top_p=1e-6, seed=5)))
    assert nucleus.token_ids == greedy


def test_max_new_tokens_respected(engine):
    result = run_one(engine, Request(PROMPTS[0], max_new_tokens=7))
    assert len(result.token_ids) == 7
    assert result.finish_reason == "length"


def test_stops_on_eos():
    greedy = run_one(make_engine(), Request(PROMPTS[3], 12)).token_ids
    eos = next(t for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    engine = make_engine(config=dataclasses.replace(CONFIG, eos_token_ids=(eos,)))
    result = run_one(engine, Request(PROMPTS[3], 12))
    assert result.token_ids == greedy[: greedy.index(eos) + 1]
    assert result.finish_reason == "stop"


def test_stops_on_stop_string():
    tokenizer = CharTokenizer()
    engine = make_engine(tokenizer=tokenizer)
    full = run_one(engine, Request(PROMPTS[1], 16))
    stop = full.text[5:7]
    cut = full.text.index(stop)
    result = run_one(engine, Request(PROMPTS[1], 16, stop=(stop,)))
    assert result.text == full.text[:cut]
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[: cut + len(stop)]


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError, match="prompt of 120 tokens plus max_new_tokens=20 needs 140 positions"):
        engine.check_request(Request([1] * 120, max_new_tokens=20))


def test_empty_prompt(engine):
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.check_request(Request([], max_new_tokens=2))


def test_token_outside_vocabulary(engine):
    with pytest.raises(RequestError, match="outside the vocabulary of 64"):
        engine.check_request(Request([1, 64], max_new_tokens=2))


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -1.0}, "temperature=-1.0 is invalid"),
    ({"temperature": float("nan")}, "temperature=nan is invalid"),
    ({"top_k": -2}, "top_k=-2 is invalid"),
    ({"top_p": 0.0}, r"top_p=0.0 is invalid; use a number in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p=1.5 is invalid"),
    ({"seed": -1}, "seed=-1 is invalid"),
])
def test_invalid_sampling_params(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings)


def test_every_table_matches_one_device():
    from jaxinfer.rules import RULES_DIR

    requests = [Request(p, max_new_tokens=10, id=i) for i, p in enumerate(PROMPTS)]
    reference = make_engine(table="single", devices=jax.devices()[:1])
    expected = {r.request.id: r.token_ids for r in reference.generate(requests)}
    for path in sorted(RULES_DIR.glob("*.toml")):
        if path.name == "single.toml":
            continue
        got = {r.request.id: r.token_ids for r in make_engine(table=str(path)).generate(requests)}
        assert got == expected, path.name


@pytest.mark.parametrize("options, message", [
    ({"slots": 0}, "slots=0 is invalid"),
    ({"steps_per_call": 0}, "steps_per_call=0 is invalid"),
    ({"dtype": "int8"}, "dtype='int8' is not supported"),
    ({"cache_len": -1}, "cache_len=-1 is invalid"),
])
def test_invalid_engine_options(options, message):
    settings = {"slots": 4, "steps_per_call": 4, "cache_len": 128, **options}
    with pytest.raises(ValueError, match=message):
        Engine(CONFIG, PARAMS, load_rules("tp"), **settings)


@pytest.mark.parametrize("request_, message", [
    (Request([1.5, 2.0], 4), "prompt_ids must be integers"),
    (Request([1, 2], 4, stop="ab"), "stop='ab' is invalid; use a tuple of non-empty strings"),
    (Request([1, 2], 4, stop=("",)), r"stop=\(''[,]\) is invalid"),
])
def test_invalid_requests(engine, request_, message):
    with pytest.raises(RequestError, match=message):
        engine.check_request(request_)
