"""Random weights for tiny models that behave like trained ones: peaked but not saturated
next-token distributions, so comparisons measure the code, not a chaotic random model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gemma_qat.model.config import get_config
from gemma_qat.model.params import abstract_params


def calm_weights(name: str, *, embed_std: float, embed_tables=("input_embedding",), seed: int = 0):
    """(config, flat float64 weights) drawn in numpy on the abstract tree (no init to compile):
    matrices N(0, 0.15²), the listed embedding tables N(0, embed_std²), norms and scalars 1 ± 0.1
    with query/key norm scales halved (Gemma 4 has no 1/√H attention scaling, so unit-scale
    QK-norms make attention nearly argmax and the model chaotic)."""
    cfg = get_config(name)
    rng = np.random.default_rng(seed)
    flat = {}
    for k, s in traverse_util.flatten_dict(abstract_params(cfg)).items():
        if len(s.shape) == 1 or k[-1].endswith("scale"):
            w = (1 + 0.1 * rng.standard_normal(s.shape)) * (0.5 if k[-2] in ("query_norm", "key_norm") else 1.0)
        else:
            w = (embed_std if k[-1] in embed_tables else 0.15) * rng.standard_normal(s.shape)
        flat[k] = w
    return cfg, flat


def to_params(flat: dict) -> dict:
    return traverse_util.unflatten_dict({k: jnp.asarray(w, jnp.float32) for k, w in flat.items()})
