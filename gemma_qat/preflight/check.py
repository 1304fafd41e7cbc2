"""Pre-launch check: does this run config fit that topology? Sizes and shardings of every buffer of the
train step, computed from shapes on this (CPU) host; nothing is allocated and no data, tokenizer or
weights are read.

    config + topology ─► mesh shape (errors name the axis and the fix) ─► abstract mesh
      ─► eval_shape(params, tx.init) × NamedShardings ─► exact per-device bytes of params/opt/teacher
      ─► the jitted step (train/build.py, the loop's own): compiled by the target's compiler when it is
         here (libtpu for TPU slices, the CUDA plugin on a GPU host: compilers.py), else traced and
         lowered for the target platform on an AbstractMesh (optionally compiled on XLA:CPU fakes)
      ─► memory: compiled memory_analysis when the target compiler ran (its arguments checked against
         the exact rows), else the estimate of memory.py
      ─► communication and predicted step time of whatever was compiled (performance.py)

What is exact and what is estimated is said per row of the report (`source`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import AbstractMesh, Mesh

from gemma_qat import devices, sharding
from gemma_qat.model import checkpoint, scan
from gemma_qat.model.config import get_config
from gemma_qat.model.params import abstract_params, logical_axes
from gemma_qat.preflight import compilers, layout, memory as preflight_memory, performance
from gemma_qat.preflight.report import Report, TensorRow, size
from gemma_qat.preflight.topologies import Topology, parse
from gemma_qat.quant.policy import RecipePolicy, check_q4_0_blocks, placeholder_scales
from gemma_qat.train import build, optimizer as optim, state as state_lib, step as step_lib
from gemma_qat.train.config import RunConfig
from gemma_qat.train.policy import resolve_policy

_DTYPES = build.DTYPES
REPLICATED_TOLERANCE = 0.02  # MaxText's sharding_tolerance: warn above this fraction of replicated bytes


class PreflightError(ValueError):
    """The config cannot run on the topology at all (the message names the field and the fix)."""


def _nbytes(tree) -> int:
    """Per-device bytes of ShapeDtypeStructs carrying NamedShardings (shards are even: sharding._fit)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _with(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _mesh_shape(cfg: RunConfig, topo: Topology) -> tuple[int, ...]:
    try:
        return cfg.mesh.shape(topo.chips)
    except ValueError as e:
        raise PreflightError(f"[mesh] does not fit {topo.name} ({topo.chips} chips): {e}. Fix: make the "
                             f"product of mesh.data/fsdp/tensor/expert equal {topo.chips}, or set one "
                             "of them to -1 to take the rest") from None


DEFAULT_CACHE_K = 64  # cli/cache_teacher.py's --k default, for a cache folder not on this host


def _cache_k(cfg: RunConfig, notes: list[str]) -> int:
    """Offline distillation: the batch carries the teacher's top-k, read k from the cache if it is here."""
    from gemma_qat.train.teacher_cache import TeacherCache
    try:
        k = int(TeacherCache(cfg.teacher.cache).meta["k"])
        notes.append(f"offline distillation from teacher.cache (top-{k}): no teacher weights or forward")
    except (OSError, ValueError, KeyError):
        k = DEFAULT_CACHE_K
        notes.append(f"offline distillation: teacher.cache {cfg.teacher.cache!r} not readable here, sized with "
                     f"top-{k} (the cache-teacher default); no teacher weights or forward")
    return k


def _models(cfg: RunConfig, teacher_model: str | None, notes: list[str]):
    """(student config, teacher config or None for an offline run from teacher.cache)."""
    name = cfg.model.name
    if not state_lib.is_variant(name) and not (Path(name) / "config.json").is_file():
        raise PreflightError(f"model.name {name!r} is neither a variant nor a checkpoint folder on this host; "
                             "preflight needs only the architecture: add the override model.name=VARIANT "
                             "(the variant the checkpoint was imported from, e.g. model.name=e2b)")
    s_cfg = state_lib.student_config(name)
    if cfg.teacher.cache:
        return s_cfg, None
    src = cfg.teacher.checkpoint
    if teacher_model:
        t_cfg = get_config(teacher_model)
        notes.append(f"teacher sized as --teacher-model {teacher_model}")
    elif src == "same":
        t_cfg = s_cfg
    elif (Path(src) / "config.json").is_file():
        t_cfg = checkpoint.load_config(src)
    else:  # a placeholder path in a preset: preflight never needs the weights
        t_cfg = s_cfg
        notes.append(f"teacher checkpoint {src!r} not found here: sized as the student's architecture "
                     "(self-distillation); pass --teacher-model to size another")
    state_lib.check_teacher(t_cfg, s_cfg, src)
    return s_cfg, t_cfg


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _check_dims(model_cfg, shardings, mesh, parallelism: str, notes: list[str]) -> None:
    """sharding._fit silently replicates a dim its mesh axes do not divide. A dim at least as large
    as the axis is a config mistake (error); a smaller one (1 KV head over tensor=2) is the intended
    fallback (note)."""
    specs = traverse_util.flatten_dict(logical_axes(model_cfg))
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params(model_cfg)).items()}
    fitted = traverse_util.flatten_dict(shardings)
    errors, fallbacks = {}, {}
    for path, logical in specs.items():
        wanted = nn.logical_to_mesh_axes(tuple(logical), sharding.rules(parallelism))
        got = tuple(fitted[path].spec) + (None,) * len(shapes[path])
        for dim, (w, g, size) in enumerate(zip(wanted, got, shapes[path])):
            lost = [a for a in _axes(w) if a not in _axes(g) and mesh.shape[a] > 1]
            for a in lost:
                key = (logical[dim], size, a, mesh.shape[a])
                (errors if size >= mesh.shape[a] else fallbacks).setdefault(key, "/".join(path))
    for (name, size, axis, n), example in sorted(fallbacks.items()):
        notes.append(f"{name}={size} is smaller than mesh {axis}={n}: replicated over {axis} (e.g. {example})")
    if errors:
        parts = []
        for (name, size, axis, n), example in sorted(errors.items()):
            ok = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
            parts.append(f"dimension {name}={size} (e.g. {example}) is not divisible by mesh axis {axis}={n}; "
                         f"use {axis} in {ok}")
        raise PreflightError("; ".join(parts))


