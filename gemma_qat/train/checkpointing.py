"""Run checkpoints: train state (Orbax, async), data-iterator position and the resolved config, in
one step folder; restore picks the newest readable one.

Layout of `<dir>/<step>/`: `state/` (params, opt_state, step, rng), `data/` (the grain iterator
state, one JSON file per process), `config/` (the run config JSON). The data item goes through
grain's Orbax handler rather than `JsonSave` because JsonSave writes only from the primary process,
and every host's iterator has its own position. Once Orbax has committed a step, `checksums.json`
(train/checksums.py) records every file's CRC-32; restore checks it, so flipped bytes are set aside
like a truncated file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gemma_qat.train import checksums
from gemma_qat.train.state import TrainState

log = logging.getLogger(__name__)


class _IteratorSnapshot:
    """The iterator's state frozen at save time. The save may finish in the background while the
    live iterator moves on; grain's handler serialises `get_state()` (bytes for non-dataset
    iterators), so hand it the state taken now."""

    def __init__(self, state: dict):
        self._bytes = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._bytes


# Settings that change the shapes or structure of the saved state: resuming across a change in any
# of them cannot work, and the old checkpoints are not corrupt.
_STRUCTURAL = (("model", "name"), ("optimizer", "param_dtype"), ("optimizer", "grad_accum_steps"))


def _check_same_run(saved: dict, current: dict, where: Path) -> None:
    diffs = [f"{a}.{b}: checkpoint {saved.get(a, {}).get(b)!r} vs config {current[a][b]!r}"
             for a, b in _STRUCTURAL if saved.get(a, {}).get(b) != current[a][b]]
    if (saved.get("optimizer", {}).get("grad_clip", 0) > 0) != (current["optimizer"]["grad_clip"] > 0):
        diffs.append("optimizer.grad_clip switched on/off")
    # The data iterator of a cached run (teacher.cache) and of a pipeline run have different states.
    if bool(saved.get("teacher", {}).get("cache")) != bool(current["teacher"].get("cache")):
        diffs.append("teacher.cache switched on/off")
    if diffs:
        raise ValueError(f"{where} was written by a different run ({'; '.join(diffs)}); give this run its own "
                         "run_dir or checkpoint.dir")


class RunCheckpointer:
    def __init__(self, directory: Path, *, keep: int, keep_every: int, async_save: bool):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._async = async_save
        self._lock = threading.Lock()
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet

    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        """Starts the save; arrays are copied off the devices before this returns, so the caller may
        donate `state` to the next step right away."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
                                  config=ocp.args.JsonSave(config))
        with self._lock:
            self._unsealed.append(step)
        self.manager.save(step, args=args, force=True)
        if not self._async:
            self._seal()

    def _seal(self) -> None:
        """Checksums for every saved step that Orbax has committed (its folder has its final name).
        Runs in Orbax's background thread after each async save, so the step loop does not wait."""
        with self._lock:
            for step in list(self._unsealed):
                step_dir = self.directory / str(step)
                if not step_dir.is_dir():
                    continue  # still being written (or already deleted by max_to_keep)
                if jax.process_index() == 0:
                    try:
                        checksums.seal(step_dir)
                    except OSError as e:  # deleted under us by the keep policy: nothing to protect
                        log.warning("could not write checksums for step %d: %s", step, e)
                self._unsealed.remove(step)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, target: TrainState, iterator, config: dict) -> tuple[int, TrainState] | None:
        """Restores the newest readable checkpoint into `target`'s shapes and shardings and moves
        `iterator` to its saved position. A checkpoint that fails to read (missing or truncated
        file, interrupted copy) is moved aside to `<dir>/corrupt-<step>-<time>` with a loud warning,
        and the previous one is tried. None: nothing to resume from.

        A checkpoint written by a run with another model or optimizer structure is not damaged, so
        it is never moved aside: that is a ValueError naming the difference."""
        steps = self.steps()
        for step in reversed(steps):
            problem = checksums.verify(self.directory / str(step))
            if problem is not None:
                self._quarantine(step, ValueError(problem))
                continue
            if not checksums.sealed(self.directory / str(step)):
                log.info("step %d has no checksums (saved before they existed, or killed before they were "
                         "written): restoring it unverified", step)
            try:
                saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            except Exception as e:  # Orbax/tensorstore/grain raise many types for a damaged folder.
                self._quarantine(step, e)
                continue
            _check_same_run(saved, config, self.directory / str(step))
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=grain.checkpoint.CheckpointRestore(iterator)))
            except Exception as e:
                self._quarantine(step, e)
                continue
            return step, out.state
        if steps:  # never restart from scratch silently when there was something to resume
            raise ValueError(f"none of the checkpoints {steps} in {self.directory} could be read; they were "
                             "moved aside as corrupt-*. Run again to start from scratch.")
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"corrupt-{step}-{int(time.time())}"
        log.warning("!" * 80 + "\nCHECKPOINT AT STEP %d IS UNREADABLE (%s: %s).\nMoved it to %s and "
                    "falling back to the previous checkpoint.\n" + "!" * 80, step, type(error).__name__,
                    str(error)[:500], dst)
        if jax.process_index() == 0 and src.exists():  # one process moves it; the others wait
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"gemma_qat.quarantine.{step}")
        # The manager caches its step list; re-read it so the bad step is neither restored again nor
        # in the way when training reaches that step once more.
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self.manager.close()
