"""Collectives counted from compiled HLO text: programs with known communication compiled on the 8 fake CPU
devices (conftest), hand-written HLO for the spellings XLA:CPU never prints, and real GPU-compiler output.

Parameters are fp32 because XLA:CPU gathers bf16 weights in fp32 (it converts before the all-gather),
so a bf16 dtype check only means something on the GPU file below."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_qat.preflight import collectives as C, hlo, replica_groups

MESH = Mesh(np.array(jax.devices()[:8]), ("d",))
GPU_FSDP = Path(__file__).parent / "data" / "hlo_gpu_fsdp_bf16.txt"  # jax 0.11.2 GPU AOT, 8 devices, H200 host


def _compile(f, *args):
    return C.from_compiled(jax.jit(f).lower(*args).compile())


def _smap(f, in_spec, out_spec, mesh=MESH):
    return jax.shard_map(f, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False)


def test_fsdp_weight_gathers_move_seven_eighths_of_the_parameters():
    layers, d_model = 4, 256
    w = jax.ShapeDtypeStruct((layers, d_model, d_model), jnp.float32, sharding=NamedSharding(MESH, P(None, "d")))
    x = jax.ShapeDtypeStruct((64, d_model), jnp.float32, sharding=NamedSharding(MESH, P("d")))

    def loss(w, x):
        def layer(h, wl):  # FSDP: each layer's weight is gathered whole before its matmul
            return jnp.tanh(h @ jax.lax.with_sharding_constraint(wl, NamedSharding(MESH, P()))), None
        h, _ = jax.lax.scan(layer, x, w)
        return (h ** 2).sum()

    cs = _compile(jax.grad(loss), w, x)
    gathers = [c for c in cs if c.source == "weights"]
    param_bytes = layers * d_model * d_model * 4
    # Independent count: every layer's full fp32 weight arrives once, less the 1/8 each device holds.
    assert sum(c.bytes_per_step for c in gathers) == param_bytes * 7 // 8
    assert all(c.kind == "all-gather" and c.group_size == 8 and c.loop_trip_counts == (layers,) for c in gathers)
    assert C.weight_gather_dtypes(cs) == {"f32": param_bytes * 7 // 8}
    grads = [c for c in cs if c.source == "gradients"]
    assert grads and all(c.kind in ("all-reduce", "reduce-scatter") and "transpose(" in c.op_name for c in grads)
    assert all(c.runs == layers for c in grads)  # inside the backward scan


def test_shard_map_collectives_kinds_bytes_groups():
    shard = (64, 128)  # per device, fp32: 32 KiB
    b = 64 * 128 * 4
    a = jax.ShapeDtypeStruct((8 * 64, 128), jnp.float32, sharding=NamedSharding(MESH, P("d")))
    full = jax.ShapeDtypeStruct((8 * 64, 128), jnp.float32, sharding=NamedSharding(MESH, P()))
    (ar,) = _compile(_smap(lambda v: jax.lax.psum(v, "d"), P("d"), P()), a)
    assert (ar.kind, ar.group_size, ar.dtypes, ar.shapes) == ("all-reduce", 8, ("f32",), (shard,))
    assert ar.bytes_moved == 2 * b * 7 // 8 and ar.source == "activations" and ar.runs == 1
    (rs,) = _compile(_smap(lambda v: jax.lax.psum_scatter(v, "d", tiled=True), P(), P("d")), full)
    assert (rs.kind, rs.group_size, rs.input_bytes) == ("reduce-scatter", 8, 8 * b)
    assert rs.bytes_moved == 8 * b * 7 // 8
    (a2a,) = _compile(_smap(lambda v: jax.lax.all_to_all(v, "d", 0, 0, tiled=True), P("d"), P("d")), a)
    assert (a2a.kind, a2a.input_bytes, a2a.bytes_moved) == ("all-to-all", b, b * 7 // 8)
    ring = [(i, (i + 1) % 8) for i in range(8)]
    (pp,) = _compile(_smap(lambda v: jax.lax.ppermute(v, "d", ring), P("d"), P("d")), a)
    assert (pp.kind, pp.bytes_moved, pp.groups) == ("collective-permute", b, [list(p) for p in ring])
    assert pp.spans_hosts(chips_per_host=8) is False and pp.spans_hosts(chips_per_host=4) is True


def test_subgroups_and_host_spans():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    x = jax.ShapeDtypeStruct((8 * 64, 128), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"))))
    (over_b,) = _compile(_smap(lambda v: jax.lax.psum(v, "b"), P(("a", "b")), P("a"), mesh), x)
    (over_a,) = _compile(_smap(lambda v: jax.lax.psum(v, "a"), P(("a", "b")), P("b"), mesh), x)
    assert over_b.groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and over_b.spans_hosts(4) is False
    assert over_a.groups == [[0, 4], [1, 5], [2, 6], [3, 7]] and over_a.spans_hosts(4) is True
    links = C.link_bytes([over_a, over_b], chips_per_host=4)
    assert links == {"intra_host": over_b.bytes_moved, "inter_host": over_a.bytes_moved, "unknown_groups": 0}


def _inst(attrs: str) -> hlo.Instruction:
    return hlo.Instruction("x", "f32[8]{0}", "all-reduce", ["p"], attrs, "c")


@pytest.mark.parametrize("spec, groups", [
    ("{{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("mesh['x'=2,'y'=4] {'y'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("mesh['x'=2,'y'=4] {'x'}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("mesh['x'=8] {'x':(2)4}", [[0, 1, 2, 3], [4, 5, 6, 7]]),  # the minor sub-axis of size 4
    ("mesh['x'=8] {'x':(1)2}", [[0, 4], [1, 5], [2, 6], [3, 7]]),  # the major sub-axis of size 2
    ("{}", [list(range(8))]),
])
def test_replica_group_spellings(spec, groups):
    n, got = replica_groups.parse(_inst(f"channel_id=1, replica_groups={spec}, to_apply=%add"), num_devices=8)
    assert (n, got) == (len(groups[0]), groups)


# Async spellings the CPU compiler never prints, in XLA's own grammar: a reduce-scatter wrapped in an
# async computation with a matmul scheduled beside it, an all-gather-start/done with nothing between,
# and a while loop without a known trip count.
ASYNC_HLO = """HloModule m, is_scheduled=true, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%wrapped (p: f32[64,32]) -> f32[16,32] {
  %p = f32[64,32]{1,0} parameter(0)
  ROOT %rs = f32[16,32]{1,0} reduce-scatter(%p), replica_groups=[1,4]<=[4], to_apply=%add, metadata={op_name="transpose(jvp())"}
}

