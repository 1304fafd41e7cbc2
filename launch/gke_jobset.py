#!/usr/bin/env python3
"""Render launch/gke_jobset.yaml for a topology and run config, and `kubectl apply` it.

    python launch/gke_jobset.py [--dry-run] --image IMAGE --config configs/e4b-q4_0.toml
        [--topology v5p-32] [--name NAME] [--workdir /workspace/gemma-qat] [--max-restarts 3]
        [--out FILE] [key=value ...]

--dry-run prints the command it would run and the manifest it would pipe into it, and runs nothing.
The image must hold the checkout at --workdir with its .venv (tools/bootstrap.sh, plus jax[tpu] or
jax[cuda12]); see launch/README.md. Standard library only (plus gemma_qat.preflight.topologies, which imports
no jax), so it runs from any checkout without the venv.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gemma_qat.preflight.topologies import Topology, from_config_comment, parse  # noqa: E402

TEMPLATE = Path(__file__).with_name("gke_jobset.yaml")
# GKE node labels of each chip (cloud.google.com/gke-tpu-accelerator / gke-accelerator values).
_TPU_ACCELERATOR = {"v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice", "v5e": "tpu-v5-lite-podslice"}
_GPU_ACCELERATOR = {"H100": "nvidia-h100-80gb", "H200": "nvidia-h200-141gb"}
_NODE_INDENT, _ENV_INDENT = " " * 14, " " * 14


def _env_lines(pairs: dict[str, str]) -> str:
    return "\n".join(f"{_ENV_INDENT}- name: {k}\n{_ENV_INDENT}  value: {json.dumps(v)}" for k, v in pairs.items())


def values(topo: Topology, *, name: str, image: str, config: str, overrides: list[str], workdir: str,
           max_restarts: int, port: int = 8476) -> dict[str, str]:
    """Every placeholder of the template."""
    if topo.platform == "tpu":
        selector = {"cloud.google.com/gke-tpu-accelerator": _TPU_ACCELERATOR[topo.chip.name],
                    "cloud.google.com/gke-tpu-topology": "x".join(map(str, topo.tpu_shape))}
        resource, env = "google.com/tpu", {"JAX_PLATFORMS": "tpu"}
        # TPU slices talk over the host network (GKE's multi-host TPU examples do the same).
        host_network, dns = "true", "ClusterFirstWithHostNet"
    else:
        selector = {"cloud.google.com/gke-accelerator": _GPU_ACCELERATOR[topo.chip.name]}
        resource, host_network, dns = "nvidia.com/gpu", "false", "ClusterFirst"
        # As launch/slurm_gpu.sbatch: NVLink SHARP off, 92% of HBM to XLA (the preflight assumes 90%).
        env = {"NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "WARN", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92",
               "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"}
    command = [".venv/bin/gemma-qat", "train", "--config", config, *overrides]
    return {
        "NAME": name, "IMAGE": image, "WORKDIR": workdir, "MAX_RESTARTS": str(max_restarts),
        "NUM_HOSTS": str(topo.hosts), "CHIPS_PER_HOST": str(topo.chips_per_host), "RESOURCE": resource,
        "HOST_NETWORK": host_network, "DNS_POLICY": dns, "COORDINATOR_PORT": str(port),
        "NODE_SELECTOR": "\n".join(f"{_NODE_INDENT}{k}: {v}" for k, v in selector.items()),
        "EXTRA_ENV": _env_lines(env),
        "COMMAND": json.dumps(command),  # a JSON list is a YAML flow sequence: no shell quoting at all
    }


def render(**kw) -> str:
    return string.Template(TEMPLATE.read_text()).substitute(values(**kw))


def _default_name(config: str) -> str:
    # DNS-1035 label; short, because pod host names add "-workers-0-N" and must stay under 63.
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(config).stem.lower()).strip("-")
    return f"gemma-qat-{stem}"[:40].rstrip("-")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--image", required=True, help="container image with the checkout and its .venv")
    p.add_argument("--config", required=True, help="run config path inside the image's checkout")
    p.add_argument("--topology", help="default: the config's `# topology:` comment")
    p.add_argument("--name", help="JobSet name (default gemma-qat-<config stem>)")
    p.add_argument("--workdir", default="/workspace/gemma-qat")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--out", help="also write the manifest to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for gemma-qat train")
    a = p.parse_args(argv)
    topology = a.topology or from_config_comment((ROOT / a.config).read_text() if (ROOT / a.config).is_file()
                                                 else Path(a.config).read_text())
    if not topology:
        p.error("give --topology, or a config whose first lines say `# topology: NAME`")
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    topo = parse(topology)
    manifest = render(topo=topo, name=a.name or _default_name(a.config), image=a.image, config=a.config,
                      overrides=a.overrides, workdir=a.workdir, max_restarts=a.max_restarts)
    if a.out:
        Path(a.out).write_text(manifest)
    cmd = ["kubectl", "apply", "-f", "-"]
    print(f"# {topo.describe()}: {topo.hosts} pods (workers) × {topo.chips_per_host} chips", file=sys.stderr)
    if a.dry_run:
        print(" ".join(cmd) + "  <<'EOF'")
        print(manifest.rstrip("\n"))
        print("EOF")
        return 0
    return subprocess.run(cmd, input=manifest, text=True, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
