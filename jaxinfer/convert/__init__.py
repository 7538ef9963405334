"""Converters from HF safetensors, GGUF and llama2.c checkpoints to jaxinfer's parameter tree."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# First bytes of the formats that `detect_format` recognizes or rejects by content.
GGUF_MAGIC = b"GGUF"
LLAMA2C_MAGIC = 0x616B3432  # uint32 "ak42" that opens llama2.c's versioned .bin exports
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives (pytorch_model.bin)
# Legacy torch.save pickles open with protocol 2 and a long integer (torch's magic number).
_TORCH_LEGACY_PICKLE = b"\x80\x02\x8a\x0a"


class CheckpointError(ValueError):
    """A checkpoint file is missing data, truncated, corrupt or in an unsupported variant."""


@dataclasses.dataclass
class ConvertedModel:
    """A model read from a foreign checkpoint: config, host parameters and tokenizer.

    `params` follows the tree documented in `jaxinfer.model.params`, as float32 numpy arrays.
    `tokenizer` is None when the source carries none and none was given.
    """

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Tokenizer | None
    source: str


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """Identify a checkpoint as "hf", "gguf" or "llama2c"; return the format and the path to load.

    A `.safetensors` or `config.json` file inside a HF model directory resolves to that
    directory. Raises FileNotFoundError for a missing path and CheckpointError for a file or
    directory in no supported format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")

    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        raise CheckpointError(
            f"{path} is a directory without config.json; pass a HF model directory "
            "(config.json and *.safetensors), a .gguf file or a llama2.c .bin file"
        )

    if path.name == "config.json" or (
        path.suffix == ".safetensors" and (path.parent / "config.json").is_file()
    ):
        return "hf", path.parent

    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(GGUF_MAGIC) or path.suffix == ".gguf":
        return "gguf", path
    if head.startswith(_ZIP_MAGIC) or head.startswith(_TORCH_LEGACY_PICKLE):
        raise CheckpointError(
            f"{path} is a PyTorch pickle checkpoint, which jaxinfer does not read; "
            "use the model's safetensors files (a HF directory with config.json) instead"
        )
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == LLAMA2C_MAGIC:
        return "llama2c", path
    if path.suffix == ".bin":
        return "llama2c", path
    raise CheckpointError(
        f"cannot detect the checkpoint format of {path} (first bytes {head!r}); expected a HF "
        "model directory with config.json, a GGUF file or a llama2.c .bin file"
    )


def load_source(
    path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    *,
    with_tokenizer: bool = True,
) -> ConvertedModel:
    """Load a HF directory, GGUF file or llama2.c checkpoint, detecting which it is.

    `tokenizer_path` replaces the tokenizer the checkpoint carries (for llama2.c it replaces
    the search next to the checkpoint). `with_tokenizer=False` skips tokenizers entirely.
    """
    kind, resolved = detect_format(path)
    logger.info("loading %s checkpoint %s", kind, resolved)

    if kind == "llama2c":
        from jaxinfer.convert.llama2c import load_llama2c

        model = load_llama2c(resolved, tokenizer_path, with_tokenizer=with_tokenizer)
        check_tokenizer_fits(model, tokenizer_path or resolved)
        return model

    load_own_tokenizer = with_tokenizer and tokenizer_path is None
    if kind == "hf":
        from jaxinfer.convert.hf import load_hf

        model = load_hf(resolved, with_tokenizer=load_own_tokenizer)
    else:
        from jaxinfer.convert.gguf import load_gguf

        model = load_gguf(resolved, with_tokenizer=load_own_tokenizer)

    if with_tokenizer and tokenizer_path is not None:
        from jaxinfer.tokenizer import tokenizer_from_path

        model.tokenizer = tokenizer_from_path(tokenizer_path)
    check_tokenizer_fits(model, tokenizer_path or resolved)
    return model


def check_tokenizer_fits(model: ConvertedModel, source: str | os.PathLike[str]) -> None:
    """Raise CheckpointError when the tokenizer produces ids the model has no embedding for.

    A tokenizer may have fewer tokens than embedding rows (vocabularies are often padded),
    never more: its ids past the embedding would fail at run time, and a tokenizer of another
    model produces garbage.
    """
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
            f"has {model.config.vocab_size} rows, so it belongs to another model; pass the "
            "model's own tokenizer"
        )
