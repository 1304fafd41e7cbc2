"""Token embedding (tied with the output head, scaled by √D) and Gemma 4's per-layer embeddings (PLE)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from gemma_qat.model.layers import Array, DType, Einsum, QuantPolicy, RMSNorm


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
        rows = self.input_embedding[tokens]
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
        tok = self.per_layer_embeddings[ids]  # [B, T, L, P]
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
