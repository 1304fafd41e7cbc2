"""Preflight: per-device sizes from shapes × shardings (checked against a real compile on 8 fake CPU
devices), the TPU fallback, clear mesh errors, and every preset config.

The full-size presets run shapes + shardings only (`lower=False`): tracing and lowering a full E2B
step takes ~15-45 s on two shared cores; `gemma-qat preflight` does it (see launch/README.md).
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat import sharding
from gemma_qat.preflight import compilers, topologies
from gemma_qat.model.config import get_config
from gemma_qat.preflight.check import PreflightError, run_preflight
from gemma_qat.train.config import load_run_config
from gemma_qat.cli import preflight as cli

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.toml"
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.toml") if p.stem.endswith(("-q4_0", "-mobile")))


def _rows(report) -> dict[str, int]:
    return {what: b for what, b, _ in report.rows}


def test_topology_table():
    t = topologies.parse("v5p-64")
    assert (t.chips, t.hosts, t.chips_per_host, t.tpu_shape, t.platform) == (32, 8, 4, (2, 4, 4), "tpu")
    assert topologies.parse("v6e-8").hosts == 1 and topologies.parse("v6e-16").hosts == 4
    g = topologies.parse("4x8xH100")
    assert (g.chips, g.hosts, g.platform, g.lowering_platform) == (32, 4, "gpu", "cuda")
    assert topologies.parse("8xH200").hbm_bytes > topologies.parse("8xH100").hbm_bytes
    for bad, match in [("v5p-12", "multiple of 8"), ("a100", "unknown topology"), ("9xH100", "1-8 GPUs")]:
        with pytest.raises(ValueError, match=match):
            topologies.parse(bad)


def test_tiny_on_8xh100_compiles_without_allocating_and_sizes_are_exact():
    cfg = load_run_config(TINY)
    live = len(jax.live_arrays())
    r = run_preflight(cfg, "8xH100", cpu_compile=True)
    assert len(jax.live_arrays()) == live  # shapes only: nothing was put on a device
    assert r.ok and r.fits and r.mesh["fsdp"] == 8
    assert "compiled on XLA:CPU" in r.step_check and r.compiled is not None
    rows = _rows(r)
    # XLA's own argument buffers = our params + optimizer + teacher, plus the batch (5 int32 [1, 64]
    # rows per device) and the step counter and rng (4 + 8 bytes): the "exact" rows are exact.
    batch = 5 * r.rows_per_device * cfg.data.seq_len * 4
    exact = rows["student params"] + rows["optimizer state"] + rows["teacher params"]
    assert r.compiled["argument_size"] == exact + batch + 12
    assert not r.target_compiled and r.total_source.startswith("exact sizes + activation estimate")
    assert "estimate" in dict((w, s) for w, _, s in r.rows)["activations + temporaries"]
    assert r.largest[0].path == "embedder/per_layer_embeddings" and len(r.largest) == 10


def test_remat_weights_adds_the_layers_matmul_weights_to_the_estimate():
    """remat="weights" keeps every layer's matmul weights in the compute dtype, as sharded on the device
    (the named value is the fake-quantized weight held to its parameter's sharding), on top of what
    remat="full" keeps; the count is checked against the initialised tree and its shardings."""
    from flax import traverse_util

    from gemma_qat.model.params import abstract_params, init_params, logical_axes

    full = run_preflight(load_run_config(TINY, ["remat=full"]), "8xH100", lower=False)
    weights = run_preflight(load_run_config(TINY, ["remat=weights"]), "8xH100", lower=False)
    cfg = load_run_config(TINY)
    model = get_config(cfg.model.name)
    mesh = sharding.make_mesh(sharding.MeshConfig(**weights.mesh, parallelism=weights.parallelism))
    shardings = traverse_util.flatten_dict(
        sharding.tree_shardings(abstract_params(model), logical_axes(model), mesh, weights.parallelism))
    params = traverse_util.flatten_dict(init_params(model, jax.random.PRNGKey(0)))
    layer_w = sum(math.prod(shardings[k].shard_shape(v.shape)) for k, v in params.items()
                  if k[0].startswith("layer_") and k[-1] == "w")
    assert layer_w < sum(v.size for k, v in params.items() if k[0].startswith("layer_") and k[-1] == "w")
    c = 2 if cfg.optimizer.compute_dtype == "bfloat16" else 4
    assert weights.estimate_terms["saved_activations"] - full.estimate_terms["saved_activations"] == layer_w * c


def test_scan_layers_adds_the_stacked_copies_to_the_estimate():
    """scan_layers stacks the scanned layers' params each step (and their gradient, and the teacher's): the
    estimate carries those per-device bytes, checked against the tree and its shardings."""
    from flax import traverse_util

    from gemma_qat.model.params import abstract_params, logical_axes

    over = ["model.name=tiny-31b", "mesh.fsdp=4", "mesh.data=2"]
    plain = run_preflight(load_run_config(TINY, over), "8xH100", lower=False)
    scanned = run_preflight(load_run_config(TINY, over + ["scan_layers=true"]), "8xH100", lower=False)
    model = get_config("tiny-31b")
    mesh = sharding.make_mesh(sharding.MeshConfig(**scanned.mesh, parallelism=scanned.parallelism))
    shardings = traverse_util.flatten_dict(
        sharding.tree_shardings(abstract_params(model), logical_axes(model), mesh, scanned.parallelism))
    shapes = traverse_util.flatten_dict(abstract_params(model))
    layer_elems = sum(math.prod(shardings[k].shard_shape(v.shape)) for k, v in shapes.items()
                      if k[0].startswith("layer_"))  # tiny-31b: every layer is in the scan
    cfg = load_run_config(TINY, over)
    student_b = {"float32": 4, "bfloat16": 2}[cfg.optimizer.param_dtype]
    teacher_b = {"float32": 4, "bfloat16": 2}[cfg.teacher.param_dtype]
    assert plain.estimate_terms["scan_stacks"] == 0
    assert scanned.estimate_terms["scan_stacks"] == layer_elems * (2 * student_b + teacher_b) > 0


def test_moe_expert_weights_in_flight_are_gathered_over_expert_in_the_compute_dtype():
    """The MoE gathers its expert weights over `expert` and `fsdp` inside its shard_map, cast to the compute
    dtype (model/moe.py): the largest layer in flight holds every expert whatever the expert sharding.
    Checked against the tree: the layer's expert weights whole (over tensor 1) in the compute dtype plus
    its other weights gathered over fsdp in the param dtype."""
    from flax import traverse_util

    from gemma_qat.model.params import abstract_params

    over = ["model.name=tiny-26b-a4b", "mesh.parallelism=fsdp_tp_ep", "mesh.fsdp=2", "mesh.data=-1",
            "data.global_batch_size=8"]
    by_expert = {e: run_preflight(load_run_config(TINY, over + [f"mesh.expert={e}"]), "8xH100", lower=False)
                 for e in (1, 2)}
    cfg = load_run_config(TINY, over + ["mesh.expert=2"])
    c = {"float32": 4, "bfloat16": 2}[cfg.optimizer.compute_dtype]
    p = {"float32": 4, "bfloat16": 2}[cfg.optimizer.param_dtype]
    layers: dict[str, int] = {}
    for k, a in traverse_util.flatten_dict(abstract_params(get_config("tiny-26b-a4b"))).items():
        if k[0].startswith("layer_"):
            expert = k[-2] in ("gating_einsum", "linear") and "mlp" in k
            layers[k[0]] = layers.get(k[0], 0) + math.prod(a.shape) * (c if expert else p)
    assert by_expert[2].mesh["expert"] == 2
    for r in by_expert.values():
        assert r.estimate_terms["weights_in_flight"] == 3 * max(layers.values())


def test_tpu_topology_falls_back_to_abstract_lowering_without_its_compiler():
    r = run_preflight(load_run_config(TINY), "v5p-8", target_compile=False)  # as on a host without libtpu
    assert r.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    assert "lowered for tpu on an abstract 4-device mesh" in r.step_check and r.compiled is None
    assert r.ok


@pytest.mark.skipif(compilers.libtpu_available(), reason="libtpu present: no fallback")
def test_tpu_topology_without_libtpu_says_how_to_get_it():
    r = run_preflight(load_run_config(TINY), "v5p-8")
    assert any("no TPU compiler on this host (libtpu is not installed" in n and "bootstrap.sh --tpu" in n
               for n in r.notes)
    assert r.compiled is None and r.ok


@pytest.mark.skipif(not compilers.libtpu_available(), reason="libtpu is not installed (tools/bootstrap.sh --test installs it; pip could "
                    "not have, e.g. no wheel for this platform)")
@pytest.mark.parametrize("topology,overrides", [
    ("v5p-8", ["data.seq_len=128"]),  # 4 chips, fsdp=4; two loss chunks of 64: a while loop
    # 8 chips; d_model 64 / fsdp 2: whole blocks; tiny-31b's six layers as a scan over two windows
    ("v6e-8", ["mesh.fsdp=2", "mesh.data=4", "quant.recipe=q4_0", "model.name=tiny-31b", "scan_layers=true"]),
])  # both with bf16 compute, as on accelerators (tiny.toml computes in fp32 for CPU runs)
def test_tiny_compiles_for_tpu_slices_with_libtpu(topology, overrides):
    """The real TPU compiler on this CPU host: the step compiles for the slice, and the logical bytes of the
    compiled program's parameters equal the exact rows (params, optimizer, teacher) plus the batch, step
    and rng; its argument buffers are those bytes plus (8, 128) tile padding, byte for byte."""
    from gemma_qat.preflight.layout import argument_bytes
    cfg = load_run_config(TINY, overrides + ["optimizer.compute_dtype=bfloat16"])
    r = run_preflight(cfg, topology)
    assert r.target_compiled and r.compiled_on == f"TPU compiler ({topology})" and r.ok, (r.problems, r.notes)
    assert "by the TPU compiler" in r.step_check and r.compile_seconds > 0
    rows = _rows(r)
    batch = 5 * r.rows_per_device * cfg.data.seq_len * 4  # five int32 [b, T] inputs
    exact = rows["student params"] + rows["optimizer state"] + rows["teacher params"] + batch + 12  # step, rng
    logical, stored = argument_bytes(r.compiled_program.as_text())
    assert logical == exact
    assert stored == r.compiled["argument_size"] and r.layout_padding == stored - exact > 0
    assert any("argument buffers = exact rows + batch + " in c for c in r.checks)
    assert r.total == r.compiled["peak"] and r.cost["flops"] > 0
    # Communication of the compiled step: FSDP gathers the fp32 master weights in bf16 (after the cast), the
    # gradients are reduce-scattered (the TPU's all-reduce-scatter fusions), and every collective's runs
    # per step are known, also inside the layer scan's loop (whose trip count is read from its condition).
    # The loss's chunk loop holds none: its head tables are gathered and its table gradient reduced once,
    # outside the loop (loss/fused.py).
    c = r.collectives
    assert set(r.weight_gathers) == {"bf16"} and c["by_source"]["weights"]["bytes"] > 0
    assert c["by_kind"]["reduce-scatter"]["ops"] > 0 and c["by_source"]["gradients"]["bytes"] > 0
    assert cfg.data.seq_len > cfg.distill.chunk_size or cfg.scan_layers  # a loop in each case
    assert c["unknown_runs"] == 0 and (c["in_loops"] > 0) == cfg.scan_layers
    assert r.prediction["step_s_serial"] >= r.prediction["step_s_overlapped"] > 0


@pytest.mark.parametrize("overrides,match", [
    (["mesh.data=3"], r"does not fit 8xH100 \(8 chips\).*not a multiple of 3.*Fix"),
    (["mesh.fsdp=4"], r"has 4 devices but 8 are present"),
    (["data.global_batch_size=6"], r"global_batch_size=6 must be a multiple of the 8 batch shards"),
])
def test_mesh_errors_name_the_axis_and_the_fix(overrides, match):
    with pytest.raises(PreflightError, match=match):
        run_preflight(load_run_config(TINY, overrides), "8xH100", lower=False)


def test_a_dimension_the_mesh_does_not_divide_is_an_error():
    cfg = load_run_config(TINY, ["mesh.fsdp=2", "mesh.tensor=3", "mesh.parallelism=fsdp_tp"])
    match = r"q_heads=4 .* not divisible by mesh axis tensor=3; use tensor in \[1, 2, 4\]"
    with pytest.raises(PreflightError, match=match):
        run_preflight(cfg, "6xH100", lower=False)


def test_q4_0_blocks_straddling_shards_are_a_problem():
    r = run_preflight(load_run_config(TINY, ["quant.recipe=q4_0"]), "8xH100", lower=False)
    assert not r.ok and "split Q4_0 blocks" in r.problems[0]  # d_model 64 over fsdp=8: 8 per device


def test_a_checkpoint_folder_not_on_this_host_asks_for_the_variant():
    with pytest.raises(PreflightError, match="model.name=VARIANT"):
        run_preflight(load_run_config(TINY, ["model.name=/nonexistent/ckpt"]), "8xH100", lower=False)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_validates_and_names_a_known_topology(path):
    cfg = load_run_config(path)
    topo = topologies.parse(topologies.from_config_comment(path.read_text()))
    variant, fmt = path.stem.rsplit("-", 1)
    get_config(variant)
    assert cfg.quant.recipe == ("q4_0" if fmt == "q4_0" else f"mobile-{variant}")
    assert 2048 <= cfg.data.seq_len <= 4096 and cfg.optimizer.compute_dtype == "bfloat16" and cfg.remat != "none"
    assert cfg.mesh.parallelism == "fsdp_tp_ep" if get_config(variant).is_moe else cfg.mesh.parallelism in ("fsdp", "fsdp_tp")
    cfg.mesh.shape(topo.chips)  # the mesh fills the topology exactly
    assert cfg.data.global_batch_size % topo.hosts == 0


def test_e2b_preset_fits_through_the_cli(capsys):
    # The topology comes from the preset's comment; model.name=e2b sizes the placeholder checkpoint.
    rc = cli.main(["--config", str(ROOT / "configs" / "e2b-q4_0.toml"), "model.name=e2b", "--no-lower", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and out["topology"]["name"] == "8xH100"
    rows = {r["what"]: r["bytes"] for r in out["memory_per_device"]}
    assert 0 < rows["student params"] < rows["optimizer state"] and out["total_bytes"] < out["topology"]["usable_bytes"]
    assert "Q4_0 blocks of 32 never straddle a shard boundary" in out["checks"]
    # fsdp_tp splits the PLE table's vocab over tensor=2 (the fsdp parallelism alone would replicate it).
    ple = next(t for t in out["largest_tensors"] if t["path"] == "embedder/per_layer_embeddings")
    assert ple["local_shape"][0] == 262144 // 2


def test_e4b_preset_fits():
    path = ROOT / "configs" / "e4b-q4_0.toml"
    r = run_preflight(load_run_config(path, ["model.name=e4b"]),
                      topologies.from_config_comment(path.read_text()), lower=False)
    assert r.ok and r.margin > 0 and r.problems == []
    rows = _rows(r)
    # AdamW μ, ν in fp32: twice the params, give or take step counts and the frozen skip_scale buffers.
    assert abs(rows["optimizer state"] - 2 * rows["student params"]) < 1024
    assert rows["teacher params"] == rows["student params"] // 2  # bf16 teacher, same shardings


def test_offline_run_sizes_no_teacher_and_the_topk_inputs():
    """teacher.cache: the step is the offline one (no teacher weights or forward), and its batch carries
    [B, T, k] top-k log-probs and ids; the exact rows still add up to XLA's argument buffers."""
    cfg = load_run_config(TINY, ["teacher.cache=/nonexistent/cache"])
    r = run_preflight(cfg, "8xH100", cpu_compile=True)
    assert r.ok and r.compiled is not None
    rows = _rows(r)
    assert rows["teacher params"] == 0
    k = 64  # the cache-teacher default, used since the folder is not here
    assert rows["teacher top-k inputs"] == r.rows_per_device * cfg.data.seq_len * k * (4 + 4)
    batch = 4 * r.rows_per_device * cfg.data.seq_len * 4  # `targets` is unused offline: jit prunes it
    exact = rows["student params"] + rows["optimizer state"] + rows["teacher top-k inputs"]
    assert r.compiled["argument_size"] == exact + batch + 12
    assert any("not readable here, sized with top-64" in n for n in r.notes)
    online = run_preflight(load_run_config(TINY), "8xH100", lower=False)
    assert _rows(online)["teacher params"] > 0


