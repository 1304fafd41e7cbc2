"""The KV cache for incremental decoding: per layer that computes K/V, its post-norm, post-RoPE key and
value for every slot of the sequence so far.

Slot j holds the sequence's token j (one write index for the whole batch; rows of different prompt
lengths are left-padded with segment id 0, as in the full forward). KV-shared layers own no buffers:
they read their source layer's, already updated by the same call (reference §1.1 "KV sharing").
Sliding layers keep a full-length buffer and the mask applies the window, which is exactly the full
forward's arithmetic; a ring buffer of `sliding_window` slots would save memory on long contexts but
is not implemented.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.layers import Array, DType


@struct.dataclass
class KVCache:
    length: Array  # int32 []: slots written so far; the next call's tokens go to length, length+1, ...
    segment_ids: Array  # int32 [B, S]: segment id of the token in each slot (for the segment mask)
    layers: dict[str, tuple[Array, Array]]  # "layer_i" → (key, value) [B, S, K_i, H_i], non-shared layers only

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: DType = jnp.float32) -> KVCache:
    """An empty cache of `max_len` slots. Writing past max_len is not checked under jit (slices clamp),
    so callers size it for prompt + new tokens. `dtype` is the storage dtype (the model's compute
    dtype gives the full forward's numbers; a narrower one trades accuracy for memory)."""
    if not 0 < max_len <= config.max_position:
        raise ValueError(f"max_len must be in [1, {config.max_position}], got {max_len}")
    layers = {}
    for i in range(config.num_layers):
        if not config.is_kv_shared(i):
            shape = (batch, max_len, config.layer_kv_heads(i), config.layer_head_dim(i))  # [B, S, K, H]
            layers[f"layer_{i}"] = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return KVCache(length=jnp.zeros((), jnp.int32), segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   layers=layers)
