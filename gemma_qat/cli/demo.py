"""The embedded default: the whole chain on a CPU with no weights and no internet.

1. corpus + tokenizer from the Python standard library (inside the teacher run)
2. a tiny-e2b BF16-role teacher trained from scratch (next-token cross-entropy)
3. a Q4_0 student QAT-distilled from it (KL to the frozen teacher, fake-quant + STE)
4. a mobile student QAT-distilled the same way (int4/int2 weights, static int8 activations), its
   fake-quant computed by AQT (the default quant.backend = "auto" picks AQT for a recipe without Q4_0
   weights, formats.py and its GPU kernel for Q4_0: quant/policy.py choose_backend; the same bits)
5. the PTQ baseline: the teacher quantized directly with the q4_0 recipe
6. exports: Q4_0 Orbax and GGUF (llama.cpp) of the Q4_0 student; mobile of the mobile student and of
   the teacher PTQ'd with the mobile recipe (calibrated static activation scales), its baseline
7. evaluation of teacher / PTQ / QAT / exports on held-out text, and a report folder

Every stage writes into its own folder under the work dir and is skipped when its output exists.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import typing
from pathlib import Path

# The library is imported inside the functions, as in every command module: building the parser
# imports this module for every `gemma-qat` command, and jax must not load before train or preflight
# has prepared it.

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
# Sized for six minutes on 2 cores (README): the teacher's steps dominate; each QAT student takes
# half the teacher's rows per step, enough to beat its PTQ baseline clearly (tests/test_demo.py).
TEACHER_STEPS, QAT_STEPS, QAT_BATCH = 250, 150, 8
STAGES = 7


@dataclasses.dataclass(frozen=True)
class Chain:
    """The sizes of the chain's stages. The demo runs the defaults on a CPU; the fidelity benchmark
    (benchmarks/fidelity.py) runs the same chain with a larger model and corpus on a GPU. None = the
    module's TEACHER_STEPS / QAT_STEPS."""
    teacher_steps: int | None = None
    qat_steps: int | None = None
    qat_lr: float = 1e-4
    qat_batch: int | None = QAT_BATCH  # rows per QAT step; None = the teacher's (from overrides / demo.toml)
    overrides: tuple[str, ...] = ()  # for every training stage: model, data, batch, dtypes
    eval_seq: int = 128
    eval_batch: int = 8
    eval_batches: int = 10
    calib_batches: int = 4  # of eval_batch × eval_seq tokens, for the mobile PTQ baseline's activation scales
    # The two QAT students in two processes at once: on a CPU their compiles and tracing (single-threaded,
    # a third of each stage) overlap. One process on a GPU (two would each reserve its memory).
    parallel_qat: bool = False

    @property
    def teacher(self) -> int:
        return TEACHER_STEPS if self.teacher_steps is None else self.teacher_steps

    @property
    def qat(self) -> int:
        return QAT_STEPS if self.qat_steps is None else self.qat_steps


def register(subparsers) -> None:
    s = subparsers.add_parser("demo", help="the embedded default: runs on CPU with no downloads")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    s.set_defaults(fn=run)


def run(args) -> int:
    return run_demo(Path(args.workdir), fresh=args.fresh, chain=Chain(parallel_qat=True))


class _Stage:
    """Prints a numbered heading and the elapsed time; `done` tells whether to skip. A stage that ran
    records its seconds under `key` in work/stages.json."""

    def __init__(self, n: int, title: str, output: Path, work: Path, key: str):
        self.output, self.t0, self.work, self.key = output, time.perf_counter(), work, key
        self.done = output.exists()
        print(f"\n[{n}/{STAGES}] {title}" + ("  (reusing " + str(output) + ")" if self.done else ""), flush=True)

    def finish(self):
        dt = time.perf_counter() - self.t0
        print(f"      {dt:.1f}s → {self.output}", flush=True)
        if not self.done:
            _record(self.work, self.key, dt)


def _train(work: Path, stage: str, overrides: list[str], chain: Chain) -> Path:
    import jax

    from gemma_qat.train.config import load_run_config
    from gemma_qat.train.loop import FINAL_MODEL_DIR, train

    cfg = load_run_config(CONFIG, [f"run_dir={work / stage}", *chain.overrides, *overrides])
    # One device: the demo's mesh is 1×1×1×1 whatever the host exposes.
    train(cfg, devices=jax.devices()[:1])
    return work / stage / FINAL_MODEL_DIR


def _distill(work: Path, stage: str, recipe: str, teacher_dir: Path, data_dir: Path, tokenizer: Path, *, seed: int,
             chain: Chain):
    """A QAT student of `recipe` KL-distilled from the frozen teacher on the teacher's own training text,
    its fake-quant computed by the default backend (quant.backend = auto)."""
    _train(work, stage, [
        f"model.name={teacher_dir}", f"teacher.checkpoint={teacher_dir}", f"quant.recipe={recipe}",
        f"data.spec=jsonl:{data_dir / 'train.jsonl'}", f"data.tokenizer={tokenizer}", f"data.seed={seed}",
        "distill.alpha=0.0", f"optimizer.lr={chain.qat_lr}", f"optimizer.warmup_steps={min(10, chain.qat // 4)}",
        f"optimizer.total_steps={chain.qat}",
        *([f"data.global_batch_size={chain.qat_batch}"] if chain.qat_batch else [])], chain)


