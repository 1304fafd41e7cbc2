"""Grouped matmul for MoE experts: rows sorted by expert, each group times its own weight matrix.

`jax.lax.ragged_dot` says exactly this and TPUs run it natively. XLA on GPU and CPU lowers it densely
instead: every row is multiplied by every expert (the group masks are applied to a [G, M, K] copy of the
input or to a [G, M, N] product). That is G× the FLOPs, and for 26B-A4B (G = 128, M = 32,768 token-expert
rows, N = 1,408) a 22 GiB buffer, which does not fit an 80 GB card next to the model.

The blocked form keeps shapes static and work proportional to the rows. Each group is padded to whole
blocks of `block` rows, so every block belongs to one expert. Then one batched GEMM multiplies the blocks by
their expert's weights, gathered per block:

    blocks  nb = ceil(M / block) + G       (an upper bound: Σ ceil(s_g / block) ≤ M / block + G)
    xp [nb, block, K] = rows scattered to their padded slots (zeros elsewhere)
    yp [nb, block, N] = xp · w[block_group]          (bf16 operands, fp32 accumulation)
    y  [M, N]         = yp gathered back from the slots

Padding costs at most G · (block − 1) extra rows; the weight gather moves nb · K · N elements, which
is bounded by (M / block + G) expert matrices, not by G · M. Autodiff gives the backward: a gather for
dx and a segment-sum of the per-block weight gradients for dw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
GROUPED_IMPLS = ("ragged", "blocked", "auto")


def grouped_matmul(x: Array, w: Array, group_sizes: Array, *, impl: str = "auto", block: int = 128,
                   preferred_element_type=jnp.float32) -> Array:
    """x [M, K] (rows sorted by group), w [G, K, N], group_sizes [G] int (sum M) → [M, N].

    impl "ragged": jax.lax.ragged_dot. "blocked": the padded-block form above. "auto": ragged on TPU,
    where it is native, and blocked elsewhere."""
    if impl == "auto":
        impl = "ragged" if jax.default_backend() == "tpu" else "blocked"
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)
    if impl != "blocked":
        raise ValueError(f"unknown grouped matmul impl {impl!r}; use one of {GROUPED_IMPLS}")
    m, k = x.shape
    g, _, n = w.shape
    nb = -(-m // block) + g
    sizes = group_sizes.astype(jnp.int32)
    blocks = (sizes + block - 1) // block  # [G] blocks per group
    row_end, block_end = jnp.cumsum(sizes), jnp.cumsum(blocks)  # [G] inclusive prefix sums
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.searchsorted(row_end, rows, side="right")  # [M]
    first_row, first_block = row_end - sizes, block_end - blocks  # [G] exclusive prefix sums
    slot = first_block[row_group] * block + rows - first_row[row_group]  # [M] padded position
    xp = jnp.zeros((nb * block, k), x.dtype).at[slot].set(x, unique_indices=True)
    block_group = jnp.searchsorted(block_end, jnp.arange(nb, dtype=jnp.int32), side="right")
    wb = w[jnp.minimum(block_group, g - 1)]  # [nb, K, N]; blocks past the last used one hold zero rows
    yp = jnp.einsum("nbk,nkf->nbf", xp.reshape(nb, block, k), wb, preferred_element_type=preferred_element_type)
    return yp.reshape(nb * block, n)[slot]  # [M, N]
