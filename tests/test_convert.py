"""Checkpoint converters checked against transformers' own loading of the same files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

import jaxinfer.tokenizer
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.convert import CheckpointError, detect_format, load_source
from jaxinfer.convert.gguf import gguf_metadata, gguf_tokenizer, load_gguf, open_gguf
from jaxinfer.convert.hf import load_hf
from jaxinfer.convert.llama2c import load_llama2c
from jaxinfer.model.params import check_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GGMLType = gguf.GGMLQuantizationType
SMALL_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# --- Inverse mapping: jaxinfer's tree back to HF names and [out, in] layout ----------------


def hf_state_from_params(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Rebuild the HF state dict a converted tree came from (no lm_head when tied)."""
    embed = config.embed_dim
    state = {
        "model.embed_tokens.weight": params["embed"],
        "model.norm.weight": params["final_norm"],
    }
    if "lm_head" in params:
        state["lm_head.weight"] = params["lm_head"].T
    for index, layer in enumerate(params["layers"]):
        prefix = f"model.layers.{index}."
        state[prefix + "input_layernorm.weight"] = layer["attn_norm"]
        state[prefix + "post_attention_layernorm.weight"] = layer["mlp_norm"]
        for short, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            state[prefix + f"self_attn.{hf}.weight"] = layer[short].reshape(embed, -1).T
        state[prefix + "self_attn.o_proj.weight"] = layer["wo"].reshape(-1, embed).T
        for short, hf in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
            if short in layer:
                state[prefix + f"self_attn.{hf}.bias"] = layer[short].reshape(-1)
        if "bo" in layer:
            state[prefix + "self_attn.o_proj.bias"] = layer["bo"]
        if "q_norm" in layer:
            state[prefix + "self_attn.q_norm.weight"] = layer["q_norm"]
            state[prefix + "self_attn.k_norm.weight"] = layer["k_norm"]
        state[prefix + "mlp.gate_proj.weight"] = layer["w_gate"].T
        state[prefix + "mlp.up_proj.weight"] = layer["w_up"].T
        state[prefix + "mlp.down_proj.weight"] = layer["w_down"].T
    return state


def assert_params_match(config: ModelConfig, params: dict, reference: dict) -> None:
    """Check every array of `params` against a transformers state dict, exactly."""
    check_params(config, params)
    for leaf in [params["embed"], *[a for layer in params["layers"] for a in layer.values()]]:
        assert leaf.dtype == np.float32
    expected = {
        name: tensor.detach().to(torch.float32).numpy() for name, tensor in reference.items()
    }
    if config.tie_embeddings:
        assert "lm_head" not in params
        expected.pop("lm_head.weight", None)
    got = hf_state_from_params(config, params)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# --- HF safetensors ------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# case -> (family, extra config fields, save_pretrained arguments, dtype)
HF_CASES = {
    "llama": ("llama", {}, {}, torch.float32),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, {}, torch.float32),
    "llama3_rope_sharded": ("llama", {"rope_scaling": LLAMA3_ROPE},
                            {"max_shard_size": "50KB"}, torch.float32),
    "llama_bfloat16": ("llama", {}, {}, torch.bfloat16),
    "llama_float16": ("llama", {}, {}, torch.float16),
    "llama_attention_bias": ("llama", {"attention_bias": True}, {}, torch.float32),
    "qwen2": ("qwen2", {}, {}, torch.float32),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}, {}, torch.float32),
    "qwen3": ("qwen3", {"head_dim": 32}, {}, torch.float32),
    "qwen3_attention_bias": ("qwen3", {"head_dim": 32, "attention_bias": True}, {},
                             torch.float32),
}

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_hf_model(family: str, extra: dict, seed: int = 0):
    config_name, model_name = HF_CLASSES[family]
    hf_config = getattr(transformers, config_name)(**{**SMALL_SHAPE, **extra})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(hf_config).eval()


