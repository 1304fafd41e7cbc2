"""Evaluation of quantized students against their teacher: candidates (every way a model reaches us:
float/PTQ/QAT checkpoints, Q4_0 and mobile exports, GGUF through llama.cpp), metrics (perplexity,
KL to the teacher, top-1 agreement, PTQ-gap recovery, per-tensor quantization error), a report
folder with plots, and a sampler. `compare` runs one whole comparison (what `gemma-qat eval` prints)."""

from gemma_qat.eval.candidates import Candidate, load_candidate, parse_candidate_spec, ptq_candidate
from gemma_qat.eval.compare import compare
from gemma_qat.eval.metrics import add_recovery, evaluate, layer_errors, quant_errors, recovery_ratio

__all__ = ["Candidate", "add_recovery", "compare", "evaluate", "layer_errors", "load_candidate", "parse_candidate_spec",
           "ptq_candidate", "quant_errors", "recovery_ratio"]
