"""Orbax checkpoints of converted models, restored straight into a rules table's sharding.

A checkpoint directory holds:

    jaxinfer.json   format version, ModelConfig, tokenizer metadata, source, dtype
    params/         the parameter tree, saved with Orbax
    tokenizer files written by the tokenizer's `save`

`jaxinfer.json` is written last, so a directory without it is an interrupted conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import DTYPES, ModelConfig
from jaxinfer.convert import CheckpointError, ConvertedModel
from jaxinfer.model.params import check_params, map_tree, param_shapes
from jaxinfer.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

METADATA_FILE = "jaxinfer.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class CheckpointInfo:
    """Metadata of a converted checkpoint, as recorded in `jaxinfer.json`."""

    directory: Path
    config: ModelConfig
    tokenizer_meta: dict[str, Any] | None
    source: str
    dtype: str

    def load_tokenizer(self) -> Tokenizer | None:
        if self.tokenizer_meta is None:
            return None
        return load_tokenizer(self.directory, self.tokenizer_meta)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).exists()


def save_checkpoint(directory: str | Path, model: ConvertedModel, dtype: str = "float32") -> Path:
    """Write `model` as an Orbax checkpoint in `directory`, which must not exist or be empty.

    Everything is written to a hidden staging directory beside it and renamed into place at
    the end, so an interrupted conversion never leaves a half-written checkpoint.
    """
    directory = Path(directory).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new output directory")
    check_params(model.config, model.params)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-partial-", dir=directory.parent))
    try:
        _write_checkpoint(staging, model, dtype)
        if directory.exists():
            directory.rmdir()  # empty, as checked above
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved %s checkpoint of %s to %s", dtype, model.source, directory)
    return directory


def _write_checkpoint(directory: Path, model: ConvertedModel, dtype: str) -> None:
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    np_dtype = np.dtype(jnp.dtype(dtype))
    params = map_tree(lambda a: np.asarray(a, dtype=np_dtype), model.params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params)
        checkpointer.wait_until_finished()

    tokenizer_meta = model.tokenizer.save(directory) if model.tokenizer is not None else None
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "tokenizer": tokenizer_meta,
        "source": model.source,
        "dtype": dtype,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def read_checkpoint_info(directory: str | Path) -> CheckpointInfo:
    """Read and check `jaxinfer.json` of a converted checkpoint."""
    directory = Path(directory).absolute()
    path = directory / METADATA_FILE
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint {directory} not found")
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file, not a jaxinfer checkpoint directory; convert it first with "
            "`jaxinfer convert`, or pass it to `jaxinfer generate --model`, which converts it"
        )
    if not path.exists():
        raise CheckpointError(
            f"{directory} is not a jaxinfer checkpoint ({METADATA_FILE} is missing; the conversion "
            "may have been interrupted). Convert the model again with `jaxinfer convert`"
        )
    try:
        metadata = json.loads(path.read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {metadata.get('format_version')!r} is not "
                                  f"supported (expected {FORMAT_VERSION}); convert the model again")
        config = ModelConfig.from_dict(metadata["model"])
        return CheckpointInfo(directory, config, metadata.get("tokenizer"),
                              metadata.get("source", ""), metadata.get("dtype", "float32"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt ({error}); convert the model again") from None


def restore_params(info: CheckpointInfo, shardings: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Restore the parameters, each array read directly into its sharding and cast to `dtype`.

    Orbax reads only the slices each device owns, so no device ever stores a full replicated
    copy of a sharded array.
    """
    import jax
    import orbax.checkpoint as ocp

    shapes = param_shapes(info.config)
    params_dir = info.directory / "params"
    _check_stored_shapes(params_dir, shapes)
    abstract = map_tree(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape, jax.numpy.dtype(dtype), sharding=sharding),
        shapes, shardings,
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_dir, abstract)
    except Exception as error:  # noqa: BLE001 - Orbax raises a bare Exception for unreadable arrays
        raise CheckpointError(
            f"could not restore the parameters in {params_dir}: {_first_line(error)}. "
            "The checkpoint is corrupt or incomplete; convert the model again"
        ) from error


def _check_stored_shapes(params_dir: Path, shapes: dict[str, Any]) -> None:
    """Raise CheckpointError unless Orbax's metadata lists every parameter with its config shape.

    Checking before the restore gives a message that names the array, and avoids the noise
    Orbax's aborted reads print when a restore fails halfway.
    """
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(params_dir).item_metadata
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        stored, reason = None, _first_line(error)
    else:
        reason = "Orbax found no parameter metadata"
    if stored is None:
        raise CheckpointError(
            f"could not read the parameter metadata in {params_dir}: {reason}. "
            "The checkpoint is corrupt or incomplete; convert the model again"
        )

    def check(shape: tuple[int, ...], name: str) -> None:
        entry = _lookup(stored, name)
        if entry is None:
            raise CheckpointError(f"{params_dir}: parameter {name} is missing; the checkpoint is "
                                  "incomplete, so convert the model again")
        if tuple(entry.shape) != shape:
            raise CheckpointError(
                f"{params_dir}: parameter {name} has shape {tuple(entry.shape)}, but the model "
                f"config in {METADATA_FILE} expects {shape}; convert the model again"
            )

    map_tree(check, shapes, _leaf_paths(shapes))


def _leaf_paths(tree: Any, prefix: str = "") -> Any:
    if isinstance(tree, dict):
        return {k: _leaf_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_leaf_paths(v, f"{prefix}.{i}") for i, v in enumerate(tree)]
    return prefix


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return node


def converted_cache_dir(source: Path, cache_root: Path, tokenizer: Path | None = None) -> Path:
    """Return the cache directory for the conversion of `source` with `tokenizer`.

    The key covers the path, size and modification time of every file the conversion reads,
    so editing a file of a HF directory, or passing another tokenizer, converts again.
    """
    inputs = [source, *(sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [])]
    if tokenizer is not None:
        inputs.append(tokenizer)
    parts = []
    for path in inputs:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return cache_root / "checkpoints" / f"{source.stem}-{digest}"


def ensure_converted(source: Path, cache_root: Path, tokenizer_path: Path | None = None) -> Path:
    """Convert a foreign checkpoint once into the cache and return the Orbax checkpoint directory.

    Two processes converting the same model at once both end up with the same complete
    checkpoint: the one that finishes second finds it in place and discards its own.
    """
    from jaxinfer.convert import load_source

    target = converted_cache_dir(source, cache_root, tokenizer_path)
    if is_checkpoint(target):
        return target
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # left by an interrupted older conversion
    logger.info("converting %s into %s", source, target)
    model = load_source(source, tokenizer_path)
    try:
        save_checkpoint(target, model)
    except (FileExistsError, OSError):
        if not is_checkpoint(target):
            raise
    return target


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