def save_hf_model(directory: Path, family: str, extra: dict, save_args: dict | None = None,
                  dtype=torch.float32):
    model = make_hf_model(family, extra).to(dtype)
    model.save_pretrained(directory, **(save_args or {}))
    return model


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_weights_match_transformers(case: str, tmp_path: Path) -> None:
    family, extra, save_args, dtype = HF_CASES[case]
    model = save_hf_model(tmp_path, family, extra, save_args, dtype)
    if "max_shard_size" in save_args:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1

    converted = load_hf(tmp_path, with_tokenizer=False)

    assert converted.tokenizer is None
    assert converted.source == str(tmp_path)
    assert_params_match(converted.config, converted.params, model.state_dict())


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_config_fields(case: str, tmp_path: Path) -> None:
    family, extra, save_args, dtype = HF_CASES[case]
    save_hf_model(tmp_path, family, extra, save_args, dtype)

    config = load_hf(tmp_path, with_tokenizer=False).config

    assert config.family == family
    assert config.vocab_size == 256
    assert config.embed_dim == 64
    assert config.mlp_dim == 128
    assert config.num_layers == 2
    assert config.num_heads == 4
    assert config.num_kv_heads == 2
    assert config.head_dim == extra.get("head_dim", 16)
    assert config.max_seq_len == 256
    assert config.tie_embeddings == extra.get("tie_word_embeddings", False)
    attention_bias = extra.get("attention_bias", False)
    assert config.qkv_bias == (family == "qwen2" or attention_bias)
    assert config.out_bias == (family != "qwen2" and attention_bias)
    assert config.qk_norm == (family == "qwen3")
    expected_scaling = RopeScaling(8.0, 1.0, 4.0, 64) if "rope_scaling" in extra else None
    assert config.rope_scaling == expected_scaling


def test_hf_names_without_model_prefix(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    model = save_hf_model(tmp_path, "llama", {"tie_word_embeddings": True})
    state = {name.removeprefix("model."): tensor.numpy()
             for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))

    converted = load_hf(tmp_path, with_tokenizer=False)

    assert_params_match(converted.config, converted.params, model.state_dict())


def test_hf_truncated_safetensors(tmp_path: Path) -> None:
    save_hf_model(tmp_path, "llama", {})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_hf(tmp_path, with_tokenizer=False)
    assert str(weights) in str(error.value)


def test_hf_missing_tensor(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    model = save_hf_model(tmp_path, "llama", {})
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()
             if name != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))

    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_hf(tmp_path, with_tokenizer=False)


def test_hf_missing_untied_lm_head(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    model = save_hf_model(tmp_path, "qwen2", {})
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()
             if name != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))

    with pytest.raises(CheckpointError, match=r"lm_head\.weight is missing"):
        load_hf(tmp_path, with_tokenizer=False)


def test_hf_missing_shard(tmp_path: Path) -> None:
    save_hf_model(tmp_path, "llama", {}, {"max_shard_size": "50KB"})
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()

    with pytest.raises(CheckpointError, match=shard.name):
        load_hf(tmp_path, with_tokenizer=False)


def test_hf_shape_mismatch(tmp_path: Path) -> None:
    save_hf_model(tmp_path, "llama", {})
    config_path = tmp_path / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["intermediate_size"] = 96
    config_path.write_text(json.dumps(hf_config))

    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \(128, 64\), "
                                              r"expected \(96, 64\)"):
        load_hf(tmp_path, with_tokenizer=False)


def test_hf_without_weights(tmp_path: Path) -> None:
    transformers.LlamaConfig(**SMALL_SHAPE).save_pretrained(tmp_path)

    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weight files"):
        load_hf(tmp_path, with_tokenizer=False)


@pytest.mark.parametrize("config_class, architecture", [
    ("GPT2Config", "GPT2LMHeadModel"),
    ("MixtralConfig", "MixtralForCausalLM"),
])
def test_hf_unsupported_architecture(config_class: str, architecture: str,
                                     tmp_path: Path) -> None:
    hf_config = getattr(transformers, config_class)()
    hf_config.architectures = [architecture]
    hf_config.save_pretrained(tmp_path)

    with pytest.raises(CheckpointError, match=architecture) as error:
        load_hf(tmp_path, with_tokenizer=False)
    assert "config.json" in str(error.value)


