"""Multi-host start-up: `jax.distributed.initialize` from the environment, decided explicitly.

Three ways a multi-process run announces itself, checked in this order:
  1. explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (optionally JAX_LOCAL_DEVICE_IDS="0,1,..."), e.g. from a GKE JobSet or a hand-written launcher;
  2. SLURM: SLURM_JOB_ID with SLURM_NTASKS > 1 (jax reads the node list and task ids itself);
  3. a multi-host Cloud TPU slice: TPU_WORKER_HOSTNAMES lists more than one worker (jax reads the
     TPU metadata itself).
Anything else is a single-host run, and that is said in the log rather than discovered by a failed
connection. Initialisation errors propagate: a pod that cannot reach its coordinator must not
train as 8 independent single-host jobs.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

log = logging.getLogger(__name__)

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def detect(environ: Mapping[str, str] = os.environ) -> tuple[str, dict]:
    """(mode, kwargs for jax.distributed.initialize); mode in explicit | slurm | tpu | single."""
    present = [k for k in _EXPLICIT if environ.get(k)]
    if present:
        if len(present) != len(_EXPLICIT):
            missing = sorted(set(_EXPLICIT) - set(present))
            raise ValueError(f"multi-host environment is incomplete: {present} set but {missing} missing")
        kwargs = dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(environ["JAX_NUM_PROCESSES"]),
                      process_id=int(environ["JAX_PROCESS_ID"]))
        if environ.get("JAX_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(i) for i in environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
        return "explicit", kwargs
    if environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm", {}
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu", {}
    return "single", {}


def initialize(environ: Mapping[str, str] = os.environ) -> str:
    """Calls jax.distributed.initialize when the environment describes a multi-process run; returns
    the mode. Must run before anything touches jax devices."""
    mode, kwargs = detect(environ)
    if mode == "single":
        log.info("single-host run: no JAX_COORDINATOR_ADDRESS, multi-task SLURM job or multi-host TPU found")
        return mode
    log.info("initialising jax.distributed (%s) %s", mode, kwargs)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return mode
