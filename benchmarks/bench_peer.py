"""The PyTorch peer (shared/bench/peer_torchao_qat.py: transformers' Gemma 4 + torchao int4 g32 QAT) on any
config bench_step.py knows, so E2B and 26B-A4B-4l get a peer column too. The peer script ships configs for
bench-1b and tiny only; this adds the others as transformers Gemma4TextConfig fields made by
`hf.layout.config_to_hf`, the mapping the importer and exporter use, so both frameworks build the same model.

    python benchmarks/bench_peer.py PEER_SCRIPT --config e2b --batch 2 --seq 2048 --steps 6
    python benchmarks/bench_peer.py PEER_SCRIPT --config tiny-e2b --batch 1 --seq 32 --steps 1   # CPU smoke

Everything after PEER_SCRIPT goes to the peer's own command line. The peer counts every parameter in its
MFU (the PLE table and all experts too), so compare tokens/s, not its MFU, for E2B and MoE configs. On MoE
configs its QAT is not ours: torchao's QATConfig swaps nn.Linear modules, and transformers keeps the experts
as 3-D parameters of one module, so the peer fake-quantizes the router and the dense layers but trains the
experts (3.0 B of 26B-A4B-4l's 3.3 B trained parameters) in plain bf16.

On a GPU the peer's models are built there (torch's default device) rather than on the CPU and then moved:
the peer script initialises each model in fp32 on the host, which takes longer than its timed steps for
the 4 B-parameter configs. Only the untimed setup changes; the steps and the peak memory are the peer's.
"""

from __future__ import annotations

import importlib.util
import sys

from bench_step import bench_config  # benchmarks/ is on sys.path
from gemma_qat.hf.layout import config_to_hf


def peer_config(name: str) -> dict:
    """Gemma4TextConfig keyword arguments for one of our configs."""
    return {k: v for k, v in config_to_hf(bench_config(name)).items() if k not in ("architectures", "model_type")}


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: bench_peer.py PEER_SCRIPT [peer arguments, e.g. --config e2b]")
    path, rest = argv[0], argv[1:]
    spec = importlib.util.spec_from_file_location("peer_torchao_qat", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the peer script {path!r}: give the path of shared/bench/peer_torchao_qat.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    name = rest[rest.index("--config") + 1] if "--config" in rest else "bench-1b"
    if name not in peer.CONFIGS:
        peer.CONFIGS[name] = peer_config(name)
    sys.argv = [path, *rest]
    import torch
    if torch.cuda.is_available():
        torch.set_default_device("cuda")
    peer.main()


if __name__ == "__main__":
    main(sys.argv[1:])
