"""The run config of a QAT distillation run: one frozen dataclass per section, TOML on disk.

    [model]       student: variant name (`tiny-e2b`) or a gemma-qat model checkpoint folder
    [teacher]     `same` (= the student's initial weights) or a model checkpoint folder, or a
                  top-k cache folder (`cache`, offline distillation)
    [data]        spec, tokenizer, seq_len, global_batch_size, seed
    [optimizer]   AdamW + warmup/cosine, clipping, accumulation, dtypes
    [distill]     temperature / alpha and their schedules, loss chunk size, loss_impl (xla | pallas | auto)
    [quant]       student quantization recipe name (`none` = float student, a preset of quant/recipe.py,
                  or a name registered with train/policy.py); q4_0_impl (xla | pallas | auto);
                  backend (auto | formats | aqt: who computes the fake-quant, same bits)
    [mesh]        sharding.MeshConfig fields (data, fsdp, tensor, expert, parallelism: the sharding
                  rules fsdp | fsdp_tp | fsdp_tp_ep; formerly `recipe`)
    [checkpoint]  where and how often, how many to keep
    [logging]     cadence, TensorBoard, peak FLOP/s for MFU
    [guard]       loss-spike guard (train/guard.py; non-finite losses always stop the run)
    top level     run_dir, remat (none | full | dots | weights), attention (xla | cudnn | splash | auto),
                  grouped (MoE grouped matmuls: ragged | blocked | kernel | auto),
                  scan_layers (lax.scan over the repeating layer pattern: model/scan.py)

Every step count (total_steps, warmup_steps, every_steps, ...) counts train steps, i.e. batches of
`data.global_batch_size`; with `optimizer.grad_accum_steps = k` the weights move every k steps.
Load with `load_run_config(path, overrides)`; `to_dict()` is what gets saved beside checkpoints (the
resolved config, never a file's `base = ...` form). `resolved_toml` prints one in full (--print-config).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from gemma_qat.model.attention import ATTENTION_IMPLS
from gemma_qat.model.grouped_matmul import GROUPED_IMPLS
from gemma_qat.model.transformer import REMAT_POLICIES
from gemma_qat.quant.policy import BACKENDS as QUANT_BACKENDS
# Both Pallas kernels (loss/kernel.py, quant/q4_0_kernel.py) take devices.py's auto | xla | pallas choice:
# naming it here spares the config the kernels' imports.
from gemma_qat.devices import KERNEL_IMPLS as LOSS_IMPLS, KERNEL_IMPLS as Q4_0_IMPLS
from gemma_qat.sharding import MeshConfig
from gemma_qat.train import config_io, policy as policy_lib

DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "linear", "cosine")
GUARD_ACTIONS = ("warn", "stop")
# Old dotted key → new. A TOML file or override with the old key is an error naming the new one; a
# saved run config (a .json file such as <run_dir>/config.json, or `from_dict` of a checkpoint's copy
# or of meta.json's run_config) is upgraded, so runs saved before the rename still resume and evaluate.
RENAMED = {"mesh.recipe": "mesh.parallelism"}
# `data.spec = "python-corpus"` builds the Python stdlib corpus under the run dir (no downloads).
PYTHON_CORPUS = "python-corpus"


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "tiny-e2b"  # a variant from model/config.py, or a model checkpoint folder
    # Gaussian noise (relative to each tensor's RMS) added to the student's initial weights. With
    # teacher = "same" and no quantization the student would start *at* the teacher (loss 0); this
    # gives smoke tests and demos something to distill.
    init_noise: float = 0.0
    init_seed: int = 0  # random init (variant names) and init noise


@dataclasses.dataclass(frozen=True)
class TeacherSection:
    checkpoint: str = "same"  # "same" or a model checkpoint folder (any architecture, same vocab)
    param_dtype: str = "bfloat16"  # storage dtype of the frozen teacher weights
    # A folder from `gemma-qat cache-teacher`: offline distillation. Batches (and the teacher's top-k
    # log-probs) come from it, the loss is distill.topk_distill_loss, and no teacher is loaded, so
    # `checkpoint`, `param_dtype` and [data] spec/tokenizer are not used. "" = online teacher.
    cache: str = ""


@dataclasses.dataclass(frozen=True)
class DataSection:
    # A gemma_qat.data spec (`jsonl:/path/*.jsonl@0.7,text:/other`) or "python-corpus".
    spec: str = PYTHON_CORPUS
    tokenizer: str = ""  # SentencePiece .model path; "" only with python-corpus (trained in the run dir)
    seq_len: int = 512
    global_batch_size: int = 8
    seed: int = 0
    corpus_bytes: int = 2 * 1024 * 1024  # python-corpus only
    corpus_site_packages: bool = False  # python-corpus only: the installed packages after the stdlib
    tokenizer_vocab: int = 512  # python-corpus only; capped at the model's vocab
    num_threads: int = 2  # grain read threads


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    lr: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_fraction: float = 0.1  # cosine decays to lr · this
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    grad_accum_steps: int = 1
    param_dtype: str = "float32"  # master weights of the student
    compute_dtype: str = "bfloat16"  # activations of student and teacher


@dataclasses.dataclass(frozen=True)
class DistillSection:
    temperature: float = 1.0
    alpha: float = 0.0  # weight of next-token CE; (1 - alpha) weights the KL
    # Both are scheduled from their start value to *_end over schedule_steps (0 = total_steps).
    schedule: str = "constant"
    temperature_end: float | None = None
    alpha_end: float | None = None
    schedule_steps: int = 0
    chunk_size: int = 256  # tokens per logits chunk in the loss (memory: B · chunk · V fp32)
    loss_impl: str = "auto"  # xla | pallas | auto (loss/kernel.py: two Pallas passes over the logits on one GPU)


@dataclasses.dataclass(frozen=True)
class QuantSection:
    recipe: str = "none"  # resolved by train/policy.py (registry, then gemma_qat.quant.recipe)
    q4_0_impl: str = "auto"  # xla | pallas | auto (quant/q4_0_kernel.py: the one-pass kernel on one GPU)
    # auto | formats | aqt: who computes the weight fake-quant (quant/policy.py; auto: choose_backend's
    # measured rule); the same bits either way, so checkpoints and exports do not depend on it.
    # q4_0_impl applies to the formats backend.
    backend: str = "auto"


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    dir: str = ""  # "" = <run_dir>/checkpoints
    every_steps: int = 500
    keep: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every step that is a multiple of this forever (0 = none)
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    every_steps: int = 10
    tensorboard: bool = True
    # Peak dense FLOP/s of ONE device in the compute dtype (H100 SXM bf16: 989e12); 0 omits MFU.
    peak_flops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True)
class GuardSection:
    """train/guard.py. A non-finite loss, gradient norm or parameter always stops the run before a
    checkpoint; the spike guard is about losses that explode and stay finite."""
    spike_factor: float = 10.0  # a loss above this × its running median is a spike; 0 disables
    spike_steps: int = 10  # consecutive spiking steps before the guard acts
    spike_window: int = 100  # steps in the running median
    on_spike: str = "warn"  # warn | stop (stop as on a NaN: last good checkpoint kept, one report)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = ModelSection()
    teacher: TeacherSection = TeacherSection()
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    distill: DistillSection = DistillSection()
    quant: QuantSection = QuantSection()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    guard: GuardSection = GuardSection()
    remat: str = "none"  # none | full | dots | weights (model/transformer.py REMAT_POLICIES)
    attention: str = "auto"  # xla | cudnn | splash | auto (model/attention.py attend: cuDNN on GPU, splash on TPU)
    # MoE grouped matmuls: ragged | blocked | kernel | auto (model/grouped_matmul.py: ragged_dot on TPU, the
    # Hopper kernels on Hopper GPUs, XLA's padded-block form elsewhere)
    grouped: str = "auto"
    scan_layers: bool = False  # lax.scan over the repeating layer pattern (model/scan.py): bounds compile time

    def __post_init__(self):
        problems = _problems(self)
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return config_io.to_dict(self)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"


def _choice(problems: list, key: str, value, allowed) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} must be one of {list(allowed)}")


def _positive(problems: list, key: str, value, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        problems.append(f"{key}={value} must be {'>= 0' if zero_ok else '> 0'}")


def _finite(problems: list, section, prefix: str) -> None:
    """NaN and ±inf are valid TOML floats and pass every range check (nan < 0 is False): no key of the
    run config has a use for them."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _finite(problems, value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{prefix}{f.name}={value} must be a finite number")


