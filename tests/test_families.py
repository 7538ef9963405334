"""Each model family against HF transformers, through conversion, Orbax and every rules table.

The models are built by transformers from small configs shaped like real ones (head sizes,
GQA ratios, RoPE settings, biases, QK-norm, tied or separate output embeddings), with random
weights, and saved with `save_pretrained`.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxinfer.checkpoint import save_checkpoint
from jaxinfer.convert import load_source
from jaxinfer.engine import Request
from jaxinfer.load import build_engine
from jaxinfer.rules import RULES_DIR, load_rules

NEW_TOKENS = 17  # the prefill's token, then 16 decode steps
PROMPT = [3, 141, 59, 26, 205, 35, 89, 79, 32, 38, 4]
# Long enough that decode reads the KV cache in more than one block.
LONG_PROMPT = [(7 * i + 3) % 509 for i in range(150)]

# Weights drawn wider than HF's default 0.02, so greedy decoding of a random model does not
# collapse onto one repeated token.
INIT_STD = 0.2

FAMILIES = {
    # Llama 3 8B's layout: separate output embedding, Llama 3 RoPE scaling, 4 query heads per KV head.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=INIT_STD,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=1, eos_token_id=2),
    # Qwen2.5-0.5B's layout: q/k/v biases, tied embeddings, head_dim 64, theta 1e6.
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=512, hidden_size=512, intermediate_size=1152, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=INIT_STD,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen3-0.6B's layout: QK-norm, head_dim 128 larger than hidden / heads, tied embeddings.
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=INIT_STD,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

TABLES = sorted(p.name for p in RULES_DIR.glob("*.toml"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """An HF model of the family, saved and converted, with transformers' greedy reference."""
    torch.manual_seed(0)
    hf_config = FAMILIES[request.param]()
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    hf_dir = tmp_path_factory.mktemp(f"{request.param}_hf")
    model.save_pretrained(hf_dir)

    checkpoint = tmp_path_factory.mktemp(f"{request.param}_orbax") / "ckpt"
    save_checkpoint(checkpoint, load_source(hf_dir))

    references = {}
    for name, prompt in (("short", PROMPT), ("long", LONG_PROMPT)):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids = out.sequences[0, len(prompt):].tolist()
        references[name] = (ids, torch.stack(out.logits, dim=1)[0].numpy())
    return request.param, checkpoint, references


def check_against_reference(name, table, result, hf_ids, hf_logits):
    assert len(set(hf_ids)) > 3, "the reference output is degenerate; the test would prove little"
    assert result.token_ids == hf_ids
    assert result.logits.shape == hf_logits.shape
    for step in range(NEW_TOKENS):
        error = np.abs(result.logits[step] - hf_logits[step]).max() / np.abs(hf_logits[step]).max()
        assert error < 1e-4, f"{name} on {table}: step {step} relative error {error:.2e}"


@pytest.mark.parametrize("table", TABLES)
def test_family_matches_transformers(family, table):
    name, checkpoint, references = family
    devices = jax.devices()[:1] if table == "single.toml" else jax.devices()
    engine = build_engine(checkpoint, load_rules(table), devices=devices, slots=2, cache_len=64,
                          steps_per_call=4, return_logits=True)
    (result,) = list(engine.generate([Request(PROMPT, max_new_tokens=NEW_TOKENS)]))
    check_against_reference(name, table, result, *references["short"])


def test_family_long_prompt_matches_transformers(family):
    name, checkpoint, references = family
    engine = build_engine(checkpoint, load_rules("tp"), slots=2, cache_len=512, steps_per_call=4,
                          return_logits=True)
    (result,) = list(engine.generate([Request(LONG_PROMPT, max_new_tokens=NEW_TOKENS)]))
    check_against_reference(name, "tp.toml", result, *references["long"])
