"""Parameter trees without memory: abstract shapes, logical axes and counts via `jax.eval_shape`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.transformer import Transformer

# Per-layer scalars that the reference architecture keeps as non-trainable buffers (HF
# `layer_scalar` is an `nn.Buffer`), so official parameter counts leave them out.
BUFFER_SUFFIXES = ("skip_scale",)


def init_params(config: ModelConfig, rng: jax.Array, *, param_dtype=jnp.float32) -> dict:
    """Random parameters (plain arrays, no partitioning boxes)."""
    model = Transformer(config, param_dtype=param_dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(model.init(rng, tokens)["params"])


def abstract_params(config: ModelConfig, *, param_dtype=jnp.float32, boxed: bool = False) -> dict:
    """ShapeDtypeStruct tree of the parameters; `boxed=True` keeps the logical-axis metadata. Each call
    returns a fresh tree (containers of its own) over one cached trace per config and dtype."""
    tree = _abstract_boxed(config, jnp.dtype(param_dtype))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x, tree, is_leaf=is_box) if boxed else nn.unbox(tree)


@functools.lru_cache(maxsize=64)
def _abstract_boxed(config: ModelConfig, param_dtype) -> dict:
    # Tracing the model's init is the slow part (about 0.6 s for tiny-e2b on a 2-core host, more for the
    # large variants), and a run asks for the same tree a dozen times: loading, shardings, recipes, checks.
    model = Transformer(config, param_dtype=param_dtype)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def logical_axes(config: ModelConfig) -> dict:
    """Same tree as the parameters, with a PartitionSpec of logical axis names at each leaf."""
    return nn.get_partition_spec(abstract_params(config, boxed=True))


def flat_shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def count_params(config: ModelConfig) -> dict[str, int]:
    """Counts by component, computed from the abstract tree. `total_params` follows the official
    convention (buffers excluded); `active_params` counts top-k of the experts per token."""
    shapes = flat_shapes(abstract_params(config))
    n = {k: math.prod(s) for k, s in shapes.items()}
    buffers = sum(v for k, v in n.items() if k.endswith(BUFFER_SUFFIXES))
    total = sum(n.values()) - buffers
    embedding = n["embedder/input_embedding"]
    ple = sum(v for k, v in n.items() if k.startswith("embedder/per_layer_embeddings"))
    experts = sum(v for k, v in n.items() if "/mlp/gating_einsum/" in k or "/mlp/linear/" in k) if config.is_moe else 0
    out = {
        "total_params": total,
        "embedding_params": embedding,
        "per_layer_embedding_params": ple,
        "non_embedding_params": total - embedding - ple,
        "buffer_params": buffers,
    }
    if config.is_moe:
        out["expert_params"] = experts
        out["active_params"] = total - experts + experts * config.top_k_experts // config.num_experts
    return out
