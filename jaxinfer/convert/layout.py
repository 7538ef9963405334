"""Build jaxinfer's parameter tree from weights named and shaped as in HF Llama checkpoints.

Every converter exposes its checkpoint through a `TensorSource`. That function takes an HF
tensor name (`model.layers.3.self_attn.q_proj.weight`) and the HF shape, which is `[out, in]`
for linear weights as in `torch.nn.Linear`. It returns the tensor as a float32 array whose
query and key rows are already in HF's half-split (`rotate_half`) RoPE order. `build_params`
then transposes and reshapes the tensors into the tree documented in `jaxinfer.model.params`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.convert import CheckpointError


class TensorSource(Protocol):
    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Return tensor `name` as float32 with `shape`; raise CheckpointError if it is missing."""
        ...


def check_shape(source: str, name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    """Raise CheckpointError naming `source` and tensor `name` when `array` has another shape."""
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(
            f"{source}: tensor {name} has shape {tuple(array.shape)}, expected {tuple(shape)} "
            "from the model config; the weights and the config do not belong together"
        )


def interleaved_to_half(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the rows of a query or key projection from adjacent-pair RoPE to half-split RoPE.

    Within each head, rows (x0, y0, x1, y1, ...) become (x0, x1, ..., y0, y1, ...). Meta's
    original Llama code and llama2.c rotate adjacent pairs, and llama.cpp's GGUF converter
    stores `llama` checkpoints that way, while HF (and jaxinfer) rotate the two halves of each
    head. Works on weights `[heads * head_dim, in]` and biases `[heads * head_dim]`.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(
            f"cannot split {rows} rows into {num_heads} heads of an even size; "
            "check num_heads and head_dim in the model config"
        )
    pairs = rows // num_heads // 2
    split = weight.reshape(num_heads, pairs, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _transposed(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T)


def build_params(config: ModelConfig, tensor: TensorSource) -> dict[str, Any]:
    """Read every tensor the config needs from `tensor` and arrange them as jaxinfer's tree."""
    vocab, embed, mlp = config.vocab_size, config.embed_dim, config.mlp_dim
    q_heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    q_dim, kv_dim = q_heads * head_dim, kv_heads * head_dim

    params: dict[str, Any] = {
        "embed": tensor("model.embed_tokens.weight", (vocab, embed)),
        "final_norm": tensor("model.norm.weight", (embed,)),
    }
    if not config.tie_embeddings:
        params["lm_head"] = _transposed(tensor("lm_head.weight", (vocab, embed)))

    layers = []
    for index in range(config.num_layers):
        prefix = f"model.layers.{index}."

        def get(name: str, shape: tuple[int, ...], prefix: str = prefix) -> np.ndarray:
            return tensor(prefix + name, shape)

        layer: dict[str, np.ndarray] = {
            "attn_norm": get("input_layernorm.weight", (embed,)),
            "wq": _transposed(get("self_attn.q_proj.weight", (q_dim, embed)))
            .reshape(embed, q_heads, head_dim),
            "wk": _transposed(get("self_attn.k_proj.weight", (kv_dim, embed)))
            .reshape(embed, kv_heads, head_dim),
            "wv": _transposed(get("self_attn.v_proj.weight", (kv_dim, embed)))
            .reshape(embed, kv_heads, head_dim),
            # o_proj is [embed, q_heads * head_dim], with its columns grouped by head.
            "wo": _transposed(get("self_attn.o_proj.weight", (embed, q_dim)))
            .reshape(q_heads, head_dim, embed),
            "mlp_norm": get("post_attention_layernorm.weight", (embed,)),
            "w_gate": _transposed(get("mlp.gate_proj.weight", (mlp, embed))),
            "w_up": _transposed(get("mlp.up_proj.weight", (mlp, embed))),
            "w_down": _transposed(get("mlp.down_proj.weight", (embed, mlp))),
        }
        if config.qkv_bias:
            layer["bq"] = get("self_attn.q_proj.bias", (q_dim,)).reshape(q_heads, head_dim)
            layer["bk"] = get("self_attn.k_proj.bias", (kv_dim,)).reshape(kv_heads, head_dim)
            layer["bv"] = get("self_attn.v_proj.bias", (kv_dim,)).reshape(kv_heads, head_dim)
        if config.out_bias:
            layer["bo"] = get("self_attn.o_proj.bias", (embed,))
        if config.qk_norm:
            layer["q_norm"] = get("self_attn.q_norm.weight", (head_dim,))
            layer["k_norm"] = get("self_attn.k_norm.weight", (head_dim,))
        layers.append(layer)

    params["layers"] = layers
    return params


def as_float32(array: np.ndarray) -> np.ndarray:
    """Return a float32 copy that owns its memory (inputs are often memory-mapped views)."""
    return np.array(array, dtype=np.float32, copy=True)