def _distill_worker(log: str, work: Path, stage: str, recipe: str, teacher_dir: Path, data_dir: Path,
                    tokenizer: Path, seed: int, chain: Chain) -> float:
    """One QAT stage in a spawned process, its output to `log`; returns its seconds."""
    import os
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)  # the fds, so XLA's and absl's C++ logging land there too
    t0 = time.perf_counter()
    _distill(work, stage, recipe, teacher_dir, data_dir, tokenizer, seed=seed, chain=chain)
    return time.perf_counter() - t0


def _record(work: Path, key: str, seconds: float) -> None:
    f = work / "stages.json"
    f.write_text(json.dumps({**(json.loads(f.read_text()) if f.exists() else {}), key: seconds}, indent=1))


class _Student(typing.NamedTuple):
    n: int  # stage number
    title: str
    stage: str  # run folder under the work dir
    key: str  # in stages.json
    recipe: str
    seed: int  # of the data order


def _distill_in_parallel(work: Path, todo: list[_Student], teacher_dir: Path, data_dir: Path, tokenizer: Path,
                         chain: Chain) -> None:
    """Both QAT stages at once, each in a spawned process (a fresh JAX) with its log in its run folder."""
    import concurrent.futures
    import multiprocessing

    from gemma_qat.train.loop import FINAL_MODEL_DIR

    # The step counts as numbers: a spawned process re-imports this module and sees its defaults.
    chain = dataclasses.replace(chain, teacher_steps=chain.teacher, qat_steps=chain.qat)
    log = lambda x: work / x.stage / "train.log"  # noqa: E731
    for x in todo:
        (work / x.stage).mkdir(parents=True, exist_ok=True)
        print(f"\n[{x.n}/{STAGES}] {x.title}  (in parallel; log: {log(x)})", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(todo), mp_context=ctx) as pool:
        futures = [pool.submit(_distill_worker, str(log(x)), work, x.stage, x.recipe, teacher_dir, data_dir,
                               tokenizer, x.seed, chain) for x in todo]
        for x, future in zip(todo, futures):
            try:
                dt = future.result()
            except Exception as e:
                tail = "".join(log(x).read_text(errors="replace").splitlines(True)[-20:])
                raise RuntimeError(f"QAT stage {x.stage!r} failed ({e}); the end of {log(x)}:\n{tail}") from e
            steps = [ln for ln in log(x).read_text(errors="replace").splitlines() if ln.startswith("step ")]
            print(f"      [{x.n}/{STAGES}] {steps[-1] if steps else ''}\n      {dt:.1f}s → "
                  f"{work / x.stage / FINAL_MODEL_DIR}", flush=True)
            _record(work, x.key, dt)


def run_demo(work: Path, *, fresh: bool = False, chain: Chain = Chain()) -> int:
    """Runs (or resumes) the chain in `work`; each stage's seconds go to work/stages.json as it finishes."""
    from gemma_qat.eval.report import format_table
    from gemma_qat.model.checkpoint import load_model, read_meta, save_model
    from gemma_qat.quant.ptq import dequantized_params
    from gemma_qat.quant.recipe import resolve_recipe
    from gemma_qat.train.loop import FINAL_MODEL_DIR

    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = work / "teacher" / FINAL_MODEL_DIR
    data_dir = work / "teacher" / "data"

    s = _Stage(1, f"teacher: trained from scratch on the Python stdlib ({chain.teacher} steps)", teacher_dir,
               work, "teacher")
    if not s.done:
        _train(work, "teacher", [f"optimizer.total_steps={chain.teacher}",
                                 f"optimizer.warmup_steps={min(20, chain.teacher // 4)}"], chain)
    s.finish()
    tokenizer = data_dir / "tokenizer.model"

    qat_dir, mobile_dir = work / "qat" / FINAL_MODEL_DIR, work / "qat-mobile" / FINAL_MODEL_DIR
    students = [
        _Student(2, f"QAT: Q4_0 student distilled from the frozen teacher ({chain.qat} steps)", "qat", "qat-q4_0",
                 "q4_0", 1),
        _Student(3, f"QAT: mobile student (int4/int2 weights, int8 activations) distilled through AQT "
                    f"({chain.qat} steps)", "qat-mobile", "qat-mobile", "mobile", 2)]
    todo = [x for x in students if not (work / x.stage / FINAL_MODEL_DIR).exists()]
    if chain.parallel_qat and len(todo) == 2:
        _distill_in_parallel(work, todo, teacher_dir, data_dir, tokenizer, chain)
    else:
        for x in students:
            s = _Stage(x.n, x.title, work / x.stage / FINAL_MODEL_DIR, work, x.key)
            if not s.done:
                _distill(work, x.stage, x.recipe, teacher_dir, data_dir, tokenizer, seed=x.seed, chain=chain)
            s.finish()

    config, teacher_params = load_model(teacher_dir)
    ptq_dir = work / "ptq-q4_0"
    s = _Stage(4, "PTQ baseline: the teacher quantized directly with the q4_0 recipe", ptq_dir, work, "ptq")
    if not s.done:
        res = resolve_recipe("q4_0", config)
        save_model(ptq_dir, dequantized_params(config, teacher_params, res), config,
                   meta=dataclasses.replace(read_meta(teacher_dir), kind="ptq", recipe=res.recipe.to_dict()))
    s.finish()

    exports = work / "exports"
    s = _Stage(5, "exports: Q4_0 Orbax, GGUF, mobile (QAT student and PTQ teacher)", exports / "done.json", work,
               "exports")
    if not s.done:
        _exports(work, exports, qat_dir, mobile_dir, teacher_dir, tokenizer, data_dir, chain)
        (exports / "done.json").write_text(json.dumps({"ok": True}))
    s.finish()

    report = work / "report"
    s = _Stage(6, "evaluation on held-out text (teacher, PTQ, QAT, exports)", report / "results.json", work, "eval")
    if not s.done:
        _evaluate(work, report, tokenizer, data_dir / "valid.jsonl", chain)
    s.finish()

    print(f"\n[{STAGES}/{STAGES}] summary (held-out Python stdlib text; KL and top-1 against the teacher)")
    print(format_table(json.loads((report / "results.json").read_text())))
    print(f"\nreport: {report / 'report.md'} (plots beside it)")
    return 0


