"""Read HF Llama, Mistral, Qwen2 and Qwen3 checkpoints: config.json plus safetensors files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can return BF16)
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxinfer.config import ModelConfig
from jaxinfer.convert import CheckpointError, ConvertedModel
from jaxinfer.convert.layout import as_float32, build_params, check_shape
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names this reader converts to float32.
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# Tensors some checkpoints carry that jaxinfer recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """Parse `config.json` in `directory` into a ModelConfig, raising CheckpointError if unusable."""
    config_path = Path(directory) / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"{config_path} not found; a HF model directory needs one") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot read the JSON config: {error}") from error
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(hf_config).__name__}")

    quantization = hf_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise CheckpointError(
            f"{config_path}: quantized HF checkpoints (quant_method={method!r}) are not "
            "supported; use the unquantized model or a GGUF file"
        )

    try:
        return ModelConfig.from_hf_config(hf_config)
    except KeyError as error:
        raise CheckpointError(f"{config_path}: required field {error} is missing") from error
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: {error}") from error


def _safetensors_files(directory: Path) -> list[Path]:
    """List the weight files: the shards named by the index, else every `*.safetensors` file."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as error:
            raise CheckpointError(
                f"{index_path}: cannot read the shard index (expected a JSON object with "
                f"a 'weight_map' of tensor names to file names): {error}"
            ) from error
        files = [directory / name for name in names]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: shards {missing} listed in {INDEX_FILE} are missing; "
                "download the complete checkpoint"
            )
        return files

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pth"))
        hint = f" (found {others}; convert PyTorch pickles to safetensors first)" if others else ""
        raise CheckpointError(f"{directory}: no *.safetensors weight files{hint}")
    return files


class _SafetensorsReader:
    """Tensors of one or more safetensors files, looked up by name across all of them."""

    def __init__(self, directory: Path, files: list[Path], stack: contextlib.ExitStack) -> None:
        self.directory = directory
        self.location: dict[str, tuple[Path, Any]] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="numpy"))
                keys = list(handle.keys())
            except (SafetensorError, OSError) as error:
                raise CheckpointError(
                    f"{file}: cannot read the safetensors file ({error}); the file is "
                    "truncated or corrupt, so download it again"
                ) from error
            for key in keys:
                if key in self.location:
                    raise CheckpointError(
                        f"tensor {key} appears in both {self.location[key][0]} and {file}"
                    )
                self.location[key] = (file, handle)
        self.used: set[str] = set()
        # Bare `LlamaModel` checkpoints name tensors without the `model.` prefix.
        self.strip_model_prefix = (
            "model.embed_tokens.weight" not in self.location and "embed_tokens.weight" in self.location
        )

    def file_name(self, name: str) -> str:
        if self.strip_model_prefix and name.startswith("model."):
            return name[len("model."):]
        return name

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        stored_name = self.file_name(name)
        if stored_name not in self.location:
            raise CheckpointError(
                f"{self.directory}: tensor {stored_name} is missing from the safetensors files; "
                "the checkpoint is incomplete or does not match config.json"
            )
        file, handle = self.location[stored_name]
        try:
            dtype = handle.get_slice(stored_name).get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{file}: tensor {stored_name} has dtype {dtype}, expected one of "
                    f"{', '.join(_FLOAT_DTYPES)}; quantized safetensors checkpoints are not "
                    "supported"
                )
            array = handle.get_tensor(stored_name)
        except (SafetensorError, TypeError, OSError) as error:
            raise CheckpointError(f"{file}: cannot read tensor {stored_name}: {error}") from error
        check_shape(str(file), stored_name, array, shape)
        self.used.add(stored_name)
        return as_float32(array)

    def unused(self) -> list[str]:
        return sorted(
            name for name in self.location
            if name not in self.used and not name.endswith(_IGNORED_SUFFIXES)
        )


def load_hf(
    directory: str | os.PathLike[str], *, with_tokenizer: bool = True
) -> ConvertedModel:
    """Convert a HF model directory (config.json and safetensors, single or sharded).

    Weights of any float dtype become float32. With tied embeddings, `lm_head` is left out of
    the parameters even where the files store it.
    """
    directory = Path(directory)
    config = read_hf_config(directory)
    files = _safetensors_files(directory)

    with contextlib.ExitStack() as stack:
        reader = _SafetensorsReader(directory, files, stack)
        params = build_params(config, reader.tensor)
        unused = reader.unused()
    if config.tie_embeddings:
        unused = [name for name in unused if name != "lm_head.weight"]
    if unused:
        logger.warning("%s: ignored %d tensors the model config does not use: %s",
                       directory, len(unused), ", ".join(unused[:10]))
    logger.info("loaded %s (%s, %d layers) from %d safetensors files",
                directory, config.family, config.num_layers, len(files))

    tokenizer = hf_tokenizer(directory) if with_tokenizer else None
    return ConvertedModel(config=config, params=params, tokenizer=tokenizer, source=str(directory))


def hf_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer | None:
    """Load the tokenizer stored in a HF model directory, or return None if it has none.

    `tokenizer.json` is preferred; a directory with only a SentencePiece `tokenizer.model`
    gets a SentencePiece tokenizer.
    """
    directory = Path(directory)
    if not ((directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file()):
        logger.warning("%s contains no tokenizer.json or tokenizer.model; no tokenizer loaded",
                       directory)
        return None
    from jaxinfer.tokenizer import tokenizer_from_path

    return tokenizer_from_path(directory)