def test_hf_invalid_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")

    with pytest.raises(CheckpointError, match="cannot read the JSON config"):
        load_hf(tmp_path, with_tokenizer=False)


def test_hf_quantized_config_rejected(tmp_path: Path) -> None:
    hf_config = transformers.LlamaConfig(**SMALL_SHAPE).to_dict()
    hf_config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))

    with pytest.raises(CheckpointError, match="quant_method='gptq'"):
        load_hf(tmp_path, with_tokenizer=False)


# --- GGUF ----------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def to_llama_cpp_rope_order(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp's converter does for `llama` models."""
    rows = weight.shape[0]
    split = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, architecture: str, model, matrix_type=GGMLType.F32,
               skip: tuple[str, ...] = (), overrides: dict | None = None,
               store_vocab_size: bool = True) -> None:
    """Write a transformers model as a GGUF file laid out like llama.cpp's converter output."""
    hf_config = model.config
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if store_vocab_size:
        writer.add_vocab_size(hf_config.vocab_size)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue
        if name in _GGUF_GLOBAL_NAMES:
            gguf_name = _GGUF_GLOBAL_NAMES[name]
        else:
            _, _, index, suffix = name.split(".", 3)
            gguf_name = f"blk.{index}.{_GGUF_LAYER_NAMES[suffix]}"
        if gguf_name in skip:
            continue
        array = tensor.detach().to(torch.float32).numpy()
        if architecture == "llama" and ".q_proj." in name:
            array = to_llama_cpp_rope_order(array, hf_config.num_attention_heads)
        if architecture == "llama" and ".k_proj." in name:
            array = to_llama_cpp_rope_order(array, hf_config.num_key_value_heads)
        if overrides and gguf_name in overrides:
            writer.add_tensor(gguf_name, overrides[gguf_name])
        elif array.ndim == 2 and matrix_type != GGMLType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, matrix_type),
                              raw_dtype=matrix_type)
        else:
            writer.add_tensor(gguf_name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_from_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)


# architecture -> (family, extra HF config fields). Qwen3 uses head_dim 128 because
# transformers' GGUF loader ignores qwen3.attention.key_length and assumes Qwen3's default.
GGUF_CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 128}),
}


@pytest.mark.parametrize("architecture", sorted(GGUF_CASES))
def test_gguf_float32_matches_original(architecture: str, tmp_path: Path) -> None:
    family, extra = GGUF_CASES[architecture]
    model = make_hf_model(family, extra)
    path = tmp_path / f"{architecture}.gguf"
    write_gguf(path, architecture, model)
    # The test writer follows llama.cpp's layout if transformers reads the file back exactly.
    assert_params_match(*_as_config_and_params(model), transformers_from_gguf(path).state_dict())

    converted = load_gguf(path, with_tokenizer=False)

    assert converted.config.family == family
    assert converted.config.head_dim == extra.get("head_dim", 16)
    assert_params_match(converted.config, converted.params, model.state_dict())


