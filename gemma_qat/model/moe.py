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

from gemma_qat import devices, sharding
from gemma_qat.model.grouped_matmul import grouped_matmul
from gemma_qat.model.layers import Array, DType, Einsum, QuantPolicy, RMSNorm, gelu_tanh, tie_gradients


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
        z, w_router = tie_gradients(z, router())  # as Einsum does for its input and weight (layers.py)
        logits = jnp.einsum("BTD,DE->BTE", z, w_router, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = jax.lax.top_k(probs, self.top_k)  # [B, T, k]
        top_w = top_p / jnp.sum(top_p, axis=-1, keepdims=True) * per_expert_scale.astype(jnp.float32)[top_i]

        xc = x.astype(self.dtype)
        w_gu, w_down = gating(), linear()  # [E, 2, F, D], [E, F, D]
        if devices.active_mesh_devices() == 1:
            return _experts(xc, top_i, top_w, w_gu, w_down, grouped=self.grouped, tensor_axes=()).astype(x.dtype)
        # Under a mesh, each device routes its own rows: the sort, the grouped matmuls and the way back
        # stay local (shard_map). Left to the partitioner, the sort over all of the step's B·T·k routed
        # rows made every device gather and multiply all of them (26B-A4B on v5p-128: 4.2 TB of
        # all-reduce per step per chip, launch/README.md). The expert weights enter as the shards their
        # parameters hold (fake-quantized and cast, so bf16) and are gathered over expert/fsdp inside:
        # the transpose of that all_gather is a reduce-scatter of their gradients straight into the
        # shards, where gathering them outside left the gradient as a full all-reduce over all the batch
        # devices (twice the bytes; 1 GB per layer there). Their FFN dim stays split over tensor.
        rows = sharding.mesh_axes("act_batch") or None
        ex, emb, ffn = (sharding.mesh_axes(a) for a in ("expert", "embed", "expert_mlp"))
        spec = jax.sharding.PartitionSpec
        local = jax.shard_map(
            functools.partial(_experts, grouped=self.grouped, tensor_axes=ffn, gather_axes=(ex, emb), per_device=True),
            in_specs=(spec(rows), spec(rows), spec(rows), spec(ex or None, None, ffn or None, emb or None),
                      spec(ex or None, ffn or None, emb or None)),
            out_specs=spec(rows))
        return local(xc, top_i, top_w, w_gu, w_down).astype(x.dtype)


def _experts(x: Array, top_i: Array, top_w: Array, w_gu: Array, w_down: Array, *, grouped: str,
             tensor_axes: tuple[str, ...], gather_axes: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
             per_device: bool = False) -> Array:
    """x [B, T, D], top_i / top_w [B, T, k], w_gu [E, 2, F, D], w_down [E, F, D] → [B, T, D]. Inside a
    shard_map (`per_device`): F split over `tensor_axes` (the down projection's partial sums are added over
    them), the weights' shards of E and D gathered over `gather_axes` = (expert axes, embed axes), and the
    grouped matmuls free to be the Hopper kernels under any mesh: XLA's blocked form kept a padded copy of
    the routed rows per layer and gathered an expert matrix per row block (26B-A4B on 4x8xH100: 74 GiB of
    temporaries, launch/README.md)."""
    ex, emb = gather_axes
    if tensor_axes:
        # Marked varying over tensor here, before the rows are copied k-fold: the backward then adds the
        # input's partial gradients over tensor on [BT, D], not on the routed [BT·k, D].
        x = sharding.vary(x, tensor_axes)
    # The weight shards vary over the rows' axes too (data), before the gather: their gradients are then
    # summed over data on the shard, after the reduce-scatter; and tie_gradients sees one type in and out.
    w_gu, w_down = (sharding.vary(w, sharding.varying_axes(x) - sharding.varying_axes(w)) for w in (w_gu, w_down))
    if ex or emb:
        # The shards' gradients (the reduce-scatters that transpose the gathers below) leave with the
        # input's: without this the compiler kept every layer's full-size bf16 expert-weight gradients
        # ([128, 2816, 704] and [128, 352, 2816] per layer of 26B-A4B) for one combined reduce-scatter
        # at the end of the backward, 20.6 GiB on v5p-128 (launch/README.md).
        x, w_gu, w_down = tie_gradients(x, w_gu, w_down)
    if ex:
        w_gu, w_down = (jax.lax.all_gather(w, ex, axis=0, tiled=True) for w in (w_gu, w_down))
    if emb:
        w_gu, w_down = (jax.lax.all_gather(w, emb, axis=w.ndim - 1, tiled=True) for w in (w_gu, w_down))
    b, t, d = x.shape
    e, _, f, _ = w_gu.shape
    k = top_i.shape[-1]
    xf = x.reshape(b * t, d)
    flat_e = top_i.reshape(-1)  # [BT·k]
    order = jnp.argsort(flat_e, stable=True)  # group assignments by expert
    inv = jnp.argsort(order)  # where each (token, slot) assignment sits in expert order
    group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
    xs = gather_rows(xf, order // k, inv, k)  # [BT·k, D]
    w_gu = w_gu.reshape(e, 2 * f, d)  # [E, 2F, D] as stored: the kernels read it transposed in place
    # Each expert weight's gradient leaves the backward with its input's (layers.tie_gradients). Untied,
    # the compiler deferred the weight-gradient grouped matmuls of all 30 layers of 26B-A4B to the
    # gradient reduce-scatter, keeping every layer's routed rows and their cotangents live at once
    # (v5p-128: 36 GiB of a 49.7 GiB temp, launch/README.md).
    xs, w_gu = tie_gradients(xs, w_gu)
    gu = grouped_matmul(xs, w_gu, group_sizes, impl=grouped, transpose_w=True, per_device=per_device).astype(x.dtype)
    h = gelu_tanh(gu[:, :f]) * gu[:, f:]  # [BT·k, F]
    h, w_down = tie_gradients(h, w_down)
    ys = grouped_matmul(h, w_down, group_sizes, impl=grouped, per_device=per_device)  # [BT·k, D], expert order
    ys = gather_rows(ys, inv, order, 1).reshape(b * t, k, d)  # [BT, k, D], token order
    # A multiply and a k-sum (one fusion), not an einsum: XLA would make a K = 8 batched dot of it.
    out = jnp.sum(ys.astype(jnp.float32) * top_w.reshape(b * t, k, 1), axis=1)  # [BT, D]
    if tensor_axes:
        out = jax.lax.psum(out, tensor_axes)
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