@dataclasses.dataclass
class _Plan:
    """Everything the jitted step needs for one mesh (abstract or concrete)."""
    mesh: object
    state: object  # abstract TrainState with shardings
    teacher: dict
    batch: dict
    jitted: object


def _plan(cfg, mesh, s_cfg, t_cfg, tx, policy, abstract_state, cache_k: int = 0) -> _Plan:
    """t_cfg None: the offline step (teacher.cache), whose batch carries top-`cache_k` log-probs and ids."""
    parallelism = cfg.mesh.parallelism
    p_dtype, t_dtype = _DTYPES[cfg.optimizer.param_dtype], _DTYPES[cfg.teacher.param_dtype]
    p_sh = state_lib.param_shardings(s_cfg, mesh, parallelism, param_dtype=p_dtype)
    state_sh = state_lib.state_shardings(abstract_state, p_sh, mesh)
    batch_sh = sharding.batch_sharding(mesh, parallelism)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh) for k in step_lib.BATCH_KEYS}
    if t_cfg is None:
        batch["topk_logprobs"] = jax.ShapeDtypeStruct(shape + (cache_k,), jnp.float32, sharding=batch_sh)
        batch["topk_ids"] = jax.ShapeDtypeStruct(shape + (cache_k,), jnp.int32, sharding=batch_sh)
        t_sh, teacher = {}, {}
    else:
        t_sh = state_lib.param_shardings(t_cfg, mesh, parallelism, param_dtype=t_dtype)
        teacher = _with(abstract_params(t_cfg, param_dtype=t_dtype), t_sh)
    jitted = build.build_step(cfg, s_cfg, t_cfg, policy, tx, state_sh, t_sh, batch_sh, mesh)
    return _Plan(mesh, _with(abstract_state, state_sh), teacher, batch, jitted)