%body (t: (s32[], bf16[8,32])) -> (s32[], bf16[8,32]) {
  %t = (s32[], bf16[8,32]{1,0}) parameter(0)
  %w = bf16[8,32]{1,0} get-tuple-element(%t), index=1
  %ag = ((bf16[8,32]{1,0}), bf16[32,32]{1,0}) all-gather-start(%w), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = bf16[32,32]{1,0} all-gather-done(%ag)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], bf16[8,32]{1,0}) tuple(%i, %w)
}

%cond (t: (s32[], bf16[8,32])) -> pred[] {
  %t = (s32[], bf16[8,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[64,32], y: f32[32,32], w: bf16[8,32]) -> f32[16,32] {
  %x = f32[64,32]{1,0} parameter(0)
  %y = f32[32,32]{1,0} parameter(1)
  %w = bf16[8,32]{1,0} parameter(2)
  %start = ((f32[64,32]{1,0}), f32[16,32]{1,0}) async-start(f32[64,32]{1,0} %x), calls=%wrapped
  %mm = f32[64,32]{1,0} fusion(%x, %y), kind=kOutput, calls=%add
  %done = f32[16,32]{1,0} async-done(%start), calls=%wrapped
  %i0 = s32[] constant(0)
  %t0 = (s32[], bf16[8,32]{1,0}) tuple(%i0, %w)
  %loop = (s32[], bf16[8,32]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %out = f32[16,32]{1,0} add(%done, %done)
}
"""


def test_async_wrappers_overlap_and_unknown_trip_count():
    by_kind = {c.kind: c for c in C.from_text(ASYNC_HLO)}
    rs, ag = by_kind["reduce-scatter"], by_kind["all-gather"]
    assert rs.is_async and rs.overlapped and rs.computation == "main"  # the fusion %mm runs between
    assert (rs.group_size, rs.bytes_moved, rs.runs) == (4, 64 * 32 * 4 * 3 // 4, 1)
    assert rs.source == "gradients"  # backward (transpose), and its input has entry parameter %x's shape
    assert ag.is_async and ag.overlapped is False  # nothing scheduled between start and done
    assert (ag.dtype, ag.runs, ag.loop_trip_counts) == ("bf16", None, (None,))  # no known_trip_count
    summary = C.summarize(list(by_kind.values()))
    assert summary["unknown_runs"] == 1 and summary["bytes"] == rs.bytes_moved


def test_real_gpu_compiler_output_fsdp_bf16():
    """The GPU compiler's async all-gather/all-reduce pairs: bf16 weight gathers, overlapped, 4 loop runs."""
    cs = C.from_text(GPU_FSDP.read_text())
    assert sorted((c.kind, c.source) for c in cs) == [("all-gather", "weights"), ("all-reduce", "gradients")]
    assert all(c.is_async and c.overlapped and c.runs == 4 for c in cs)
    layer_bytes = 1024 * 1024 * 2  # one [1024, 1024] bf16 layer, gathered from [128, 1024] shards
    assert C.weight_gather_dtypes(cs) == {"bf16": 4 * layer_bytes * 7 // 8}
    table = C.format_table(cs)
    assert "weights, overlapped" in table and "gradients, overlapped" in table


@pytest.mark.slow
def test_tiny_training_step_on_8_devices():
    """The real gemma-qat step (configs/tiny.toml, fsdp=8): FSDP gathers and gradient reductions only."""
    from gemma_qat.preflight.check import run_preflight
    from gemma_qat.train.config import load_run_config
    report = run_preflight(load_run_config("configs/tiny.toml"), "8xH100", cpu_compile=True)
    compiled = getattr(report, "compiled_program", None)
    if compiled is None:  # Report.compiled_program is being added in /work/main; wired at merge
        pytest.skip("Report.compiled_program not on this branch yet")
    cs = C.from_compiled(compiled)
    s = C.summarize(cs, chips_per_host=8)
    assert s["unknown_runs"] == 0 and s["bytes"] > 0
    # A pure FSDP mesh: parameters dominate, and the fp32 master weights are gathered in fp32 on CPU.
    assert s["by_source"]["weights"]["bytes"] + s["by_source"]["gradients"]["bytes"] > 0.9 * s["bytes"]
    assert set(C.weight_gather_dtypes(cs)) == {"f32"}
    assert s["links"]["inter_host"] == 0  # one host of 8
