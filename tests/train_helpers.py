"""Shared set-up for the training tests: one small corpus + tokenizer per session, a teacher
checkpoint per model, and the base run config every end-to-end test starts from (one config, so
runs reuse one compiled step)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import jax

from gemma_qat.data import build_python_corpus, train_sentencepiece
from gemma_qat.model.checkpoint import save_model
from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.train.config import RunConfig, load_run_config

TOTAL_STEPS = 20


@functools.lru_cache(maxsize=None)
def data_files() -> tuple[str, str]:
    """(train.jsonl, tokenizer.model) built once per test session."""
    root = Path(tempfile.mkdtemp(prefix="gemma_qat_train_data_"))
    train, _ = build_python_corpus(root, max_bytes=256 * 1024)
    tok = train_sentencepiece([train], root / "sp", vocab_size=480)
    return str(train), str(tok)


@functools.lru_cache(maxsize=None)
def teacher_checkpoint(model: str) -> str:
    """A random model whose tied embedding is scaled ×20, saved as a model checkpoint.

    At the standard init (std 0.02) the logits are nearly uniform, so KL(teacher‖student) is a
    tiny difference of nearly equal numbers and its fp32 gradient carries ~1e-4 relative noise;
    a sharper teacher gives a well-conditioned loss, like a trained model's.
    """
    cfg = get_config(model)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"] * 20
    out = Path(tempfile.mkdtemp(prefix=f"gemma_qat_teacher_{model}_")) / "ckpt"
    save_model(out, params, cfg)
    return str(out)


def base_overrides(run_dir, *extra: str, model: str = "tiny-e2b") -> list[str]:
    """The student starts from the teacher checkpoint plus 50% noise; teacher = "same" (the clean
    checkpoint): the QAT set-up, with something to distill even without quantization."""
    train, tok = data_files()
    return [
        f"run_dir={run_dir}", f"model.name={teacher_checkpoint(model)}", "model.init_noise=0.5",
        f"data.spec=jsonl:{train}", f"data.tokenizer={tok}", "data.seq_len=32", "data.global_batch_size=8",
        "data.num_threads=1",
        f"optimizer.total_steps={TOTAL_STEPS}", "optimizer.lr=1e-3", "optimizer.warmup_steps=2",
        "optimizer.compute_dtype=float32", "teacher.param_dtype=float32",
        "distill.chunk_size=16",
        "mesh.data=1", "mesh.fsdp=1", "checkpoint.every_steps=5", "checkpoint.keep=5",
        "logging.every_steps=1", "logging.peak_flops_per_device=1e12", *extra]


def base_config(run_dir, *extra: str, model: str = "tiny-e2b") -> RunConfig:
    return load_run_config(None, base_overrides(run_dir, *extra, model=model))
