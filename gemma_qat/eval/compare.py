"""One comparison of candidates against their teacher on held-out text: what `gemma-qat eval` prints and
the demo reports. Every argument is checked before anything slow is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from gemma_qat.data import Tokenizer, check_vocab, make_eval_batches
from gemma_qat.eval.candidates import from_checkpoint, load_candidate, ptq_candidate
from gemma_qat.eval.metrics import evaluate, quant_errors
from gemma_qat.eval.report import write_report
from gemma_qat.quant.recipe import resolve_recipe


def compare(teacher_dir, candidates: dict[str, str], *, data: str, tokenizer, recipe: str = "q4_0",
            ptq: bool = False, seq_len: int = 256, batch_size: int = 4, batches: int | None = None,
            chunk_size: int = 256, report=None, curves: dict[str, str] | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """-> (results, quant_errors). `candidates` {name: checkpoint folder, q4_0 / mobile export folder or
    .gguf}; `ptq` adds the teacher's PTQ baseline under `recipe`, which also names the per-tensor error
    table. `report`: a folder to write results.json, report.md and plots into (with `curves`
    {label: a run's metrics.jsonl or its folder}). `batches` caps the evaluated batches."""
    if not candidates and not ptq:
        raise ValueError("nothing to compare: give --candidates NAME=PATH ... and/or --ptq")
    for name, path in candidates.items():  # fail before the (slow) teacher load
        if not Path(path).exists():
            raise FileNotFoundError(f"candidate {name!r}: {path} does not exist")
    teacher = from_checkpoint("teacher", teacher_dir)
    if teacher.kind != "float":
        raise ValueError(f"--teacher {teacher_dir} is a {teacher.kind} checkpoint; give the float teacher")
    if "teacher" in candidates:
        raise ValueError("the name 'teacher' is the reference row; choose another candidate name")
    tok = Tokenizer.load(tokenizer)
    check_vocab(tok, teacher.config.vocab_size)
    cands = []
    resolution = resolve_recipe(recipe, teacher.config)
    if ptq:
        name = f"ptq-{resolution.recipe.name}"
        cands.append(ptq_candidate(name, teacher.config, teacher.variables["params"], resolution,
                                   source=f"PTQ {resolution.recipe.name} of {teacher_dir}"))
    for name, path in candidates.items():
        cands.append(load_candidate(name, path))
    rows = make_eval_batches(data, tok, seq_len=seq_len, global_batch_size=batch_size, shard_index=0,
                             shard_count=1, num_batches=batches)
    rows = [b for b in rows if b["loss_mask"].any()]  # num_batches pads short data with empty batches
    if not rows:
        raise ValueError(f"--data {data} yields no evaluation batches")
    try:
        results = evaluate(teacher, cands, rows, chunk_size=chunk_size, progress=progress)
    finally:
        for c in cands:
            if c.close:
                c.close()
    results["data"] = data
    errors = quant_errors(teacher.config, teacher.variables["params"], resolution)
    if report:
        write_report(report, results, quant_errors=errors, curves=curves or None,
                     quant_label=f"teacher weights under {resolution.recipe.name}")
    return results, errors
