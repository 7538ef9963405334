"""Model configuration shared by every family, built from HF, GGUF or llama2.c metadata."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")

# Dtypes weights and the KV cache can be stored and run in.
DTYPES = ("float32", "bfloat16", "float16")

# HF `model_type` and GGUF `general.architecture` values that map to a supported family.
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class UnsupportedModelError(ValueError):
    """The checkpoint describes an architecture or feature jaxinfer does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type = "llama3"` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a dense Llama-family decoder.

    Weights follow the HF layout: RoPE rotates the two halves of each head (`rotate_half`), so
    converters of GGUF and llama2.c checkpoints permute the query and key projections into it.
    """

    family: str
    vocab_size: int
    embed_dim: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model family {self.family!r} is not supported; "
                f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
            )
        for name in ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def num_params(self) -> int:
        """Count the parameters of the model, embeddings included."""
        attention = self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.embed_dim * self.mlp_dim
        per_layer = attention + mlp + 2 * self.embed_dim
        if self.qkv_bias:
            per_layer += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.out_bias:
            per_layer += self.embed_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embeddings = self.vocab_size * self.embed_dim * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.embed_dim

    # Serialisation into the converted checkpoint's metadata.

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        values = dict(data)
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        values["eos_token_ids"] = tuple(values.get("eos_token_ids", ()))
        return cls(**values)

    # Constructors from the three checkpoint formats.

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` of a Llama, Mistral (no sliding window), Qwen2 or Qwen3 model."""
        model_type = hf.get("model_type")
        family = _HF_MODEL_TYPES.get(model_type)
        if family is None:
            architectures = hf.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"architecture {architectures[0]!r} (model_type={model_type!r}) is not supported; "
                f"supported model types: {', '.join(sorted(_HF_MODEL_TYPES))}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"hidden_act={hf['hidden_act']!r} is not supported; only SwiGLU (silu) MLPs are"
            )
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
            raise UnsupportedModelError(
                "sliding-window attention is not supported; the model sets "
                f"sliding_window={hf.get('sliding_window')!r}"
            )

        missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads") if key not in hf]
        if missing:
            raise ValueError(f"the HF config of model_type {model_type!r} is missing {', '.join(missing)}; "
                             "is it the model's config.json?")
        rope_theta, rope_scaling = _hf_rope(hf)
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            embed_dim=hf["hidden_size"],
            mlp_dim=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and never an o_proj bias; in Llama and Qwen3,
            # `attention_bias` adds biases to all four projections.
            qkv_bias=family == "qwen2" or attention_bias,
            out_bias=family in ("llama", "qwen3") and attention_bias,
            qk_norm=family == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], has_output_tensor: bool) -> ModelConfig:
        """Build from GGUF key-value metadata (already decoded into Python values).

        `has_output_tensor` is whether the file stores `output.weight`. Without it, the
        output projection is tied to the token embedding.
        """
        arch = meta.get("general.architecture")
        family = _GGUF_ARCHITECTURES.get(arch)
        if family is None:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; supported: "
                f"{', '.join(sorted(_GGUF_ARCHITECTURES))}"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ValueError(f"GGUF metadata is missing {arch}.{name}")
            return value

        embed_dim = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or embed_dim // num_heads)
        vocab_size = meta.get(f"{arch}.vocab_size")
        if vocab_size is None:
            vocab_size = len(meta["tokenizer.ggml.tokens"])
        rope_scaling = None
        if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise UnsupportedModelError(
                f"GGUF RoPE scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported"
            )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(
            family=family,
            vocab_size=int(vocab_size),
            embed_dim=embed_dim,
            mlp_dim=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=int(key("context_length")),
            tie_embeddings=not has_output_tensor,
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in (eos, eot) if i is not None)),
        )

    @classmethod
    def from_llama2c_header(cls, header: Sequence[int]) -> ModelConfig:
        """Build from the seven int32 of a llama2.c checkpoint header.

        The header is (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len);
        a negative vocab_size means the file stores a separate classifier. llama2.c's
        tokenizer uses BOS=1 and EOS=2, and its sampler stops when the model emits BOS.
        """
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
        return cls(
            family="llama",
            vocab_size=abs(vocab_size),
            embed_dim=dim,
            mlp_dim=hidden_dim,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv_heads,
            head_dim=dim // n_heads,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_seq_len=seq_len,
            tie_embeddings=vocab_size > 0,
            bos_token_id=1,
            eos_token_ids=(1, 2),
        )


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE theta and scaling from a HF config, old (`rope_scaling`) or new (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} is not supported; supported types: default, llama3"
        )
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _as_id_tuple(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def next_power_of_two(n: int) -> int:
    """Return the smallest power of two that is at least `n` (and at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))
