"""Read llama.cpp GGUF checkpoints of the llama, qwen2 and qwen3 architectures."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.convert import GGUF_MAGIC, CheckpointError, ConvertedModel
from jaxinfer.convert.layout import as_float32, build_params, check_shape, interleaved_to_half
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

GGMLType = gguf.GGMLQuantizationType

# llama.cpp's convert_hf_to_gguf.py reorders q/k rows into adjacent-pair RoPE order only for
# architectures that llama.cpp runs with "normal" RoPE. It runs qwen2 and qwen3 with NEOX RoPE
# (HF's half-split order), so their rows are stored unpermuted.
_PERMUTED_ARCHITECTURES = frozenset({"llama"})

# Integer element types, which never hold weights. Every other type goes through gguf.quants.
_INTEGER_TYPES = frozenset({GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64})

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_tensor_name(hf_name: str) -> str:
    """Map an HF tensor name to the GGUF name llama.cpp gives it (`blk.N.attn_q.weight`, ...)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_PATTERN.fullmatch(hf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for tensor {hf_name}")
    return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """Open a GGUF file, raising CheckpointError if it is not GGUF, truncated or corrupt."""
    path = Path(path)
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}"
        )
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as error:
        # gguf reads through a memory map, so a short file surfaces as a failed slice or reshape.
        raise CheckpointError(
            f"{path}: cannot parse the GGUF file ({type(error).__name__}: {error}); the file "
            f"({path.stat().st_size} bytes) is truncated or corrupt, so download it again"
        ) from error

    size = path.stat().st_size
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} ends at byte {end} but the file has {size} "
                "bytes; the file is truncated, so download it again"
            )
    return reader


def gguf_metadata(reader: gguf.GGUFReader, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Decode every key-value field of an open GGUF file into Python values."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: cannot decode GGUF metadata {key}: {error}") from error
    return metadata


def dequantize_tensor(tensor: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """Return a GGUF tensor (`gguf.ReaderTensor`) as float32 in numpy's axis order.

    Supports F32, F16, BF16, F64 and every block-quantized type gguf.quants implements
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the IQ types in gguf 0.19).
    """
    qtype = GGMLType(tensor.tensor_type)
    if qtype == GGMLType.F64:
        return tensor.data.astype(np.float32)
    if qtype in _INTEGER_TYPES:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has integer type {qtype.name}; weights must be "
            "float or block-quantized"
        )
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as error:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf "
            f"{_gguf_version()} cannot dequantize; requantize the model to Q8_0, Q4_0 or F16"
        ) from error
    return as_float32(values)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def gguf_config(metadata: dict[str, Any], tensors: dict[str, Any], path: str) -> ModelConfig:
    """Build the ModelConfig from GGUF metadata and the stored tensors (by name)."""
    tensor_names = set(tensors)
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
            f"{path}: the file stores rope_freqs.weight (Llama 3 RoPE frequency scaling), which "
            "the GGUF converter does not read; convert the HF checkpoint instead"
        )
    architecture = metadata.get("general.architecture")
    vocab_key = f"{architecture}.vocab_size"
    has_vocab = vocab_key in metadata or "tokenizer.ggml.tokens" in metadata
    if not has_vocab and "token_embd.weight" in tensors:
        # Without vocabulary metadata, the embedding's second ggml dimension (ne[1]) is its size.
        metadata = {**metadata, vocab_key: int(tensors["token_embd.weight"].shape[1])}
    try:
        config = ModelConfig.from_gguf_metadata(
            metadata, has_output_tensor="output.weight" in tensor_names)
    except KeyError as error:
        raise CheckpointError(f"{path}: GGUF metadata {error} is missing") from error
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error

    # Biases are optional in llama.cpp's llama graph, so the stored tensors decide.
    if not config.qkv_bias and "blk.0.attn_q.bias" in tensor_names:
        config = dataclasses.replace(config, qkv_bias=True)
    if not config.out_bias and "blk.0.attn_output.bias" in tensor_names:
        config = dataclasses.replace(config, out_bias=True)
    return config


def load_gguf(path: str | os.PathLike[str], *, with_tokenizer: bool = True) -> ConvertedModel:
    """Convert a GGUF checkpoint, dequantizing every tensor to float32.

    For the `llama` architecture the q/k rows are put back from llama.cpp's adjacent-pair
    order into HF's half-split order.
    """
    path = Path(path)
    reader = open_gguf(path)
    metadata = gguf_metadata(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = gguf_config(metadata, tensors, str(path))
    architecture = metadata["general.architecture"]
    permuted = architecture in _PERMUTED_ARCHITECTURES
    used: set[str] = set()

    def read(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        name = gguf_tensor_name(hf_name)
        if name not in tensors:
            raise CheckpointError(
                f"{path}: tensor {name} is missing; the file is incomplete or its "
                f"{architecture} metadata does not match its tensors"
            )
        array = dequantize_tensor(tensors[name], path)
        check_shape(str(path), name, array, shape)
        used.add(name)
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = interleaved_to_half(array, config.num_heads)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = interleaved_to_half(array, config.num_kv_heads)
        return array

    params = build_params(config, read)
    unused = sorted(set(tensors) - used)
    if unused:
        logger.warning("%s: ignored %d tensors the model config does not use: %s",
                       path, len(unused), ", ".join(unused[:10]))
    logger.info("loaded %s (%s, %d layers, %d tensors)",
                path, architecture, config.num_layers, len(tensors))

    tokenizer = gguf_tokenizer(metadata, path) if with_tokenizer else None
    return ConvertedModel(config=config, params=params, tokenizer=tokenizer, source=str(path))


def gguf_tokenizer(metadata: dict[str, Any], path: str | os.PathLike[str]) -> Tokenizer | None:
    """Build the tokenizer embedded in GGUF metadata, or return None if the file has none."""
    if "tokenizer.ggml.model" not in metadata:
        logger.warning("%s has no tokenizer.ggml.* metadata; no tokenizer loaded", path)
        return None
    from jaxinfer.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(metadata)