def _problems(c: RunConfig) -> list[str]:
    """Value checks that need no devices or files; shape checks against the mesh and data happen
    in the loop, where the devices are known."""
    p: list[str] = []
    o, d, s = c.optimizer, c.data, c.distill
    _finite(p, c, "")
    _choice(p, "remat", c.remat, REMAT_POLICIES)
    _choice(p, "attention", c.attention, ATTENTION_IMPLS)
    _choice(p, "grouped", c.grouped, GROUPED_IMPLS)
    _choice(p, "quant.q4_0_impl", c.quant.q4_0_impl, Q4_0_IMPLS)
    _choice(p, "quant.backend", c.quant.backend, QUANT_BACKENDS)
    if not policy_lib.is_known(c.quant.recipe):  # else a typo surfaces only after data and tokenizer load
        p.append(f"quant.recipe={c.quant.recipe!r} must be one of {policy_lib.known_names()}")
    _choice(p, "distill.loss_impl", s.loss_impl, LOSS_IMPLS)
    _choice(p, "optimizer.param_dtype", o.param_dtype, DTYPES)
    _choice(p, "optimizer.compute_dtype", o.compute_dtype, DTYPES)
    _choice(p, "teacher.param_dtype", c.teacher.param_dtype, DTYPES)
    _choice(p, "distill.schedule", s.schedule, SCHEDULES)
    _choice(p, "guard.on_spike", c.guard.on_spike, GUARD_ACTIONS)
    _positive(p, "guard.spike_factor", c.guard.spike_factor, zero_ok=True)
    _positive(p, "guard.spike_steps", c.guard.spike_steps)
    _positive(p, "guard.spike_window", c.guard.spike_window)
    for key, val in [("optimizer.total_steps", o.total_steps), ("optimizer.grad_accum_steps", o.grad_accum_steps),
                     ("data.seq_len", d.seq_len), ("data.global_batch_size", d.global_batch_size),
                     ("distill.chunk_size", s.chunk_size), ("distill.temperature", s.temperature),
                     ("checkpoint.every_steps", c.checkpoint.every_steps), ("checkpoint.keep", c.checkpoint.keep),
                     ("logging.every_steps", c.logging.every_steps)]:
        _positive(p, key, val)
    for key, val in [("optimizer.lr", o.lr), ("optimizer.warmup_steps", o.warmup_steps),
                     ("optimizer.weight_decay", o.weight_decay), ("optimizer.grad_clip", o.grad_clip),
                     ("checkpoint.keep_every", c.checkpoint.keep_every), ("model.init_noise", c.model.init_noise),
                     ("logging.peak_flops_per_device", c.logging.peak_flops_per_device)]:
        _positive(p, key, val, zero_ok=True)
    if o.warmup_steps > o.total_steps:
        p.append(f"optimizer.warmup_steps={o.warmup_steps} exceeds optimizer.total_steps={o.total_steps}")
    for key, val in [("distill.alpha", s.alpha), ("distill.alpha_end", s.alpha_end)]:
        if val is not None and not 0.0 <= val <= 1.0:
            p.append(f"{key}={val} must be in [0, 1]")
    if d.spec != PYTHON_CORPUS and not d.tokenizer and not c.teacher.cache:
        p.append(f"data.tokenizer is required unless data.spec = {PYTHON_CORPUS!r}")
    if c.teacher.cache:
        # The cache holds log_softmax(teacher / T) at ONE temperature (a top-k cannot be re-tempered),
        # and topk_distill_loss is KL only.
        if s.schedule != "constant":
            p.append(f"teacher.cache needs distill.schedule = 'constant' (got {s.schedule!r}): the cached "
                     "top-k log-probs are at one temperature")
        if s.alpha != 0:
            p.append(f"teacher.cache needs distill.alpha = 0 (got {s.alpha}): the cached-teacher loss "
                     "(top-k KL) has no CE term")
    return p


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults ← TOML (or a saved config.json) ← `key=value` overrides."""
    return config_io.load(RunConfig, path, overrides, RENAMED)


def from_dict(data: dict) -> RunConfig:
    """A saved run config (`to_dict()`), from this or an older version."""
    return config_io.build(RunConfig, config_io.upgrade(data, RENAMED), renamed=RENAMED)


def resolved_toml(path: str | Path | None = None, overrides: Sequence[str] = ()) -> str:
    """`path` + overrides as one self-contained TOML file (bases, defaults and overrides applied) that
    loads back to the same RunConfig. A preset's `# topology:` line stays first: preflight reads it."""
    cfg = load_run_config(path, overrides)
    head = []
    if path is not None:
        for line in Path(path).read_text().splitlines():
            if not line.startswith("#"):
                break
            if line[1:].strip().startswith("topology:"):
                head.append(line[1:].strip())
    head.append(f"run config of {path or '(defaults)'}{' ' + ' '.join(overrides) if overrides else ''}, resolved")
    return config_io.to_toml(cfg, head)
