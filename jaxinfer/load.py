"""From a model argument (a checkpoint of any supported format, or none) to a ready Engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxinfer.checkpoint import ensure_converted, is_checkpoint, read_checkpoint_info, restore_params
from jaxinfer.convert import CheckpointError
from jaxinfer.default_model import cache_dir, default_gguf_path
from jaxinfer.rules import RulesTable, load_rules

logger = logging.getLogger(__name__)

DEFAULT_RULES = "tp_mlp"


def resolve_checkpoint(model: str | Path | None, tokenizer: str | Path | None = None) -> Path:
    """Return an Orbax checkpoint directory for `model`, converting it into the cache once.

    `model` is a jaxinfer checkpoint directory, a HF directory, a GGUF file or a llama2.c
    `.bin` file; None means the default model.
    """
    if model is None:
        return ensure_converted(default_gguf_path(), cache_dir())
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} not found; pass a checkpoint directory, a HF "
                                "directory, a .gguf file or a llama2.c .bin file")
    if is_checkpoint(path):
        return path
    if (path / "params").is_dir():
        raise CheckpointError(
            f"{path} contains an incomplete jaxinfer checkpoint (params/ without jaxinfer.json), left "
            "by an interrupted conversion; delete it and convert the model again"
        )
    return ensure_converted(path, cache_dir(), Path(tokenizer) if tokenizer else None)


def load_table(rules: str | Path | None, mesh: dict[str, int] | None = None) -> RulesTable:
    """Load a rules table by name or path (default: tp_mlp), with `mesh` overriding its sizes."""
    table = load_rules(rules or DEFAULT_RULES)
    return table.with_mesh(mesh) if mesh else table


def build_engine(checkpoint: Path, table: RulesTable, *, dtype: str = "float32",
                 devices: Sequence[Any] | None = None, **engine_options: Any):
    """Restore a checkpoint straight into the table's sharding and wrap it in an Engine."""
    from jaxinfer.engine import Engine

    info = read_checkpoint_info(checkpoint)
    tokenizer = info.load_tokenizer()
    return Engine(
        info.config,
        lambda shardings: restore_params(info, shardings, dtype),
        table,
        tokenizer=tokenizer,
        devices=devices,
        dtype=dtype,
        **engine_options,
    )
