"""The 26B-A4B mixture-of-experts FFN: softmax router on the un-normalised residual, top-k with
renormalised weights times a per-expert scale, GeGLU experts run as grouped matmuls (grouped_matmul.py:
ragged_dot on TPU, Pallas grouped-GEMM kernels on one Hopper GPU, a padded-block GEMM elsewhere) so no
token is dropped and the result equals the dense reference. Tokens move to expert order and back by
gathers only, forward and backward (gather_rows)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_qat.model.grouped_matmul import grouped_matmul
from gemma_qat.model.layers import Array, DType, Einsum, QuantPolicy, RMSNorm, gelu_tanh


class MoE(nn.Module):
    d_model: int
    num_experts: int
    top_k: int
    hidden: int  # per-expert FFN width
    quant: QuantPolicy
    eps: float = 1e-6
    grouped: str = "auto"  # grouped_matmul impl: ragged | blocked | kernel | auto
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, router_input: Array) -> Array:
        # x [B, T, D]: the pre_ffw_norm'ed residual fed to experts; router_input [B, T, D]: the raw residual.
        d, e, f = self.d_model, self.num_experts, self.hidden
        kw = dict(quant=self.quant, dtype=self.dtype, param_dtype=self.param_dtype)
        router_scale = self.param("router_scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                  (d,), self.param_dtype)
        per_expert_scale = self.param("per_expert_scale",
                                      nn.with_logical_partitioning(nn.initializers.ones, (None,)), (e,),
                                      self.param_dtype)
        router = Einsum((d, e), ("embed", None), (0,), name="router_logits", **kw)
        gating = Einsum((e, 2, f, d), ("expert", None, "expert_mlp", "embed"), (3,), name="gating_einsum", **kw)
        linear = Einsum((e, f, d), ("expert", "expert_mlp", "embed"), (1,), name="linear", **kw)

        # Router: scale-free RMSNorm · router_scale · D^-0.5, logits and softmax in fp32.
        z = RMSNorm(with_scale=False, eps=self.eps)(router_input)
        z = z * router_scale.astype(z.dtype) * jnp.asarray(d**-0.5, z.dtype)
        logits = jnp.einsum("BTD,DE->BTE", z, router(), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = jax.lax.top_k(probs, self.top_k)  # [B, T, k]
        top_w = top_p / jnp.sum(top_p, axis=-1, keepdims=True) * per_expert_scale.astype(jnp.float32)[top_i]

        b, t, _ = x.shape
        xf = x.reshape(b * t, d).astype(self.dtype)
        flat_e = top_i.reshape(-1)  # [BT·k]
        order = jnp.argsort(flat_e, stable=True)  # group assignments by expert
        inv = jnp.argsort(order)  # where each (token, slot) assignment sits in expert order
        group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
        xs = gather_rows(xf, order // self.top_k, inv, self.top_k)  # [BT·k, D]
        w_gu = gating().reshape(e, 2 * f, d)  # [E, 2F, D] as stored: the kernels read it transposed in place
        gu = grouped_matmul(xs, w_gu, group_sizes, impl=self.grouped, transpose_w=True).astype(self.dtype)
        h = gelu_tanh(gu[:, :f]) * gu[:, f:]  # [BT·k, F]
        ys = grouped_matmul(h, linear(), group_sizes, impl=self.grouped)  # [BT·k, D], expert order
        ys = gather_rows(ys, inv, order, 1).reshape(b * t, self.top_k, d)  # [BT, k, D], token order
        # A multiply and a k-sum (one fusion), not an einsum: XLA would make a K = 8 batched dot of it.
        out = jnp.sum(ys.astype(jnp.float32) * top_w.reshape(b * t, self.top_k, 1), axis=1)  # [BT, D]
        return out.reshape(b, t, d).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rows(x: Array, idx: Array, back: Array, fold: int) -> Array:
    """x[idx] for idx = perm // fold, perm a permutation of x's rows × fold whose inverse is `back`.

    Autodiff would transpose the gather into a scatter-add (atomic adds on GPU, serialised updates on
    TPU). Here the backward is a gather too: row r of x collects the cotangent rows back[r·fold : (r+1)·fold].
    fold = 1 is a permutation (back = its inverse); fold = k sends each token to its k experts.
    """
    return x[idx]


def _gather_rows_fwd(x, idx, back, fold):
    return x[idx], (back, idx)


def _gather_rows_bwd(fold, res, g):  # g [N·fold, D] → [N, D]
    back, idx = res
    dx = g[back].reshape(-1, fold, g.shape[-1])
    dx = dx[:, 0] if fold == 1 else jnp.sum(dx.astype(jnp.float32), axis=1).astype(g.dtype)
    return dx, _int_zero(idx), _int_zero(back)


def _int_zero(a: Array) -> Array:
    return jnp.zeros(a.shape, jax.dtypes.float0)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
