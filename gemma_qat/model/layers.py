"""Building blocks shared by attention, MLP and MoE: the quantization hook, projections, RMSNorm,
RoPE and the gated FFN.

Shapes use one alphabet everywhere: B batch, T query length, S key length, D model, N query heads,
K kv heads, G query heads per kv head, H head dim, F FFN hidden, V vocab, E experts, P PLE dim.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
DType = Any
WEIGHT_NAME = "weight"  # checkpoint_name of each matmul weight as the math sees it (transformer.REMAT_POLICIES)


class QuantPolicy(Protocol):
    """How a model sees its weights and activations. The model math never changes with
    quantization: a policy only transforms a weight (fake-quant) or an activation before use, so
    teacher, student, PTQ baseline and exported-file loader are one module with different policies,
    and the parameter tree is identical for all of them.

    `module` is the calling linen module (a policy may keep state such as static activation scales
    in its own collection through `module.variable`); `name` is the parameter name inside it.
    """

    def weight(self, module: nn.Module, name: str, w: Array, *, in_axes: tuple[int, ...]) -> Array:
        ...

    def activation(self, module: nn.Module, name: str, x: Array, *, site: str) -> Array:
        ...


class NoQuant:
    """The float model: weights and activations pass through untouched."""

    def weight(self, module, name, w, *, in_axes):
        del module, name, in_axes
        return w

    def activation(self, module, name, x, *, site):
        del module, name, site
        return x

    def __repr__(self):
        return "NoQuant()"


def param_path(module: nn.Module, name: str) -> str:
    """'layer_3/attn/q_einsum/w': the key that recipes match their regexes against."""
    return "/".join((*module.scope.path, name))


@jax.custom_vjp
def tie_gradients(*arrays: Array) -> tuple[Array, ...]:
    """Identity in the forward; in the backward, the cotangents of `arrays` leave together (one
    optimization barrier). Tying a matmul's input to its weight (or attention's q to its k and v) makes
    the compiler finish the weight's (or k's, v's) gradient dot while the activation it reads is live,
    before the input's cotangent flows on to the layer below. Untied, XLA deferred those dots, and with
    them every layer's backward activations, to where the gradients are reduced or summed: E2B on
    8xH100 held 19 layers' attention score gradients and 38 FFN activations at once (launch/README.md)."""
    return arrays


def _tie_fwd(*arrays):
    return arrays, None


def _tie_bwd(_, cotangents):
    return tuple(jax.lax.optimization_barrier(tuple(cotangents)))


tie_gradients.defvjp(_tie_fwd, _tie_bwd)


def _normal(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class Einsum(nn.Module):
    """A projection weight `w` of a given shape, logical axes and contraction axes, applied with
    `jnp.einsum`. The quant policy sees the weight (with its contraction axes, which is where Q4_0
    blocks run) and the input/output activations. Called without `x` it returns the weight as the
    policy presents it (for grouped matmuls that are not einsums)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis name per weight dim
    in_axes: tuple[int, ...]  # contraction (input) axes of `w`
    quant: QuantPolicy
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, eqn: str | None = None, x: Array | None = None) -> Array:
        w = self.param("w", nn.with_logical_partitioning(_normal(self.init_std), self.axes), self.shape,
                       self.param_dtype)
        kernel = self.quant.weight(self, "w", w, in_axes=self.in_axes).astype(self.dtype)
        # Sharded like the parameter: the fake-quant and the cast run on each shard (Q4_0 blocks are whole
        # per shard, preflight checks it) and FSDP gathers the compute dtype, whatever the quantizer's
        # reshapes would let the partitioner prefer (launch/README.md, communication). This is also
        # the value remat="weights" keeps: a shard, not the gathered layer.
        kernel = nn.with_logical_constraint(kernel, self.axes)
        # Named so remat="weights" keeps it: the backward then reuses the forward's fake-quant.
        kernel = checkpoint_name(kernel, WEIGHT_NAME)
        if x is None:
            return kernel
        x = self.quant.activation(self, "w", x, site="in")
        x, kernel = tie_gradients(x.astype(self.dtype), kernel)
        y = jnp.einsum(eqn, x, kernel)
        return self.quant.activation(self, "w", y, site="out")


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · scale, computed in fp32. Gemma 4 multiplies by the stored scale
    directly (init 1), not by (1 + scale) as Gemma 1–3 did; `with_scale=False` is the scale-free
    norm used for V and the MoE router."""

    with_scale: bool = True
    eps: float = 1e-6
    axis_name: str | None = "norm"
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = None
        if self.with_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                               (x.shape[-1],), self.param_dtype)
            x, scale = tie_scale_gradient(x, scale)
        xf = x.astype(jnp.float32)
        # HF computes (mean + eps) ** -0.5; rsqrt gives the same value to within one ulp in fp32.
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if scale is not None:
            y = y * scale.astype(jnp.float32)
        return y.astype(x.dtype)


def tie_scale_gradient(x: Array, scale: Array) -> tuple[Array, Array]:
    """A norm's input tied to its scale (tie_gradients): the scale's gradient, a sum over B·T of the
    output's cotangent times the normalised input, is reduced inside the norm's backward. Untied, XLA
    put that small reduction late, and 31B on 4x8xH100 kept 55 layers' [B, T, D] cotangent and
    recomputed input alive for it, 18 GiB at the peak (launch/README.md). A function of its own so
    benchmarks/bench_step.py --untie-norms can time the model without it."""
    return tie_gradients(x, scale)


def rope_inv_freq(head_dim: int, theta: float, proportion: float = 1.0) -> Array:
    """Inverse frequencies for the half-split ("rotate_half") layout, one per pair (x[i], x[i+H/2]).

    Proportional RoPE (global layers) rotates only the first `int(proportion·H/2)` pairs, with
    exponents over the *full* head dim (θ^(−2i/H)); the remaining pairs get frequency 0, i.e. are
    left unrotated. proportion=1 is ordinary RoPE.
    """
    half = head_dim // 2
    rotated = int(proportion * head_dim // 2)
    i = jnp.arange(half, dtype=jnp.float32)
    inv = 1.0 / (theta ** (2.0 * i / head_dim))
    return jnp.where(i < rotated, inv, 0.0)  # [H/2]


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """x [B, T, n, H], positions [B, T] → x rotated by position·inv_freq (half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    # HF casts cos/sin to the activation dtype before multiplying; do the same for parity.
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


class FeedForward(nn.Module):
    """Gated GeLU (GeGLU): down( gelu_tanh(x·W_gate) ⊙ (x·W_up) ). `gating_einsum` is [2, F, D]
    with index 0 = gate, 1 = up, as in the official checkpoints."""

    d_model: int
    hidden: int
    quant: QuantPolicy
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, D] → [B, T, D]
        kw = dict(quant=self.quant, dtype=self.dtype, param_dtype=self.param_dtype)
        gating = Einsum((2, self.hidden, self.d_model), (None, "mlp", "embed"), (2,), name="gating_einsum", **kw)
        linear = Einsum((self.hidden, self.d_model), ("mlp", "embed"), (0,), name="linear", **kw)
        # [B, T, 2, F]: the GEMM's natural output order. With [2, B, T, F] XLA transposes the output, and the
        # input gradient contracts (2, F), two axes that are not adjacent there, through another transpose.
        gate_up = gating("BTD,CFD->BTCF", x)
        h = gelu_tanh(gate_up[..., 0, :]) * gate_up[..., 1, :]
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_mlp"))
        return linear("BTF,FD->BTD", h)