def _evaluate(work: Path, report: Path, tokenizer: Path, valid: Path, chain: Chain) -> None:
    """What `gemma-qat eval` runs (eval.compare), on the demo's artifacts, printed as it prints them."""
    from gemma_qat.eval.compare import compare
    from gemma_qat.eval.report import format_table
    from gemma_qat.train.loop import FINAL_MODEL_DIR

    exports = work / "exports"
    candidates = {"qat-q4_0": work / "qat" / FINAL_MODEL_DIR, "export-q4_0": exports / "student-q4_0",
                  "mobile-ptq": exports / "teacher-mobile", "mobile-qat": exports / "student-mobile"}
    try:
        import llama_cpp  # noqa: F401  (optional: the GGUF row needs llama.cpp)
        candidates["gguf-q4_0"] = exports / "student-q4_0.gguf"
    except ImportError:
        print("      (llama-cpp-python not installed: the GGUF row is skipped)")
    results, _ = compare(
        str(work / "teacher" / FINAL_MODEL_DIR), {name: str(path) for name, path in candidates.items()},
        data=f"jsonl:{valid}", tokenizer=str(tokenizer), recipe="q4_0", ptq=True, seq_len=chain.eval_seq,
        batch_size=chain.eval_batch, batches=chain.eval_batches, report=str(report), curves={"teacher": str(work / "teacher"), "qat-q4_0": str(work / "qat"),
                                       "mobile-qat": str(work / "qat-mobile")},
        progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(results))
    print(f"report → {report}/report.md")


def _exports(work: Path, exports: Path, qat_dir: Path, mobile_dir: Path, teacher_dir: Path, tokenizer: Path,
             data_dir: Path, chain: Chain):
    from gemma_qat.data import Tokenizer, make_eval_batches
    from gemma_qat.export.common import load_student
    from gemma_qat.export.gguf import export_gguf
    from gemma_qat.export.mobile import export_mobile
    from gemma_qat.export.orbax_q4_0 import export_q4_0
    from gemma_qat.model.checkpoint import load_model, read_meta, save_model, save_quant_scales
    from gemma_qat.quant.policy import calibrate
    from gemma_qat.quant.recipe import resolve_recipe

    exports.mkdir(parents=True, exist_ok=True)
    export_q4_0(qat_dir, exports / "student-q4_0", tokenizer=tokenizer, force=True)
    config, params, res, _ = load_student(qat_dir)
    export_gguf(config, params, res, exports / "student-q4_0.gguf", tokenizer=tokenizer, force=True)
    export_mobile(mobile_dir, exports / "student-mobile", tokenizer=tokenizer, force=True)

    # Mobile: the teacher PTQ'd with the mobile recipe, activation scales calibrated on training text.
    config, t_params = load_model(teacher_dir)
    mres = resolve_recipe("mobile", config)
    mobile_ckpt = work / "ptq-mobile"
    if not mobile_ckpt.exists():
        batches = make_eval_batches(f"jsonl:{data_dir / 'train.jsonl'}", Tokenizer.load(tokenizer),
                                    seq_len=chain.eval_seq, global_batch_size=chain.eval_batch,
                                    num_batches=chain.calib_batches)
        scales = calibrate(config, t_params, mres, batches)
        save_model(mobile_ckpt, t_params, config,
                   meta=dataclasses.replace(read_meta(teacher_dir), kind="ptq", recipe=mres.recipe.to_dict()))
        save_quant_scales(mobile_ckpt, scales)
    export_mobile(mobile_ckpt, exports / "teacher-mobile", tokenizer=tokenizer, force=True)