def _as_config_and_params(model) -> tuple[ModelConfig, dict]:
    """Convert a transformers model by saving it as safetensors (a second, independent path)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        converted = load_hf(directory, with_tokenizer=False)
    return converted.config, converted.params


@pytest.mark.parametrize("matrix_type", [GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0,
                                         GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0],
                         ids=lambda matrix_type: matrix_type.name)
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_gguf_quantized_matches_transformers(architecture: str, matrix_type, tmp_path: Path) -> None:
    family, extra = GGUF_CASES[architecture]
    model = make_hf_model(family, extra)
    path = tmp_path / f"{architecture}-{matrix_type.name}.gguf"
    write_gguf(path, architecture, model, matrix_type)
    reader = gguf.GGUFReader(path)
    assert reader.get_tensor(0).tensor_type == matrix_type

    converted = load_gguf(path, with_tokenizer=False)

    assert_params_match(converted.config, converted.params,
                        transformers_from_gguf(path).state_dict())
    # Quantization error stays small, so the rows were not shuffled against the original.
    original = hf_state_from_params(*_as_config_and_params(model))
    restored = hf_state_from_params(converted.config, converted.params)
    for name, value in original.items():
        np.testing.assert_allclose(restored[name], value, atol=0.02, err_msg=name)


def test_gguf_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "missing.gguf"
    write_gguf(path, "llama", make_hf_model("llama", {}), skip=("blk.1.ffn_up.weight",))

    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight is missing"):
        load_gguf(path, with_tokenizer=False)


def test_gguf_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "int.gguf"
    overrides = {"blk.0.ffn_up.weight": np.zeros((128, 64), dtype=np.int32)}
    write_gguf(path, "llama", make_hf_model("llama", {}), overrides=overrides)

    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight has integer type I32"):
        load_gguf(path, with_tokenizer=False)


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        load_gguf(path, with_tokenizer=False)


@pytest.fixture(scope="module")
def small_gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, "llama", make_hf_model("llama", {}), GGMLType.Q8_0)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.9, 0.9999])
def test_gguf_truncated(fraction: float, small_gguf_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(small_gguf_bytes[:max(8, int(len(small_gguf_bytes) * fraction))])

    with pytest.raises(CheckpointError, match="truncated") as error:
        load_gguf(path, with_tokenizer=False)
    assert str(path) in str(error.value)


def test_gguf_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load_gguf(path, with_tokenizer=False)


def test_gguf_garbage_after_magic(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(b"GGUF" + noise)

    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf(path, with_tokenizer=False)


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf: Path, smollm2_transformers):
    """The default model converted by jaxinfer and loaded by transformers."""
    converted = load_gguf(smollm2_gguf, with_tokenizer=False)
    return converted, smollm2_transformers


@pytest.mark.slow
def test_smollm2_gguf_weights_match_transformers(smollm2_pair) -> None:
    converted, reference = smollm2_pair

    assert_params_match(converted.config, converted.params, reference.state_dict())


@pytest.mark.slow
def test_smollm2_gguf_config(smollm2_pair) -> None:
    converted, reference = smollm2_pair
    config, hf = converted.config, reference.config

    assert config.family == "llama"
    assert config.vocab_size == hf.vocab_size == 49152
    assert config.embed_dim == hf.hidden_size == 576
    assert config.mlp_dim == hf.intermediate_size == 1536
    assert config.num_layers == hf.num_hidden_layers == 30
    assert config.num_heads == hf.num_attention_heads == 9
    assert config.num_kv_heads == hf.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.rope_theta == 100000.0
    assert config.rope_scaling is None
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.max_seq_len == 8192
    assert config.tie_embeddings
    assert not config.qkv_bias
    assert config.bos_token_id == 1
    assert config.eos_token_ids == (2,)


# --- llama2.c ------------------------------------------------------------------------------


def read_reference_ids(folder: Path) -> list[int]:
    return [int(token) for token in (folder / "greedy_from_bos_256.ids").read_text().split()]


def transformers_llama(config: ModelConfig, params: dict):
    """Load a converted tree into transformers' Llama implementation."""
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim,
        intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {name: torch.from_numpy(np.ascontiguousarray(value))
             for name, value in hf_state_from_params(config, params).items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def test_llama2c_greedy_matches_reference(stories260k_dir: Path) -> None:
    converted = load_llama2c(stories260k_dir / "stories260K.bin", with_tokenizer=False)
    expected = read_reference_ids(stories260k_dir)
    model = transformers_llama(converted.config, converted.params)

    with torch.no_grad():
        output = model.generate(torch.tensor([[1]]), max_new_tokens=len(expected),
                                do_sample=False, eos_token_id=None, pad_token_id=0)

    assert output[0, 1:].tolist() == expected


def test_llama2c_config(stories260k_dir: Path) -> None:
    config = load_llama2c(stories260k_dir / "stories260K.bin", with_tokenizer=False).config

    assert config.family == "llama"
    assert config.vocab_size == 512
    assert config.embed_dim == 64
    assert config.mlp_dim == 172
    assert config.num_layers == 5
    assert config.num_heads == 8
    assert config.num_kv_heads == 4
    assert config.head_dim == 8
    assert config.max_seq_len == 512
    assert config.tie_embeddings
    assert config.rms_norm_eps == 1e-5


def _llama2c_v0_arrays(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """Split a version-0 file into its named arrays (independent of the converter)."""
    raw = path.read_bytes()
    header = struct.unpack_from("<7i", raw)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = header
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    shapes = [
        ("token_embedding", (abs(vocab), dim)), ("rms_att", (layers, dim)),
        ("wq", (layers, dim, dim)), ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)), ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim)), ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)), ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if vocab < 0:
        shapes.append(("wcls", (-vocab, dim)))
    floats = np.frombuffer(raw, dtype="<f4", offset=28)
    arrays, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        arrays[name] = floats[offset:offset + size].reshape(shape)
        offset += size
    assert offset == floats.size
    return header, arrays


