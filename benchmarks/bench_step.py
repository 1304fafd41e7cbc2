"""Training-step benchmark on one GPU: step time, tokens/s, MFU and peak memory of plain BF16
training, QAT without a teacher and QAT with an online BF16 teacher, on identical batches.

    python benchmarks/bench_step.py --config bench-1b --batch 2 --seq 2048          # all modes
    python benchmarks/bench_step.py --config e2b --freeze-embeddings --remat full
    python benchmarks/bench_step.py --config 26b-a4b-4l --freeze-embeddings --remat full
    python benchmarks/bench_step.py --modes qat+teacher --profile /tmp/prof   # + per-kernel breakdown
    python benchmarks/bench_step.py --modes qat+teacher --pipeline   # the training pipeline's own step
    python benchmarks/bench_step.py --modes qat+teacher --pipeline --scan-layers   # scanned layers
    python benchmarks/bench_step.py --modes qat+teacher --backend aqt            # the fake-quant through AQT
    python benchmarks/bench_step.py --config e2b --recipe mobile --remat weights  # E2B's mobile recipe

Each mode runs in its own process so peak memory is per mode. MFU follows shared/bench/README.md:
(6·N + attention) per token for the student, plus (2·N + attention/3) for an online teacher,
against --peak FLOP/s (989e12: H100 SXM dense bf16); N counts matmul parameters only.
Compilation is mostly XLA autotuning: XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=DIR keeps its
results, so a later run with the same DIR compiles in a fraction of the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from gemma_qat.loss.distill import DistillSchedule, chunked_ce_loss, chunked_distill_loss
from gemma_qat.loss.kernel import IMPLS as LOSS_IMPLS
from gemma_qat.model.config import get_config, interleave
from gemma_qat.model.grouped_matmul import GROUPED_IMPLS
from gemma_qat.model.params import init_params
from gemma_qat.model.transformer import Transformer
from gemma_qat.preflight.report import cost_stats
from gemma_qat.quant.policy import BACKENDS, RecipePolicy
from gemma_qat.quant.q4_0_kernel import IMPLS as Q4_0_IMPLS
from gemma_qat.quant.recipe import resolve_recipe
from gemma_qat.train.config import DistillSection, OptimizerSection
from gemma_qat.train.metrics import matmul_params
from gemma_qat.train.optimizer import lr_schedule, make_optimizer
from gemma_qat.train.state import TrainState
from gemma_qat.train.step import make_step_fn

MODES = ("plain", "qat", "qat+teacher")


def bench_config(name: str):
    if name == "26b-a4b-4l":  # same layer shapes as 26B-A4B, 4 layers (3 sliding + 1 global)
        return dataclasses.replace(get_config("26b-a4b"), name=name, layer_types=interleave(4, 4))
    if name == "26b-a4b-6l":  # two periods of (2 sliding + 1 global): the smallest 26B-A4B that --scan-layers scans
        return dataclasses.replace(get_config("26b-a4b"), name=name, layer_types=interleave(6, 3))
    return get_config(name)


def flops_per_token(cfg, seq: int, teacher: bool) -> float:
    # N: parameters in a matmul per token (train/metrics.py: active experts only, the tied head
    # counted once, embedding and PLE gathers excluded: a lookup does no FLOPs).
    n = matmul_params(cfg)
    keys = lambda i: seq / 2 if cfg.is_global(i) else min(seq / 2, cfg.sliding_window)  # noqa: E731
    attn = sum(4 * cfg.num_heads * cfg.layer_head_dim(i) * keys(i) for i in range(cfg.num_layers))  # QKᵀ, AV
    return 3 * (2 * n + attn) + ((2 * n + attn) if teacher else 0)


def _split(params, freeze_embeddings: bool):
    flat = traverse_util.flatten_dict(params)
    frozen = {k: v.astype(jnp.bfloat16) for k, v in flat.items() if freeze_embeddings and k[0] == "embedder"
              and k[-1] in ("input_embedding", "per_layer_embeddings")}
    train = {k: v for k, v in flat.items() if k not in frozen}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen) if frozen else {}


def _merge(a, b):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)})


def _lean_step(args, cfg, mode, student, teacher, params, tokens, labels):
    """The benchmark's own step: CE or KL through the fused loss, plain AdamW. -> (jitted step, its
    arguments, and a function from its outputs and arguments to the next arguments and the loss)."""
    train, frozen = _split(params, args.freeze_embeddings)
    t_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params) if "teacher" in mode else None
    tx = optax.adamw(1e-5, weight_decay=0.0)

    def loss_fn(train, frozen, t_params, tokens, labels):
        h, table = student.apply({"params": _merge(train, frozen)}, tokens, return_hidden=True)
        if t_params is None:
            return chunked_ce_loss(h, table, labels, softcap=cfg.final_softcap, chunk_size=args.chunk,
                                   loss_impl=args.loss_impl)[0]
        th, ttable = teacher.apply({"params": t_params}, tokens, return_hidden=True)
        return chunked_distill_loss(h, th, table, ttable, softcap=cfg.final_softcap, chunk_size=args.chunk,
                                    loss_impl=args.loss_impl)[0]

    def step(train, opt, frozen, t_params, tokens, labels):
        loss, g = jax.value_and_grad(loss_fn)(train, frozen, t_params, tokens, labels)
        upd, opt = tx.update(g, opt, train)
        return optax.apply_updates(train, upd), opt, loss

    step = jax.jit(step, donate_argnums=(0, 1))  # old weights and moments never coexist with new
    return step, (train, tx.init(train), frozen, t_params, tokens, labels), lambda out, a: ((*out[:2], *a[2:]), out[2])


def _pipeline_step(args, cfg, mode, student, teacher, params, tokens, labels):
    """The training pipeline's own step (train/step.py): KL from the bf16 teacher with its schedule, the
    run config's default optimizer (AdamW, warmup/cosine, global-norm clipping, decay masks), the step's
    metrics, and a batch as the data pipeline packs it: two documents per row (segment ids, restarting
    positions, loss mask)."""
    o, d = OptimizerSection(), DistillSection(chunk_size=args.chunk)
    tx = make_optimizer(o)
    fn = make_step_fn(student, teacher, tx, DistillSchedule(d.temperature, d.alpha), lr_schedule(o),
                      grad_accum_steps=o.grad_accum_steps, chunk_size=d.chunk_size, loss_impl=args.loss_impl)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(2))
    b, t = tokens.shape
    half = jnp.arange(t) >= t // 2  # [T]
    batch = {"tokens": tokens, "targets": labels, "loss_mask": jnp.ones((b, t), jnp.int32),
             "segment_ids": jnp.broadcast_to(1 + half, (b, t)).astype(jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t) - half * (t // 2), (b, t)).astype(jnp.int32)}
    t_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    step = jax.jit(fn, donate_argnums=(0,))
    return step, (state, t_params, batch), lambda out, a: ((out[0], *a[1:]), out[1]["loss"])


def run_mode(args) -> dict:
    cfg = bench_config(args.config)
    mode = args.mode
    quant = (RecipePolicy(resolve_recipe(args.recipe, cfg), q4_0_impl=args.q4_0_impl, backend=args.backend)
             if "qat" in mode else None)
    kw = dict(dtype=jnp.bfloat16, remat=args.remat, attention=args.attention, grouped=args.grouped,
              scan_layers=args.scan_layers)
    student = Transformer(cfg, **({"quant": quant} if quant else {}), **kw)
    teacher = Transformer(cfg, **kw)
    params = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0))
    b, t = args.batch, args.seq
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, cfg.vocab_size)
    labels = jnp.roll(tokens, -1, axis=1)
    build = _pipeline_step if args.pipeline else _lean_step
    step, a, advance = build(args, cfg, mode, student, teacher, params, tokens, labels)
    del params
    t0 = time.perf_counter()
    step = step.lower(*a).compile()  # AOT: its HLO for --profile
    compile_s = time.perf_counter() - t0
    a, loss = advance(step(*a), a)  # warm-up
    loss.block_until_ready()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        a, loss = advance(step(*a), a)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1:] if len(times) > 2 else times)
    if args.profile:
        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from trace_summary import summarise
        pdir = f"{args.profile}/{mode.replace('+', '_')}"
        with jax.profiler.trace(pdir, create_perfetto_trace=True):
            for _ in range(2):
                a, loss = advance(step(*a), a)
            loss.block_until_ready()
        summary = summarise(pdir, steps=2, hlo_text=step.as_text())
        pathlib.Path(f"{pdir}.txt").write_text(summary)
        print(summary, file=sys.stderr, flush=True)
    tok_s = b * t / dt
    stats = jax.devices()[0].memory_stats() or {}
    return {"config": cfg.name, "mode": mode, "batch": b, "seq": t, "remat": args.remat, "attention": args.attention,
            "grouped": args.grouped, "q4_0_impl": args.q4_0_impl,
            "recipe": args.recipe, "backend": args.backend, "loss_impl": args.loss_impl, "pipeline": args.pipeline,
            "freeze_embeddings": args.freeze_embeddings, "step_s": dt, "tokens_per_s": tok_s,
            "mfu": tok_s * flops_per_token(cfg, t, "teacher" in mode) / args.peak,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "compile_s": compile_s,
            "loss": float(loss), "device": jax.devices()[0].device_kind,
            "cost": cost_stats(step),  # the compiler's flops / bytes accessed (custom-call kernels count 0)
            "model_flops_per_token": flops_per_token(cfg, t, "teacher" in mode)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench-1b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per chunk of the KL/CE loss")
    ap.add_argument("--remat", default="none", choices=["none", "dots", "full", "weights"])
    ap.add_argument("--freeze-embeddings", action="store_true", help="bf16, untrained embedding tables")
    ap.add_argument("--attention", default="auto", choices=["xla", "cudnn", "auto"],
                    help="attention kernel (auto: cuDNN where it applies)")
    ap.add_argument("--grouped", default="auto", choices=list(GROUPED_IMPLS), help="MoE grouped matmul")
    ap.add_argument("--q4-0-impl", default="auto", choices=list(Q4_0_IMPLS),
                    help="Q4_0 fake-quant: XLA, the one-pass Pallas kernel, or auto (the kernel on one GPU)")
    ap.add_argument("--recipe", default="q4_0", help="the student's recipe (q4_0; mobile for E-type configs)")
    ap.add_argument("--backend", default="formats", choices=list(BACKENDS),
                    help="who computes the fake-quant (quant.backend): formats.py / the kernel, or AQT")
    ap.add_argument("--loss-impl", default="auto", choices=list(LOSS_IMPLS),
                    help="the loss's vocabulary passes: XLA, the two Pallas kernels, or auto (the kernels on one GPU)")
    ap.add_argument("--scan-layers", action="store_true", help="lax.scan over the layer pattern (model/scan.py)")
    ap.add_argument("--untie", action="store_true",
                    help="A/B: the model without layers.tie_gradients (gradient dots free to be deferred)")
    ap.add_argument("--untie-norms", action="store_true",
                    help="A/B: RMSNorm scales without their tie (layers.tie_scale_gradient; the reduction free to move)")
    ap.add_argument("--pipeline", action="store_true",
                    help="time the training pipeline's own step (train/step.py, default optimizer, packed batch)")
    ap.add_argument("--profile", help="also trace 2 steps into DIR/<mode> and summarise kernels into DIR/<mode>.txt")
    ap.add_argument("--peak", type=float, default=989e12)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    args = ap.parse_args()
    if args.pipeline and not args.mode and (args.modes != "qat+teacher" or args.freeze_embeddings):
        ap.error("--pipeline times the distillation step: use --modes qat+teacher, without --freeze-embeddings")
    if args.mode:
        if args.untie:  # the one switch of the A/B: both call sites see the identity
            from gemma_qat.model import attention, layers
            layers.tie_gradients = attention.tie_gradients = lambda *arrays: arrays
        if args.untie_norms:
            from gemma_qat.model import layers
            layers.tie_scale_gradient = lambda x, scale: (x, scale)
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--config", args.config, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--chunk", str(args.chunk),
               "--remat", args.remat, "--peak", str(args.peak), "--attention", args.attention, "--grouped", args.grouped,
               "--q4-0-impl", args.q4_0_impl, "--loss-impl", args.loss_impl,
               "--recipe", args.recipe, "--backend", args.backend] + ["--pipeline"] * args.pipeline
        cmd += ["--scan-layers"] * args.scan_layers + ["--untie"] * args.untie + ["--untie-norms"] * args.untie_norms
        cmd += ["--freeze-embeddings"] * args.freeze_embeddings + (["--profile", args.profile] if args.profile else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if args.profile:
            print(out.stderr[-6000:], flush=True)
        res = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not res:
            print(f"{args.config} {mode}: FAILED\n{out.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(res[0][7:]))
        r = rows[-1]
        print(f"{r['config']:12s} {mode:12s} step {r['step_s']*1e3:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
              f"MFU {100*r['mfu']:5.1f}%  peak {r['peak_gib']:5.1f} GiB  compile {r['compile_s']:.0f}s  "
              f"attention {args.attention}  remat {args.remat}  {args.recipe} {args.backend} q4_0 {args.q4_0_impl}  loss {args.loss_impl}"
              + ("  pipeline step" if args.pipeline else "") + ("  scan" if args.scan_layers else "") + ("  untied" if args.untie else "")
              + ("  norms untied" if args.untie_norms else ""), flush=True)
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