def _policy(cfg: RunConfig, s_cfg):
    """The loop's policy; a recipe with static activation scales gets placeholders (the loop calibrates
    them on data before its first step; their values are constants of the program, not shapes)."""
    policy = resolve_policy(cfg.quant.recipe, s_cfg, cfg.quant.q4_0_impl, cfg.quant.backend)
    if isinstance(policy, RecipePolicy) and policy.act_int8 and policy.static_scales is None:
        policy = RecipePolicy(policy.resolution, backend=policy.backend, q4_0_impl=policy.q4_0_impl,
                              static_scales=placeholder_scales(s_cfg, policy.resolution))
    return policy


def _compile(plan, parallelism: str):
    """(the Compiled step, seconds to lower and compile)."""
    t0 = time.perf_counter()
    with sharding.activate(plan.mesh, parallelism):
        compiled = plan.jitted.lower(plan.state, plan.teacher, plan.batch).compile()
    return compiled, time.perf_counter() - t0


def _out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


_HLO_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int8": "s8",
               "int16": "s16", "int32": "s32", "int64": "s64", "uint8": "u8", "uint16": "u16", "uint32": "u32",
               "uint64": "u64", "bool": "pred"}


def _check_arguments(plan, compiled, who: str, report: Report) -> None:
    """The compiler's argument buffers against the exact rows: every array of state + teacher + batch,
    as preflight sized it, must be an entry parameter of that shape; what the buffers hold beyond that
    is the layout's tile padding (TPU), and any parameters the compiler adds of its own (libtpu passes
    small index tables in the entry tuple for some collectives: 20 s8/s32 arrays, 66 KB, in 26B-A4B's
    v6e-128 program), each reported as such."""
    arrays = layout.argument_arrays(compiled.as_text())
    # jit prunes arguments the step never reads: offline (no teacher), `targets` is one of them.
    batch = {k: v for k, v in plan.batch.items() if plan.teacher or k != "targets"}
    leaves = jax.tree.leaves((plan.state, plan.teacher, batch))
    expected = collections.Counter((_HLO_DTYPES[str(a.dtype)], tuple(a.sharding.shard_shape(a.shape))) for a in leaves)
    got = collections.Counter((d, dims) for d, dims, _, _ in arrays)
    missing, extra = expected - got, got - expected
    logical, stored, sized = sum(a[2] for a in arrays), sum(a[3] for a in arrays), _nbytes(leaves)
    report.layout_padding = stored - logical
    shapes = lambda items: ", ".join(f"{d}[{','.join(map(str, s))}] ×{n}" for (d, s), n in items)  # noqa: E731
    if missing:
        report.problems.append(f"the {who} has no entry parameter for {sum(missing.values())} of the arrays "
                               f"preflight sized ({shapes(list(missing.items())[:4])}); "
                               f"it receives {logical:,} bytes of arguments per device, preflight sized {sized:,}: "
                               "the exact rows are wrong for this program")
        return
    if stored != report.compiled["argument_size"]:
        report.notes.append(f"argument buffers {report.compiled['argument_size']:,} B vs {stored:,} B from the "
                            "entry layouts: the tiling rule in preflight/layout.py missed something")
        return
    pad = f" + {size(stored - logical)} of tile padding" if stored > logical else ""
    # Every sized array has its parameter, so what the entry holds beyond the sized bytes is the extras'.
    own = (f" + {sum(extra.values())} parameters of the compiler's own ({logical - sized:,} B: {shapes(extra.items())})"
           if extra else "")
    report.checks.append(f"{who}: argument buffers = exact rows + batch{own}{pad}, to the byte")