def test_argument_check_names_compiler_tables_and_missing_rows():
    # libtpu can put index tables of its own in the entry tuple (26B-A4B on v6e-128: 20 s8/s32 arrays);
    # they are reported beside the exact rows, while a sized array with no parameter of its shape is a problem.
    import types

    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from gemma_qat.preflight.check import _check_arguments
    sh = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P())
    plan = types.SimpleNamespace(state={"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh)}, teacher={},
                                 batch={"tokens": jax.ShapeDtypeStruct((2, 16), jnp.int32, sharding=sh)})

    def check(params: str, argument_size: int):
        hlo = f"HloModule m, entry_computation_layout={{({params})->f32[]}}\n"
        report = types.SimpleNamespace(compiled={"argument_size": argument_size}, problems=[], notes=[], checks=[])
        _check_arguments(plan, types.SimpleNamespace(as_text=lambda: hlo), "compiler", report)
        return report

    r = check("s8[1,8,3]{2,1,0}, f32[8,4]{1,0}, s32[4096]{0}, s32[2,16]{1,0}", 24 + 128 + 16384 + 128)
    assert not r.problems and r.layout_padding == 0
    assert r.checks == ["compiler: argument buffers = exact rows + batch + 2 parameters of the compiler's own "
                        "(16,408 B: s8[1,8,3] ×1, s32[4096] ×1), to the byte"]
    r = check("f32[8,2]{1,0}, s32[2,16]{1,0}", 64 + 128)  # the weight arrived halved: the rows are wrong
    assert not r.checks and "no entry parameter for 1 of the arrays preflight sized (f32[8,4] ×1)" in r.problems[0]


def test_gpu_estimate_counts_the_backward_and_the_gradients_as_phases():
    """On a GPU target the step peaks at one end of the backward (preflight/memory.py, `phases`): the
    estimate holds one layer's backward and nets out the gradient row, which the report counts already; a
    TPU target keeps the doubled layer backward beside the whole gradient row."""
    over = ["model.name=tiny-e2b", "data.global_batch_size=8"]
    gpu = run_preflight(load_run_config(TINY, over), "8xH100", lower=False)
    tpu = run_preflight(load_run_config(TINY, over), "v5p-16", lower=False)
    assert gpu.rows_per_device == tpu.rows_per_device
    grads = dict((w, b) for w, b, _ in gpu.rows)["gradients"]
    terms = gpu.estimate_terms
    assert terms["gradients_counted_above"] == -min(grads, terms["total"] - terms["gradients_counted_above"]) < 0
    assert "gradients_counted_above" not in tpu.estimate_terms
    from gemma_qat.preflight import memory
    g = memory.StepGeometry(rows=2, seq_len=1024, compute_bytes=2, tensor=1, remat="full", chunk=128,
                            gathered_layer_bytes=0)
    cfg = get_config("tiny-e2b")
    (two, kind), (one, _) = (memory.estimate(cfg, None, g),  # no teacher forward: the layer's backward is largest
                             memory.estimate(cfg, None, dataclasses.replace(g, phases=True, gradient_bytes=1)))
    assert kind == "layer backward" and two["largest_transient"] == 2 * one["largest_transient"]
    assert one["total"] == two["total"] - one["largest_transient"] - 1
    acts = dict((w, b) for w, b, _ in gpu.rows)["activations + temporaries"]
    assert acts == terms["total"] and gpu.total == sum(b for _, b, _ in gpu.rows)


def test_moe_on_a_gpu_cluster_without_the_scan_is_told_its_compile_time():
    over = ["model.name=tiny-26b-a4b", "mesh.parallelism=fsdp_tp_ep", "mesh.fsdp=4", "mesh.expert=2",
            "data.global_batch_size=8"]
    say = lambda r: [n for n in r.notes if "Hopper kernels" in n]  # noqa: E731
    assert say(run_preflight(load_run_config(TINY, over), "8xH100", lower=False))
    assert not say(run_preflight(load_run_config(TINY, over + ["scan_layers=true"]), "8xH100", lower=False))
    assert not say(run_preflight(load_run_config(TINY, over + ["grouped=blocked"]), "8xH100", lower=False))
    assert not say(run_preflight(load_run_config(TINY, over), "v5p-16", lower=False))
