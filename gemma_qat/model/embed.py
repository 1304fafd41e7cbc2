"""Token embedding (tied with the output head, scaled by √D) and Gemma 4's per-layer embeddings (PLE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_qat import devices, sharding
from gemma_qat.model.layers import Array, DType, Einsum, QuantPolicy, RMSNorm


def lookup(table: Array, ids: Array, column: str) -> Array:
    """table[ids] for a table [V, ..., C] sharded ("vocab", ..., `column`) and ids [B, T] sharded over the
    batch: rows [B, T, ..., C]. Ids in [-V, V) read as indexing reads them (negative ones from the end);
    beyond, they are clamped (indexing clamps them in the forward but drops their gradient).

    Left to the partitioner, a lookup under FSDP × tensor parallelism all-gathered the table over its
    vocabulary shards in the param dtype and all-reduced its gradient over the whole vocabulary (8 CPU
    devices), or gathered the global batch's fp32 cotangent (12B on v6e-64, launch/README.md). Here each
    device gathers the ids of the rows that share its column slice (the batch shards of `column`'s mesh
    axes: int32, small), looks them up in its own shard (zeros outside its vocabulary range, summed over
    the vocabulary shards) and trades the slices back by all-to-all; the gradient stays a scatter into
    the device's own shard."""
    rows_axes, vocab, cols = (sharding.mesh_axes(a) for a in ("act_batch", "vocab", column))
    shards = sharding.logical_shards("act_batch")
    if (devices.active_mesh_devices() == 1 or not set(cols) <= set(rows_axes) or ids.shape[0] % shards
            or table.shape[-1] % sharding.logical_shards(column) or table.shape[0] % sharding.logical_shards("vocab")):
        return table[ids]
    ids = jnp.clip(jnp.where(ids < 0, ids + table.shape[0], ids), 0, table.shape[0] - 1)
    spec = jax.sharding.PartitionSpec

    def local(table, ids):  # table [V/v, ..., C/c], ids [b, T]
        if cols:
            ids = jax.lax.all_gather(ids, cols, axis=0, tiled=True)  # [b·c, T]: the rows of this column slice
        if vocab:
            start = jax.lax.axis_index(vocab) * table.shape[0]
            ids = ids - start
            inside = (ids >= 0) & (ids < table.shape[0])
            rows = jnp.where(inside.reshape(inside.shape + (1,) * (table.ndim - 1)),
                             table[jnp.where(inside, ids, 0)], jnp.zeros((), table.dtype))
            rows = jax.lax.psum(rows, vocab)
        else:
            rows = table[ids]
        if cols:  # [b·c, T, ..., C/c] → [b, T, ..., C]
            rows = jax.lax.all_to_all(rows, cols, 0, rows.ndim - 1, tiled=True)
        return rows

    table_spec = spec(vocab or None, *([None] * (table.ndim - 2)), cols or None)
    return jax.shard_map(local, in_specs=(table_spec, spec(rows_axes)), out_specs=spec(rows_axes))(table, ids)


class Embedder(nn.Module):
    vocab_size: int
    d_model: int
    num_layers: int
    ple_dim: int  # 0 = no per-layer embeddings
    quant: QuantPolicy
    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=0.02)
        self.input_embedding = self.param(
            "input_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.vocab_size, self.d_model), self.param_dtype)
        if self.ple_dim:
            l, p = self.num_layers, self.ple_dim
            self.per_layer_embeddings = self.param(
                "per_layer_embeddings", nn.with_logical_partitioning(init, ("vocab", None, "ple")),
                (self.vocab_size, l, p), self.param_dtype)
            self.per_layer_model_projection = Einsum(
                (self.d_model, l, p), ("embed", None, "ple"), (0,), self.quant, dtype=self.dtype,
                param_dtype=self.param_dtype)  # a compact submodule; setup only names it
            self.per_layer_projection_norm = RMSNorm(eps=self.eps, axis_name="ple", param_dtype=self.param_dtype)

    def encode(self, tokens: Array) -> Array:
        """[B, T] ids → [B, T, D] embeddings · √D (the factor rounded to the activation dtype, as the
        reference implementations do)."""
        rows = lookup(self.input_embedding, tokens, "embed")  # [B, T, D]
        # Row-wise formats commute with the gather, so quantizing the gathered rows equals
        # quantizing the table; it avoids touching all V rows every step.
        rows = self.quant.weight(self, "input_embedding", rows, in_axes=(rows.ndim - 1,))
        return rows.astype(self.dtype) * jnp.sqrt(float(self.d_model)).astype(self.dtype)

    def decode_table(self) -> Array:
        """[V, D] output-head weights (tied), as the policy presents them."""
        return self.quant.weight(self, "input_embedding", self.input_embedding, in_axes=(1,)).astype(self.dtype)

    def per_layer_inputs(self, tokens: Array, x: Array) -> Array:
        """PLE signal for every layer, [B, T, L, P]: (RMSNorm(x·W·D^-½) + table[t]·√P) · 2^-½."""
        ids = jnp.where((tokens >= 0) & (tokens < self.vocab_size), tokens, 0)
        tok = lookup(self.per_layer_embeddings, ids, "ple")  # [B, T, L, P]
        tok = self.quant.weight(self, "per_layer_embeddings", tok, in_axes=(tok.ndim - 1,)).astype(self.dtype)
        tok = tok * jnp.sqrt(float(self.ple_dim)).astype(self.dtype)
        proj = self.per_layer_model_projection("BTD,DLP->BTLP", x) * jnp.asarray(self.d_model**-0.5, self.dtype)
        proj = self.per_layer_projection_norm(proj)
        return (proj + tok) * jnp.asarray(2.0**-0.5, self.dtype)


def logits_from_hidden(h: Array, table: Array, *, softcap: float | None) -> Array:
    """The tied head: fp32 logits = softcap(h @ tableᵀ) = c·tanh(z/c); h [..., D] any float, table [V, D]
    (cast to h's dtype: bf16 operands, fp32 accumulation, never an fp32 GEMM on bf16 h). The one
    definition for the model's forward, the chunked losses (loss/) and evaluation (eval/)."""
    z = jnp.einsum("...d,vd->...v", h, table.astype(h.dtype), preferred_element_type=jnp.float32)  # [..., V]
    z = z.astype(jnp.float32)  # einsum may keep an fp64/other input dtype; pin fp32
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z
