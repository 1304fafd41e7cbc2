"""Divergence guards of the training loop: no non-finite state is ever checkpointed, and a loss that
explodes while staying finite is reported (or stops the run) instead of training on silently.

    step k ─► metrics (read one step late) ─► check_step: loss / grad_norm finite? spike?
    save due at k ─► metrics of k read now ─► params finite? ─► only then the checkpoint

A divergence raises `Diverged`, whose text is the one-screen report the CLI prints (the step, the
metric, the last good checkpoint and what to change); the last good checkpoint stays the latest, so
re-running the same command resumes from it.
"""

from __future__ import annotations

import collections
import math
import statistics

import jax
import jax.numpy as jnp

# Metrics that must be finite every step; the others (kl, ce, ...) are parts of the loss.
CHECKED = ("loss", "grad_norm")


class Diverged(RuntimeError):
    """The run stopped on a non-finite metric or state, or a loss spike with `guard.on_spike = "stop"`."""

    def __init__(self, step: int, what: str, value: float | None, last_good: int | None, hint: str):
        self.step, self.what, self.value, self.last_good = step, what, value, last_good
        lines = [f"training diverged at step {step}: {what}" + ("" if value is None else f" = {value:g}")]
        if last_good is None:
            lines.append("no checkpoint was written; re-running starts from step 0")
        else:
            lines.append(f"the latest checkpoint is step {last_good} (written before the divergence); re-running "
                         "the same command resumes from it")
        lines.append(f"fix: {hint}")
        super().__init__("\n".join(lines))


_HINT = ("lower optimizer.lr (or raise optimizer.warmup_steps), keep optimizer.grad_clip > 0, and check the data "
         "of that step; nothing after the last good checkpoint was saved")


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


_all_finite_jit = jax.jit(_all_finite)


class Guard:
    """Per-run state of the checks; `last_good` is the newest step known to be checkpointed clean."""

    def __init__(self, cfg, last_good: int | None, warn):
        self.factor, self.steps, self.window = cfg.spike_factor, cfg.spike_steps, cfg.spike_window
        self.stop_on_spike = cfg.on_spike == "stop"
        self.last_good = last_good
        self._warn = warn
        self._history: collections.deque = collections.deque(maxlen=self.window)
        self._over = 0  # consecutive steps above factor × median
        self._warned = False

    def check_step(self, step: int, metrics: dict) -> None:
        """Raises Diverged on a non-finite checked metric; warns (or raises) on a sustained spike."""
        for name in CHECKED:
            if name in metrics and not math.isfinite(metrics[name]):
                raise Diverged(step, f"{name} is not finite", metrics[name], self.last_good, _HINT)
        loss = metrics.get("loss")
        if loss is None or self.factor <= 0:
            return
        if len(self._history) >= max(2 * self.steps, 10):
            median = statistics.median(self._history)
            if median > 0 and loss > self.factor * median:
                self._over += 1
                if self._over >= self.steps:
                    what = (f"loss above {self.factor:g}× its running median ({median:.4g}, last "
                            f"{len(self._history)} steps) for {self._over} steps")
                    if self.stop_on_spike:
                        raise Diverged(step, what, loss, self.last_good,
                                       _HINT + "; or set guard.on_spike = \"warn\" to train on")
                    if not self._warned:
                        self._warn(f"warning: step {step}: {what}, loss {loss:.4g}. The run continues "
                                   "(guard.on_spike = \"stop\" would stop it); " + _HINT.split(";")[0])
                        self._warned = True
                return  # a spike does not enter the median it is judged against
            self._over, self._warned = 0, False
        self._history.append(loss)

    def check_state(self, step: int, state) -> None:
        """Before a checkpoint: every floating leaf of the parameters is finite."""
        if not bool(jax.device_get(_all_finite_jit(state.params))):
            raise Diverged(step, "the parameters are not finite", None, self.last_good, _HINT)

    def saved(self, step: int) -> None:
        self.last_good = step
