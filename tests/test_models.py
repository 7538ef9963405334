"""Real checkpoints end to end: greedy output equals the reference implementations' output."""

import jax
import pytest
import torch
import transformers

from jaxinfer.checkpoint import save_checkpoint
from jaxinfer.convert import load_source
from jaxinfer.engine import Request
from jaxinfer.load import build_engine
from jaxinfer.rules import load_rules

SMOLLM2_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf, smollm2_transformers):
    """Prompt ids and 20 greedy ids from transformers on the same GGUF."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    prompt_ids = tokenizer(SMOLLM2_PROMPT)["input_ids"]
    with torch.no_grad():
        out = smollm2_transformers.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False)
    return prompt_ids, out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("table", ["tp_mlp", "single"])
def test_smollm2_greedy_matches_transformers(smollm2_checkpoint, smollm2_reference, table):
    prompt_ids, expected = smollm2_reference
    devices = jax.devices()[:1] if table == "single" else jax.devices()
    engine = build_engine(smollm2_checkpoint, load_rules(table), devices=devices, slots=1, cache_len=64)
    assert engine.tokenizer.encode(SMOLLM2_PROMPT) == prompt_ids

    (result,) = list(engine.generate([Request(prompt_ids, max_new_tokens=20)]))
    assert result.token_ids == expected
    assert "Paris" in result.text


@pytest.fixture(scope="module")
def stories260k(stories260k_dir, tmp_path_factory):
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("stories") / "ckpt",
                                 load_source(stories260k_dir / "stories260K.bin"))
    ids = [int(t) for t in (stories260k_dir / "greedy_from_bos_256.ids").read_text().split()]
    text = (stories260k_dir / "greedy_from_bos_256.txt").read_text()
    return checkpoint, ids, text


@pytest.mark.parametrize("table", ["single", "dp_tp"])
def test_stories260k_matches_llama2c(stories260k, table):
    checkpoint, expected_ids, expected_text = stories260k
    devices = jax.devices()[:1] if table == "single" else jax.devices()
    engine = build_engine(checkpoint, load_rules(table), devices=devices, slots=2, cache_len=512,
                          steps_per_call=16)
    bos = engine.tokenizer.bos_id

    (result,) = list(engine.generate([Request([bos], max_new_tokens=len(expected_ids))]))
    assert result.token_ids == expected_ids
    assert result.text == expected_text
