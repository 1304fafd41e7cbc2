"""Flash attention on TPU: JAX's Pallas splash-attention kernel with our mask rule.

The XLA path (attention.attend, impl "xla") materialises the fp32 scores [B, K, G, T, S] and their bf16
probabilities in HBM, forward, in the remat recompute and in the backward; on a TPU slice that was a
quarter of 26B-A4B's memory traffic (launch/README.md). Splash attention keeps them in VMEM tiles and
skips the tiles the mask rules out (most of a sliding layer's). The kernel is a pallas_call, opaque to
the SPMD partitioner, so under a mesh it runs in a shard_map over the batch and head axes.

Layout: one kernel call per (row, KV head) as MQA over that KV head's G query heads ([G, T, H] against
[S, H]), vmapped over K and B. Masks: causal, the sliding window as LocalMask (W−1 keys to the left,
none to the right: a token sees itself and W−1 before it, as attention_mask), packed documents as
SegmentIds. No scaling of q (Gemma 4's QK-norm replaces 1/√H). Off TPU the kernel runs in Pallas'
interpreter (tests only: slow, but the same kernel and masks).
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from gemma_qat import devices, sharding

Array = jax.Array
BLOCK = 512  # tile of q and kv rows (MaxText's default for splash); smaller T takes its largest fit
MIN_BLOCK = 128  # the kernel's lane width: T and H must be multiples of it


def fits(t: int, s: int, h: int) -> bool:
    """Shapes the kernel takes: self-attention over a whole sequence, lane-aligned T and head dim."""
    return t == s and t % MIN_BLOCK == 0 and h % MIN_BLOCK == 0


def applies(q: Array, key: Array, head_shards: int) -> bool:
    """Whether `splash_attention` takes q [B, T, N, H] and key [B, S, K, H] split `head_shards` ways: the
    shapes fit, the query heads split, the KV heads split or repeat to the shards, and rows × heads
    cover the active mesh (see `covers_mesh`)."""
    n, k = q.shape[2], key.shape[2]
    return (fits(q.shape[1], key.shape[1], q.shape[-1]) and n % head_shards == 0
            and (k % head_shards == 0 or head_shards % k == 0) and covers_mesh(head_shards))


def _blocks(t: int) -> sa.BlockSizes:
    b = math.gcd(t, BLOCK)
    return sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                         block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


@functools.lru_cache(maxsize=32)
def _kernel(t: int, g: int, window: int | None, interpret: bool):
    # Built once per shape: the mask's block map is computed on the host in numpy.
    one = sa.CausalMask((t, t)) if window is None else sa.LocalMask((t, t), (window - 1, 0), offset=0)
    return sa.make_splash_mqa(sa.MultiHeadMask([one] * g), head_shards=1, q_seq_shards=1,
                              block_sizes=_blocks(t), interpret=interpret)


def _local(q: Array, key: Array, value: Array, segment_ids: Array | None, window: int | None) -> Array:
    """q [b, T, n, H], key/value [b, S, k, H] (n a multiple of k) → [b, T, n, H], on this device's rows."""
    b, t, n, h = q.shape
    k = key.shape[2]
    kernel = _kernel(t, n // k, window, devices.platform() != "tpu")
    qg = q.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)  # [b, k, G, T, H]
    kk, vv = (a.transpose(0, 2, 1, 3) for a in (key, value))  # [b, k, S, H]
    if segment_ids is None:
        one = lambda q1, k1, v1: kernel(q1, k1, v1)  # noqa: E731
        out = jax.vmap(jax.vmap(one))(qg, kk, vv)
    else:
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(s1, s1))  # noqa: E731
        out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, kk, vv, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def splash_attention(q: Array, key: Array, value: Array, segment_ids: Array | None, window: int | None,
                     head_shards: int = 1) -> Array:
    """attend()'s contract (q [B, T, N, H], key/value [B, S, K, H]) through the splash kernel. Under a
    mesh: rows over the batch axes, heads over `head_shards` ways of the tensor axes. A KV head count the
    head shards do not divide (E2B's single KV head over tensor = 2) is repeated to one copy per shard,
    so each device's query heads find their KV head locally; its gradient sums the copies back."""
    k = key.shape[2]
    if head_shards > 1 and k % head_shards:
        rep = head_shards // k  # `applies` checks head_shards % k == 0
        key, value = (a.repeat(rep, axis=2) for a in (key, value))
    if devices.active_mesh_devices() == 1:
        return _local(q, key, value, segment_ids, window)
    spec = jax.sharding.PartitionSpec
    rows = sharding.mesh_axes("act_batch") or None
    heads = sharding.mesh_axes("act_heads") or None
    x = spec(rows, None, heads, None)
    fn = functools.partial(_local, window=window)
    # check_vma=False: the kernel's pallas_call declares no varying-axes type for its outputs. Safe here
    # because every input and the output are split over every mesh axis (`covers_mesh`), so nothing is
    # replicated whose gradient the transpose would have to sum.
    if segment_ids is None:
        return jax.shard_map(lambda a, b, c: fn(a, b, c, None), in_specs=(x, x, x), out_specs=x,
                             check_vma=False)(q, key, value)
    return jax.shard_map(fn, in_specs=(x, x, x, spec(rows, None)), out_specs=x,
                         check_vma=False)(q, key, value, segment_ids)


def covers_mesh(head_shards: int) -> bool:
    """Whether rows × heads split the active mesh's every device (1 outside a mesh)."""
    return sharding.logical_shards("act_batch") * head_shards == devices.active_mesh_devices()