def _write_v0(path: Path, header, arrays: dict[str, np.ndarray]) -> None:
    order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
             "rms_final", "freq_cis_real", "freq_cis_imag", "wcls"]
    with open(path, "wb") as file:
        file.write(struct.pack("<7i", *header))
        for name in order:
            if name in arrays:
                file.write(arrays[name].astype("<f4").tobytes())


def _write_v1(path: Path, header, arrays: dict[str, np.ndarray], shared: bool,
              version: int = 1) -> None:
    order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo",
             "w1", "w2", "w3", "wcls"]
    prefix = struct.pack("<Ii7iB", 0x616B3432, version, *header, int(shared))
    with open(path, "wb") as file:
        file.write(prefix + b"\0" * (256 - len(prefix)))
        for name in order:
            if name in arrays and not (shared and name == "wcls"):
                file.write(arrays[name].astype("<f4").tobytes())


def assert_trees_equal(first: dict, second: dict) -> None:
    assert sorted(first) == sorted(second)
    for key in ("embed", "final_norm", "lm_head"):
        if key in first:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    for index, (a, b) in enumerate(zip(first["layers"], second["layers"], strict=True)):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"layer {index} {name}")


def test_llama2c_version1_matches_version0(stories260k_dir: Path, tmp_path: Path) -> None:
    source = stories260k_dir / "stories260K.bin"
    header, arrays = _llama2c_v0_arrays(source)
    v1_path = tmp_path / "stories260K_v1.bin"
    _write_v1(v1_path, header, arrays, shared=True)

    v0 = load_llama2c(source, with_tokenizer=False)
    v1 = load_llama2c(v1_path, with_tokenizer=False)

    assert v1.config == v0.config
    assert_trees_equal(v1.params, v0.params)


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_separate_classifier(version: int, stories260k_dir: Path,
                                     tmp_path: Path) -> None:
    header, arrays = _llama2c_v0_arrays(stories260k_dir / "stories260K.bin")
    arrays = dict(arrays)
    wcls = np.random.default_rng(0).standard_normal(arrays["token_embedding"].shape)
    arrays["wcls"] = wcls.astype(np.float32)
    path = tmp_path / f"separate_v{version}.bin"
    if version == 0:
        _write_v0(path, (*header[:5], -header[5], header[6]), arrays)
    else:
        _write_v1(path, header, arrays, shared=False)

    converted = load_llama2c(path, with_tokenizer=False)

    assert not converted.config.tie_embeddings
    assert converted.config.vocab_size == 512
    check_params(converted.config, converted.params)
    np.testing.assert_array_equal(converted.params["lm_head"], arrays["wcls"].T)
    np.testing.assert_array_equal(converted.params["embed"], arrays["token_embedding"])


