"""Launchers: every script parses (`bash -n`), and each `--dry-run` prints the commands it would run,
with the config, the overrides, the number of workers/processes and the coordinator set-up, and
runs none of them (no gcloud, sbatch, srun or kubectl exists here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
OVERRIDES = ["optimizer.lr=3e-5", "run_dir=/mnt/runs/a b"]  # one with a space: quoting must survive


def _run(cmd, env=None, **kw):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_"))}
    return subprocess.run(cmd, cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60, **kw)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(script):
    r = _run(["bash", "-n", str(LAUNCH / script)])
    assert r.returncode == 0, r.stderr


def test_tpu_pod_dry_run():
    r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--tpu", "qat-e4b", "--zone", "us-east5-a",
              "--project", "proj", "--config", "configs/e4b-q4_0.toml", *OVERRIDES])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "topology v5p-32, workers: 4" in out  # from the preset's `# topology:` comment
    ssh = [line for line in out.splitlines() if line.startswith("gcloud compute tpus tpu-vm ssh qat-e4b")]
    assert len(ssh) == 3 and all("--worker=all" in s and "--zone=us-east5-a" in s for s in ssh)  # sync, install, train
    assert "tpu-vm scp /tmp/gemma-qat-src.tgz qat-e4b:/tmp/gemma-qat-src.tgz" in out
    assert "bash tools/bootstrap.sh" in ssh[1] and "jax[tpu]==$JV" in ssh[1]
    train = ssh[2]
    assert ".venv/bin/gemma-qat train --config configs/e4b-q4_0.toml optimizer.lr=3e-5" in train
    assert "run_dir=/mnt/runs/a b" in train.replace("'\\''", "'").replace("'run_dir", "run_dir")
    assert "TPU_WORKER_HOSTNAMES" in out  # how the coordinator is found on TPU


def test_tpu_pod_git_sync_and_errors():
    r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--tpu", "t", "--zone", "z", "--sync", "git",
              "--repo", "https://example.com/gemma-qat.git", "--ref", "v1", "--skip-install",
              "--topology", "v6e-16", "--config", "configs/tiny.toml"])
    assert r.returncode == 0 and "workers: 4" in r.stdout
    assert "git clone -q https://example.com/gemma-qat.git" in r.stdout
    assert "bootstrap" not in r.stdout
    r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--tpu", "t", "--zone", "z"])
    assert r.returncode == 2 and "--config FILE is required" in r.stderr


def _fake_scontrol(tmp_path) -> str:
    stub = tmp_path / "scontrol"
    stub.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n"\n')
    stub.chmod(0o755)
    return f"{tmp_path}:{os.environ['PATH']}"


@pytest.mark.parametrize("tasks_per_node", [1, 8])
def test_slurm_dry_run_inside_the_allocation(tmp_path, tasks_per_node):
    env = {"PATH": _fake_scontrol(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-10]",
           "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_SUBMIT_DIR": str(ROOT)}
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--config", "configs/31b-q4_0.toml", *OVERRIDES], env)
    assert r.returncode == 0, r.stderr
    out, procs = r.stdout, 4 * tasks_per_node
    assert "export JAX_COORDINATOR_ADDRESS=gpu07:8476" in out  # first host of the allocation
    assert f"export JAX_NUM_PROCESSES={procs}" in out and "export NCCL_NVLS_ENABLE=0" in out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert f"--nodes=4 --ntasks={procs} --ntasks-per-node={tasks_per_node}" in srun
    assert "JAX_PROCESS_ID=$SLURM_PROCID" in srun  # evaluated per task, inside srun
    assert ("JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in srun) == (tasks_per_node > 1)
    assert ".venv/bin/gemma-qat train --config configs/31b-q4_0.toml optimizer.lr=3e-5" in srun
    assert "run_dir=/mnt/runs/a b" in srun.replace("'\\''", "'").replace("'run_dir", "run_dir")


def test_slurm_outside_a_job_submits_itself():
    r = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--nodes", "4", "--config", "configs/31b-q4_0.toml",
              "optimizer.lr=3e-5"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("sbatch --nodes=4 launch/slurm_gpu.sbatch --config configs/31b-q4_0.toml "
                                "optimizer.lr=3e-5")


@pytest.mark.parametrize("config,pods,resource", [("configs/e4b-q4_0.toml", 4, "google.com/tpu: 4"),
                                                  ("configs/31b-q4_0.toml", 4, "nvidia.com/gpu: 8")])
def test_gke_jobset_dry_run(config, pods, resource):
    r = _run([sys.executable, "launch/gke_jobset.py", "--dry-run", "--image", "reg/gemma-qat:1", "--config", config,
              *OVERRIDES])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "kubectl apply -f -  <<'EOF'" and lines[-1] == "EOF"
    out = r.stdout
    name = "gemma-qat-" + Path(config).stem.replace("_", "-")
    assert f"parallelism: {pods}" in out and f"completions: {pods}" in out and resource in out
    assert f'value: "{name}-workers-0-0.{name}:8476"' in out  # JAX_COORDINATOR_ADDRESS: pod 0
    assert "name: JAX_NUM_PROCESSES" in out and f'value: "{pods}"' in out
    assert "batch.kubernetes.io/job-completion-index" in out  # JAX_PROCESS_ID
    assert f'command: [".venv/bin/gemma-qat", "train", "--config", "{config}", "optimizer.lr=3e-5", ' \
           '"run_dir=/mnt/runs/a b"]' in out
    if "tpu" in resource:
        assert "cloud.google.com/gke-tpu-topology: 2x2x4" in out
    else:
        assert re.search(r'name: NCCL_NVLS_ENABLE\n\s+value: "0"', out)
