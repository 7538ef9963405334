"""Tokenizers behind one interface: HF tokenizer.json, GGUF-embedded vocabularies, SentencePiece, llama2.c."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Tokenizer(abc.ABC):
    """Text to token ids and back, with the special ids generation needs."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode text; `add_bos=None` follows the tokenizer's own default."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, skipping special tokens."""

    @abc.abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the tokenizer's files into `directory`; return the metadata `load` needs."""