def _check_step(cfg, topo, shape, plan_for, report: Report, *, cpu_compile: bool, target: bool) -> None:
    """Compiles for the target with its own compiler when it is here (libtpu for TPU slices, the CUDA
    plugin on a GPU host for GPU clusters); otherwise lowers on the abstract mesh for the target
    platform, and compiles on XLA:CPU fake devices when asked and the count matches."""
    parallelism = cfg.mesh.parallelism
    devices = None
    if target:
        try:
            devices = compilers.target_devices(topo)
        except compilers.CompilerUnavailable as e:
            report.notes.append(f"no {topo.platform.upper()} compiler on this host ({e}): fell back to "
                                "lowering on an abstract mesh")
    if devices is not None:
        who = f"{'TPU' if topo.platform == 'tpu' else 'GPU'} compiler ({topo.name})"
        plan = plan_for(Mesh(np.asarray(devices).reshape(shape), sharding.MESH_AXES))
        try:
            compiled, seconds = _compile(plan, parallelism)
        except Exception as e:  # XlaRuntimeError; only an out-of-HBM verdict is an answer, not a crash
            if not _out_of_memory(e):
                raise
            report.problems.append(f"the {who} says it does not fit: {str(e)[:600]}")
            report.step_check, report.compiler_out_of_memory = f"compile for {topo.name}: out of HBM", True
            return
        report.set_compiled(compiled, who, seconds, target=True)
        report.step_check = f"compiled for {topo.name} by the {who.split(' (')[0]} in {seconds:.0f} s"
        _check_arguments(plan, compiled, who, report)
        return
    plan = plan_for(AbstractMesh(shape, sharding.MESH_AXES))
    with jax.sharding.use_abstract_mesh(plan.mesh), nn.logical_axis_rules(sharding.rules(parallelism)):
        lowered = plan.jitted.trace(plan.state, plan.teacher, plan.batch).lower(
            lowering_platforms=(topo.lowering_platform,))
    kib = len(lowered.as_text()) // 1024
    report.step_check = (f"traced and lowered for {topo.lowering_platform} on an abstract {topo.chips}-device "
                         f"mesh ({kib} KiB StableHLO); not compiled")
    if not cpu_compile:
        return
    if jax.device_count() != topo.chips or jax.devices()[0].platform != "cpu":
        report.notes.append(f"--cpu-compile skipped: needs {topo.chips} CPU devices, this process has "
                            f"{jax.device_count()} {jax.devices()[0].platform} (set XLA_FLAGS="
                            f"--xla_force_host_platform_device_count={topo.chips} before jax starts)")
        return
    cpu_mesh = Mesh(np.asarray(jax.devices()).reshape(shape), sharding.MESH_AXES)
    compiled, seconds = _compile(plan_for(cpu_mesh), parallelism)
    report.set_compiled(compiled, f"XLA:CPU on {topo.chips} fake devices", seconds, target=False)
    report.step_check += f"; also compiled on XLA:CPU ({topo.chips} fake devices)"


def _largest(abstract_state, n: int = 10) -> list[TensorRow]:
    flat = traverse_util.flatten_dict(abstract_state.params)
    rows = [TensorRow("/".join(k), tuple(a.shape), str(a.dtype), str(tuple(a.sharding.spec)),
                      tuple(a.sharding.shard_shape(a.shape)),
                      math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize) for k, a in flat.items()]
    return sorted(rows, key=lambda r: -math.prod(r.shape))[:n]


def _replicated(abstract_state, mesh_size: int, notes: list[str]) -> None:
    flat = traverse_util.flatten_dict(abstract_state.params)
    total = sum(math.prod(a.shape) for a in flat.values())
    repl = {"/".join(k): math.prod(a.shape) for k, a in flat.items() if not any(_axes(e) for e in a.sharding.spec)}
    frac = sum(repl.values()) / total
    if mesh_size > 1 and frac > REPLICATED_TOLERANCE:
        top = ", ".join(f"{k} ({v:,} params)" for k, v in sorted(repl.items(), key=lambda kv: -kv[1])[:3])
        notes.append(f"{frac:.0%} of the parameters are replicated on every device (tolerance "
                     f"{REPLICATED_TOLERANCE:.0%}): {top}; a mesh.parallelism that shards these dims saves that memory")


def _gathered_layer_bytes(abstract_state, mesh, compute_bytes: int) -> int:
    """The largest layer's params after the FSDP all-gather: divided by every mesh axis but fsdp. An MoE's
    expert weights (sharded over `expert`) are gathered over `expert` too, in the compute dtype, inside
    its shard_map (model/moe.py): 26B-A4B on v6e-128, `bf16[128,2816,704]` per matmul on every chip."""
    per_layer: dict[str, int] = {}
    for k, a in traverse_util.flatten_dict(abstract_state.params).items():
        axes = [ax for e in a.sharding.spec for ax in _axes(e)]
        experts = "expert" in axes
        gathered = ("fsdp", "expert") if experts else ("fsdp",)
        shards = math.prod(mesh.shape[ax] for ax in axes if ax not in gathered)
        itemsize = compute_bytes if experts else a.dtype.itemsize
        per_layer[k[0]] = per_layer.get(k[0], 0) + math.prod(a.shape) // shards * itemsize
    return max(v for k, v in per_layer.items() if k.startswith("layer_"))


