"""Read llama2.c `.bin` checkpoints: the legacy version-0 format and the version-1 float32 export.

Version 0 opens with 7 int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size and
seq_len. A positive vocab_size means the classifier shares the token embedding. Then come
float32 arrays: the token embedding, and per-layer stacks of attention norm, wq, wk, wv, wo,
MLP norm, w1, w2 and w3. The final norm and two precomputed RoPE tables of
[seq_len, head_dim / 2] follow, then the classifier if it is not shared.

Version 1 (llama2.c's `export.py --version 1`) opens with a 256-byte header: uint32 magic
0x616b3432 ("ak42"), int32 version, the same 7 int32 (vocab_size always positive), a uint8
shared-classifier flag and zero padding. Then come float32 arrays: attention norms, MLP norms,
final norm, token embedding, wq, wk, wv, wo, w1, w2, w3 and the classifier if it is not
shared. It has no RoPE tables.

Both store linear weights as [out, in] and rotate adjacent pairs with RoPE, so wq and wk are
reordered into HF's half-split layout here.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.convert import LLAMA2C_MAGIC, CheckpointError, ConvertedModel
from jaxinfer.convert.layout import as_float32, build_params, check_shape, interleaved_to_half
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_PARAMS = struct.Struct("<7i")
_VERSIONED_PREFIX = struct.Struct("<Ii")  # magic, version
_VERSION1_HEADER_BYTES = 256
_FLOAT_BYTES = 4
_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                  "seq_len")


def _read_header(path: Path, data: bytes) -> tuple[int, tuple[int, ...], int]:
    """Return (format version, header with the vocab_size sign convention of version 0, bytes)."""
    if len(data) < _PARAMS.size:
        raise CheckpointError(
            f"{path}: file has {len(data)} bytes, too short for a llama2.c header "
            f"({_PARAMS.size} bytes); the file is truncated or not a llama2.c checkpoint"
        )
    magic, version = _VERSIONED_PREFIX.unpack_from(data)
    if magic != LLAMA2C_MAGIC:
        return 0, _PARAMS.unpack_from(data), _PARAMS.size

    if version != 1:
        kind = "int8 (Q8_0) quantized export" if version == 2 else "unknown variant"
        raise CheckpointError(
            f"{path}: llama2.c checkpoint version {version} ({kind}) is not supported; "
            "export the model with llama2.c's export.py --version 1 (float32) or --version 0"
        )
    if len(data) < _VERSION1_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: file has {len(data)} bytes, too short for a llama2.c version-1 header "
            f"({_VERSION1_HEADER_BYTES} bytes); the file is truncated"
        )
    header = list(_PARAMS.unpack_from(data, _VERSIONED_PREFIX.size))
    shared_classifier = data[_VERSIONED_PREFIX.size + _PARAMS.size]
    if not shared_classifier:
        header[5] = -abs(header[5])
    return 1, tuple(header), _VERSION1_HEADER_BYTES


def _validate_header(path: Path, header: tuple[int, ...]) -> None:
    values = dict(zip(_HEADER_FIELDS, header, strict=True))
    bad = {name: value for name, value in values.items()
           if (value == 0 if name == "vocab_size" else value <= 0)}
    if bad:
        raise CheckpointError(
            f"{path}: invalid llama2.c header {values}: {sorted(bad)} must be positive; "
            "the file is corrupt or not a llama2.c checkpoint"
        )
    if values["dim"] % values["n_heads"] or (values["dim"] // values["n_heads"]) % 2:
        raise CheckpointError(
            f"{path}: invalid llama2.c header {values}: dim must split into n_heads heads "
            "of an even size"
        )
    if values["n_heads"] % values["n_kv_heads"]:
        raise CheckpointError(
            f"{path}: invalid llama2.c header {values}: n_heads must be a multiple of n_kv_heads"
        )


def _tensor_layout(version: int, config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """List llama2.c's arrays in file order as (name, shape), shapes as stored ([out, in])."""
    dim, hidden, layers = config.embed_dim, config.mlp_dim, config.num_layers
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    embedding = ("token_embedding", (config.vocab_size, dim))
    attn_norm = ("rms_att", (layers, dim))
    mlp_norm = ("rms_ffn", (layers, dim))
    final_norm = ("rms_final", (dim,))
    matrices = [
        ("wq", (layers, q_dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, q_dim)),
    ]
    mlp = [
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
    ]
    if version == 0:
        rope_table = (config.max_seq_len, config.head_dim // 2)
        layout = [embedding, attn_norm, *matrices, mlp_norm, *mlp, final_norm,
                  ("freq_cis_real", rope_table), ("freq_cis_imag", rope_table)]
    else:
        layout = [attn_norm, mlp_norm, final_norm, embedding, *matrices, *mlp]
    if not config.tie_embeddings:
        layout.append(("wcls", (config.vocab_size, dim)))
    return layout


# HF name suffix inside a layer -> llama2.c array name.
_LAYER_ARRAYS = {
    "input_layernorm.weight": "rms_att",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "rms_ffn",
    "mlp.gate_proj.weight": "w1",
    "mlp.down_proj.weight": "w2",
    "mlp.up_proj.weight": "w3",
}
_GLOBAL_ARRAYS = {
    "model.embed_tokens.weight": "token_embedding",
    "model.norm.weight": "rms_final",
    "lm_head.weight": "wcls",
}


def read_llama2c(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read the config and parameter tree of a llama2.c checkpoint (version 0 or 1)."""
    path = Path(path)
    with open(path, "rb") as file:
        head = file.read(_VERSION1_HEADER_BYTES)
    version, header, header_bytes = _read_header(path, head)
    _validate_header(path, header)
    try:
        config = ModelConfig.from_llama2c_header(header)
    except ValueError as error:
        raise CheckpointError(f"{path}: invalid llama2.c header: {error}") from error

    layout = _tensor_layout(version, config)
    total_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected = header_bytes + total_floats * _FLOAT_BYTES
    actual = path.stat().st_size
    if actual != expected:
        fields = ", ".join(f"{n}={v}" for n, v in zip(_HEADER_FIELDS, header, strict=True))
        problem = ("the file is truncated" if actual < expected
                   else "the header does not describe the weights that follow")
        raise CheckpointError(
            f"{path}: a llama2.c version-{version} checkpoint with {fields} has {expected} "
            f"bytes, but the file has {actual} bytes; {problem}"
        )

    floats = np.memmap(path, dtype="<f4", mode="r", offset=header_bytes, shape=(total_floats,))
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout:
        size = int(np.prod(shape))
        arrays[name] = floats[offset:offset + size].reshape(shape)
        offset += size

    def read(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        if hf_name in _GLOBAL_ARRAYS:
            name = _GLOBAL_ARRAYS[hf_name]
            array = arrays[name]
        else:
            _, _, index, suffix = hf_name.split(".", 3)
            name = _LAYER_ARRAYS[suffix]
            array = arrays[name][int(index)]
        check_shape(str(path), name, array, shape)
        if name == "wq":
            return interleaved_to_half(as_float32(array), config.num_heads)
        if name == "wk":
            return interleaved_to_half(as_float32(array), config.num_kv_heads)
        return as_float32(array)

    params = build_params(config, read)
    logger.info("loaded %s (llama2.c version %d, %d layers)", path, version, config.num_layers)
    return config, params


def find_llama2c_tokenizer(checkpoint: str | os.PathLike[str], vocab_size: int) -> Path | None:
    """Look next to a llama2.c checkpoint for its tokenizer; return None if there is none.

    `tok{vocab_size}.bin` comes before `tokenizer.bin`, because llama2.c's `tokenizer.bin`
    is the 32000-token Llama 2 vocabulary while custom vocabularies are named by size.
    """
    folder = Path(checkpoint).parent
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin", f"tok{vocab_size}.model",
                 "tokenizer.model"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def llama2c_tokenizer(
    checkpoint: str | os.PathLike[str],
    vocab_size: int,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> Tokenizer | None:
    """Load `tokenizer_path`, else the tokenizer found next to the checkpoint, else return None.

    `.bin` files are read as llama2.c tokenizers, `.model` files as SentencePiece models.
    """
    from jaxinfer.tokenizer import tokenizer_from_path

    if tokenizer_path is None:
        tokenizer_path = find_llama2c_tokenizer(checkpoint, vocab_size)
        if tokenizer_path is None:
            logger.warning(
                "no tokenizer next to %s (looked for tok%d.bin, tokenizer.bin, tok%d.model, "
                "tokenizer.model); pass a tokenizer path to get one",
                checkpoint, vocab_size, vocab_size)
            return None
    return tokenizer_from_path(tokenizer_path)


def load_llama2c(
    path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    *,
    with_tokenizer: bool = True,
) -> ConvertedModel:
    """Convert a llama2.c checkpoint and attach its tokenizer (see `llama2c_tokenizer`)."""
    config, params = read_llama2c(path)
    tokenizer = (llama2c_tokenizer(path, config.vocab_size, tokenizer_path)
                 if with_tokenizer else None)
    return ConvertedModel(config=config, params=params, tokenizer=tokenizer, source=str(path))