def test_llama2c_truncated(stories260k_dir: Path, tmp_path: Path) -> None:
    data = (stories260k_dir / "stories260K.bin").read_bytes()
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[:-100])

    with pytest.raises(CheckpointError, match="truncated") as error:
        load_llama2c(path, with_tokenizer=False)
    assert f"has {len(data)} bytes" in str(error.value)
    assert f"the file has {len(data) - 100} bytes" in str(error.value)


def test_llama2c_trailing_bytes(stories260k_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.bin"
    path.write_bytes((stories260k_dir / "stories260K.bin").read_bytes() + b"\0" * 64)

    with pytest.raises(CheckpointError, match="header does not describe the weights"):
        load_llama2c(path, with_tokenizer=False)


def test_llama2c_short_header(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(struct.pack("<3i", 64, 172, 5))

    with pytest.raises(CheckpointError, match="too short for a llama2.c header"):
        load_llama2c(path, with_tokenizer=False)


def test_llama2c_invalid_header(tmp_path: Path) -> None:
    path = tmp_path / "invalid.bin"
    path.write_bytes(struct.pack("<7i", 64, -172, 5, 8, 4, 512, 512) + b"\0" * 64)

    with pytest.raises(CheckpointError, match=r"\['hidden_dim'\] must be positive"):
        load_llama2c(path, with_tokenizer=False)


def test_llama2c_version2_rejected(tmp_path: Path) -> None:
    path = tmp_path / "q80.bin"
    header = struct.pack("<Ii7iBi", 0x616B3432, 2, 64, 172, 5, 8, 4, 512, 512, 1, 64)
    path.write_bytes(header + b"\0" * (256 - len(header)) + b"\0" * 4096)

    with pytest.raises(CheckpointError, match=r"version 2 \(int8 \(Q8_0\) quantized export\) "
                                              "is not supported"):
        load_llama2c(path, with_tokenizer=False)


# --- Format detection ----------------------------------------------------------------------


def test_detect_format_cases(stories260k_dir: Path, tmp_path: Path) -> None:
    save_hf_model(tmp_path / "hf", "llama", {})
    write_gguf(tmp_path / "model.weights", "llama", make_hf_model("llama", {}))
    shutil.copy(stories260k_dir / "stories260K.bin", tmp_path / "stories.bin")

    assert detect_format(tmp_path / "hf") == ("hf", tmp_path / "hf")
    assert detect_format(tmp_path / "hf" / "config.json") == ("hf", tmp_path / "hf")
    assert detect_format(tmp_path / "hf" / "model.safetensors") == ("hf", tmp_path / "hf")
    assert detect_format(tmp_path / "model.weights") == ("gguf", tmp_path / "model.weights")
    assert detect_format(tmp_path / "stories.bin") == ("llama2c", tmp_path / "stories.bin")


def test_load_source_dispatches(stories260k_dir: Path, tmp_path: Path) -> None:
    model = save_hf_model(tmp_path / "hf", "qwen2", {})
    write_gguf(tmp_path / "model.weights", "qwen2", model)

    from_hf = load_source(tmp_path / "hf", with_tokenizer=False)
    from_gguf = load_source(tmp_path / "model.weights", with_tokenizer=False)
    from_llama2c = load_source(stories260k_dir / "stories260K.bin", with_tokenizer=False)

    assert from_hf.config.family == "qwen2"
    assert_params_match(from_gguf.config, from_gguf.params, model.state_dict())
    assert from_llama2c.config.vocab_size == 512


def test_load_source_unknown_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")

    with pytest.raises(CheckpointError, match="cannot detect the checkpoint format"):
        load_source(path)


def test_load_source_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="directory without config.json"):
        load_source(tmp_path)


def test_load_source_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(tmp_path / "absent.gguf")


def test_load_source_pytorch_pickle(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2)}, path)

    with pytest.raises(CheckpointError, match="PyTorch pickle checkpoint"):
        load_source(path)