def _kept_weight_elements(abstract_state) -> int:
    """Per-device elements of every layer's matmul weight as sharded: what remat="weights" keeps (the
    fake-quantized weight is named where `Einsum` holds it to its parameter's sharding, before a gather)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) for k, a in
               traverse_util.flatten_dict(abstract_state.params).items() if k[0].startswith("layer_") and k[-1] == "w")


def _scanned_layer_bytes(params, model_config, policy) -> int:
    """Per-device bytes of the parameters of the layers `scan_layers` stacks (model/scan.py): the step
    copies them into [repeats, ...] stacks, and the backward's gradient of the stacks is another copy."""
    layers = {f"layer_{i}" for g in scan.layer_groups(model_config, getattr(policy, "layer_key", None))
              if g.repeats > 1 for i in range(g.start, g.stop)}
    return _nbytes([a for k, a in traverse_util.flatten_dict(params).items() if k[0] in layers])


def run_preflight(cfg: RunConfig, topology: str | Topology, *, lower: bool = True, cpu_compile: bool = False,
                  teacher_model: str | None = None, target_compile: bool = True) -> Report:
    """The report for `cfg` on `topology`; raises PreflightError when the config cannot run there.

    lower=False skips the step (shapes and shardings only: seconds, even for the largest variants).
    target_compile=False never asks for the target's compiler (lowering on an abstract mesh instead).
    """
    topo = parse(topology) if isinstance(topology, str) else topology
    shape = _mesh_shape(cfg, topo)
    mesh = AbstractMesh(shape, sharding.MESH_AXES)
    parallelism, o = cfg.mesh.parallelism, cfg.optimizer
    try:
        build.check_batch_layout(cfg, mesh)  # the loop's own check: preflight rejects exactly what it rejects
    except ValueError as e:
        raise PreflightError(f"{e}; fix: change data.global_batch_size or the mesh") from None
    if cfg.data.global_batch_size % topo.hosts:
        raise PreflightError(f"data.global_batch_size={cfg.data.global_batch_size} must split evenly over the "
                             f"{topo.hosts} hosts of {topo.name} (each host reads its own rows)")
    report = Report(topology=topo, mesh=dict(zip(sharding.MESH_AXES, shape)), parallelism=parallelism, config=cfg)
    s_cfg, t_cfg = _models(cfg, teacher_model, report.notes)
    cache_k = _cache_k(cfg, report.notes) if t_cfg is None else 0
    policy = _policy(cfg, s_cfg)
    tx = optim.make_optimizer(o)
    p_dtype = _DTYPES[o.param_dtype]

    def init(p):
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                    rng=jax.random.PRNGKey(0))

    abstract = jax.eval_shape(init, abstract_params(s_cfg, param_dtype=p_dtype))
    plan_for = lambda m: _plan(cfg, m, s_cfg, t_cfg, tx, policy, abstract, cache_k)  # noqa: E731
    plan = plan_for(mesh)
    _check_dims(s_cfg, jax.tree.map(lambda a: a.sharding, plan.state.params), mesh, parallelism, report.notes)
    if t_cfg is not None and t_cfg is not s_cfg:
        _check_dims(t_cfg, jax.tree.map(lambda a: a.sharding, plan.teacher), mesh, parallelism, report.notes)
    resolution = getattr(policy, "resolution", None)
    if resolution is not None and "q4_0" in resolution.quantized().values():
        try:
            check_q4_0_blocks(resolution, s_cfg, jax.tree.map(lambda a: a.sharding, plan.state.params))
            report.checks.append("Q4_0 blocks of 32 never straddle a shard boundary")
        except ValueError as e:
            report.problems.append(str(e))
    _replicated(plan.state, math.prod(shape), report.notes)
    inner = report.mesh["tensor"] * report.mesh["expert"]  # the innermost mesh axes: one host's devices
    if topo.platform == "gpu" and s_cfg.is_moe and cfg.grouped in ("auto", "kernel") and not cfg.scan_layers:
        report.notes.append("the MoE's Hopper kernels are compiled once per layer when the layers are unrolled: "
                            "26B-A4B on 4x8xH100 did not compile within 520 s on a 16-core host, and in 182 s "
                            "with scan_layers = true (launch/README.md)")
    if topo.hosts > 1 and topo.platform == "gpu" and inner > topo.chips_per_host:
        report.notes.append("tensor × expert spans more than one host: their collectives go over the network")

    param_b, opt_b, teacher_b = _nbytes(plan.state.params), _nbytes(plan.state.opt_state), _nbytes(plan.teacher)
    report.add("student params", param_b, f"exact: shapes × shardings ({o.param_dtype} master)")
    report.add("optimizer state", opt_b, "exact: eval_shape(tx.init) × shardings (AdamW μ, ν"
               + (", accumulator)" if o.grad_accum_steps > 1 else ")"))
    report.add("teacher params", teacher_b, f"exact: shapes × shardings ({cfg.teacher.param_dtype})" if t_cfg
               else "none: offline distillation from teacher.cache")
    if t_cfg is None:
        topk_b = _nbytes({k: plan.batch[k] for k in ("topk_logprobs", "topk_ids")})
        report.add("teacher top-k inputs", topk_b, f"exact: [B, T, {cache_k}] log-probs and ids × batch sharding")
    report.add("gradients", param_b, "exact size; transient, live through the update")
    rows = plan.batch["tokens"].sharding.shard_shape(plan.batch["tokens"].shape)[0]
    compute_bytes = jnp.dtype(_DTYPES[o.compute_dtype]).itemsize
    geometry = preflight_memory.StepGeometry(
        rows=rows, seq_len=cfg.data.seq_len, compute_bytes=compute_bytes,
        tensor=report.mesh["tensor"] if parallelism != "fsdp" else 1, remat=cfg.remat, chunk=cfg.distill.chunk_size,
        gathered_layer_bytes=_gathered_layer_bytes(plan.state, mesh, compute_bytes),
        kept_weight_elements=_kept_weight_elements(plan.state),
        flash_attention=topo.platform == "tpu" and cfg.attention in ("auto", "splash"),
        phases=topo.platform == "gpu", gradient_bytes=param_b,
        scan_stack_bytes=(2 * _scanned_layer_bytes(plan.state.params, s_cfg, policy)
                          + (_scanned_layer_bytes(plan.teacher, t_cfg, None) if t_cfg else 0)) if cfg.scan_layers else 0)
    terms, kind = preflight_memory.estimate(s_cfg, t_cfg, geometry)  # t_cfg None: no teacher forward
    report.estimate_terms, report.rows_per_device = terms, rows
    report.add("activations + temporaries", terms["total"],
               f"estimate (remat={cfg.remat}, b={rows}, T={cfg.data.seq_len}, largest transient: {kind}"
               + (", less the gradients: on a GPU they peak after the activations)" if geometry.phases else ")"))
    report.largest = _largest(plan.state)
    if lower:
        with devices.compiling_for(topo.platform):  # kernels and grouped matmuls as the target chooses them
            _check_step(cfg, topo, shape, plan_for, report, cpu_compile=cpu_compile, target=target_compile)
        if report.compiled_program is not None:
            try:
                performance.analyse(report, s_cfg, t_cfg)
            except Exception as e:  # noqa: BLE001 — a reading of the HLO must not lose what the compile found
                report.problems.append(f"the compiled program was not analysed for communication and step time "
                                       f"({type(e).__name__}: {str(e)[:300]}); its memory figures above stand. "
                                       "Keep its HLO with --hlo-out and report the error")
    else:
        report.step_check = "not traced (shapes and shardings only)"
    report.finish()
    return report


__all__ = ["PreflightError", "Report", "run_preflight"]
