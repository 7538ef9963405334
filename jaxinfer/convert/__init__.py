"""Converters from HF safetensors, GGUF and llama2.c checkpoints to jaxinfer's parameter tree."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer


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
