"""Post-training quantization: a float checkpoint with every quantized weight replaced by its
dequantised value. It is the PTQ baseline of the evaluation, and the same numbers a QAT student's
fake-quant forward pass sees."""

from __future__ import annotations

import jax
from flax import traverse_util

from gemma_qat.model.config import ModelConfig
from gemma_qat.quant import formats
from gemma_qat.quant.policy import weight_axes, weight_in_axes
from gemma_qat.quant.recipe import Resolution


def dequantized_params(config: ModelConfig, params: dict, resolution: Resolution) -> dict:
    axes = weight_in_axes(config)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for key, w in flat.items():
        path = "/".join(key)
        fmt = resolution.formats[path]
        if fmt == "float":
            out[key] = w
        else:
            fq = jax.jit(formats.get_format(fmt).fake_quant, static_argnums=1)
            out[key] = fq(w, weight_axes(fmt, axes[path]))
    return traverse_util.unflatten_dict(out)
