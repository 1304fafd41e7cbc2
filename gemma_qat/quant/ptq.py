"""Post-training quantization: a float checkpoint with every quantized weight replaced by its
dequantised value. It is the PTQ baseline of the evaluation, and the same numbers a QAT student's
fake-quant forward pass sees."""

from __future__ import annotations

import functools

import jax
from flax import traverse_util

from gemma_qat.model.config import ModelConfig
from gemma_qat.quant import formats
from gemma_qat.quant.policy import choose_backend, weight_axes, weight_in_axes
from gemma_qat.quant.recipe import Resolution


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fake_quant(w, fmt: str, axes, backend: str = "formats"):
    # One jitted function for every tensor: tensors of the same shape, format and axes (every layer
    # of a kind) share one compilation instead of compiling per tensor.
    if backend == "aqt":
        from gemma_qat.quant.aqt_backend import aqt_fake_quant
        return aqt_fake_quant(w, weight_format=fmt, in_axes=axes)
    return formats.get_format(fmt).fake_quant(w, axes)


def dequantized_params(config: ModelConfig, params: dict, resolution: Resolution, backend: str = "auto") -> dict:
    """backend: "auto", "formats" or "aqt" (quant/policy.py BACKENDS, choose_backend); the same bytes either way."""
    backend = choose_backend(backend, resolution)
    axes = weight_in_axes(config)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for key, w in flat.items():
        path = "/".join(key)
        fmt = resolution.formats[path]
        if fmt == "float":
            out[key] = w
        else:
            out[key] = _fake_quant(w, fmt, weight_axes(fmt, axes[path]), backend)
    return traverse_util.unflatten_dict(out)