# --- Tokenizers attached by the converters -------------------------------------------------


def require_tokenizer_api(*names: str) -> None:
    missing = [name for name in names if not hasattr(jaxinfer.tokenizer, name)]
    if missing:
        pytest.skip(f"jaxinfer.tokenizer does not define {missing} yet")


def test_llama2c_finds_tokenizer(stories260k_dir: Path) -> None:
    require_tokenizer_api("ScoredBPETokenizer")
    expected = read_reference_ids(stories260k_dir)

    converted = load_llama2c(stories260k_dir / "stories260K.bin")

    assert converted.tokenizer is not None
    assert converted.tokenizer.decode(expected[:20]).startswith("Once upon a time")


def test_llama2c_explicit_sentencepiece_tokenizer(stories260k_dir: Path) -> None:
    require_tokenizer_api("SentencePieceTokenizer")

    converted = load_llama2c(stories260k_dir / "stories260K.bin",
                             tokenizer_path=stories260k_dir / "tok512.model")

    assert converted.tokenizer is not None
    assert isinstance(converted.tokenizer, jaxinfer.tokenizer.SentencePieceTokenizer)


def test_llama2c_missing_tokenizer(stories260k_dir: Path, tmp_path: Path) -> None:
    shutil.copy(stories260k_dir / "stories260K.bin", tmp_path / "stories260K.bin")

    converted = load_llama2c(tmp_path / "stories260K.bin")

    assert converted.tokenizer is None


@pytest.mark.slow
def test_gguf_embedded_tokenizer(smollm2_gguf: Path) -> None:
    require_tokenizer_api("tokenizer_from_gguf")
    metadata = gguf_metadata(open_gguf(smollm2_gguf), smollm2_gguf)

    tokenizer = gguf_tokenizer(metadata, smollm2_gguf)

    assert tokenizer is not None
    ids = tokenizer.encode("Hello world", add_bos=False)
    assert tokenizer.decode(ids) == "Hello world"


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bare.gguf"
    write_gguf(path, "llama", make_hf_model("llama", {}), store_vocab_size=False)

    converted = load_gguf(path)

    assert converted.tokenizer is None
    assert converted.config.vocab_size == 256


def _write_word_level_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = BackendTokenizer(WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(directory / "tokenizer.json"))


def test_hf_directory_tokenizer(tmp_path: Path) -> None:
    require_tokenizer_api("HFTokenizer")
    save_hf_model(tmp_path, "llama", {})
    _write_word_level_tokenizer(tmp_path)

    converted = load_hf(tmp_path)

    assert isinstance(converted.tokenizer, jaxinfer.tokenizer.HFTokenizer)
    assert converted.tokenizer.encode("hello world", add_bos=False) == [1, 2]


def test_hf_directory_without_tokenizer(tmp_path: Path) -> None:
    save_hf_model(tmp_path, "llama", {})

    assert load_hf(tmp_path).tokenizer is None


def test_load_source_tokenizer_override(stories260k_dir: Path, tmp_path: Path) -> None:
    require_tokenizer_api("SentencePieceTokenizer", "HFTokenizer")
    save_hf_model(tmp_path, "llama", {"vocab_size": 512})
    _write_word_level_tokenizer(tmp_path)

    converted = load_source(tmp_path, tokenizer_path=stories260k_dir / "tok512.model")

    assert isinstance(converted.tokenizer, jaxinfer.tokenizer.SentencePieceTokenizer)


def test_tokenizer_of_another_model_rejected(stories260k_dir: Path, tmp_path: Path) -> None:
    save_hf_model(tmp_path, "llama", {})  # a vocabulary of 256 ids

    expected = "the tokenizer has 512 tokens but the model.s embedding has 256 rows"
    with pytest.raises(CheckpointError, match=expected):
        load_source(tmp_path, tokenizer_path=stories260k_dir / "tok512.model")
