"""Forward passes for tools and evaluation (no KV cache): logits of a token sequence."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.layers import NoQuant, QuantPolicy
from gemma_qat.model.transformer import Transformer


def check_tokens(config: ModelConfig, tokens: Sequence[int]) -> None:
    bad = [t for t in tokens if not 0 <= t < config.vocab_size]
    if not tokens:
        raise ValueError("no tokens given")
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the model vocabulary [0, {config.vocab_size})")


def forward_logits(config: ModelConfig, params: dict, tokens: Sequence[int], *, quant: QuantPolicy | None = None,
                   dtype=jnp.float32) -> np.ndarray:
    """float32 logits [T, V] for one sequence."""
    check_tokens(config, tokens)
    model = Transformer(config, quant=quant or NoQuant(), dtype=dtype)
    fn = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return np.asarray(fn(params, jnp.asarray([list(tokens)], jnp.int32))[0], np.float32)
