"""Preemption and resume: a run killed by SIGTERM and resumed gives the uninterrupted run's losses
exactly (state, rng and data position all restored); a damaged newest checkpoint is skipped loudly."""

import logging
import os
import signal

import jax
import numpy as np
import pytest

from gemma_qat.train.loop import train
from train_helpers import TOTAL_STEPS, base_config

ONE_DEVICE = jax.devices()[:1]
QUIET = dict(devices=ONE_DEVICE, print_fn=lambda s: None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Checkpoints at 5, 10, 15, 20 and the loss of every step."""
    return train(base_config(tmp_path_factory.mktemp("full")), **QUIET)


def test_sigterm_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    def sigterm_at_7(step, metrics):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler path, not a flag poke

    before = signal.getsignal(signal.SIGTERM)
    first = train(base_config(tmp_path), on_step=sigterm_at_7, **QUIET)
    assert signal.getsignal(signal.SIGTERM) is before  # handler uninstalled after the run
    assert first.stopped_early
    stopped_at = max(first.losses)
    assert 7 <= stopped_at < TOTAL_STEPS and stopped_at % 5  # saved at the stop, not on the schedule
    assert int(first.state.step) == stopped_at

    second = train(base_config(tmp_path), **QUIET)
    assert second.resumed_from == stopped_at and not second.stopped_early
    assert sorted(second.losses) == list(range(stopped_at + 1, TOTAL_STEPS + 1))
    resumed = {**first.losses, **second.losses}
    np.testing.assert_array_equal([resumed[s] for s in range(1, TOTAL_STEPS + 1)],
                                  [uninterrupted.losses[s] for s in range(1, TOTAL_STEPS + 1)])
    # The metrics log holds each step once, even though the two runs overlap on disk.
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in (tmp_path / "metrics.jsonl").open()]
    assert steps == list(range(1, TOTAL_STEPS + 1))


# Orbax leaves un-awaited read coroutines behind when a damaged checkpoint fails to restore.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoints_fall_back_with_a_warning(uninterrupted, tmp_path, caplog):
    ckpt = uninterrupted.run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [5, 10, 15, 20]
    # Step 20: a truncated array file. Step 15: the data-iterator file is missing.
    biggest = max((p for p in (ckpt / "20" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    (ckpt / "15" / "data" / "process_0-of-1.json").unlink()

    with caplog.at_level(logging.WARNING, logger="gemma_qat.train.checkpointing"):
        again = train(base_config(uninterrupted.run_dir), **QUIET)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("STEP 20 IS UNREADABLE" in w for w in warnings), warnings
    assert any("STEP 15 IS UNREADABLE" in w for w in warnings), warnings
    assert again.resumed_from == 10
    for s in range(11, TOTAL_STEPS + 1):
        assert again.losses[s] == uninterrupted.losses[s]
    # The damaged folders are kept aside for inspection, and training wrote fresh ones.
    assert len(list(ckpt.glob("corrupt-20-*"))) == 1 and len(list(ckpt.glob("corrupt-15-*"))) == 1
    assert (ckpt / "20" / "state").is_dir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_changed_bytes_in_a_checkpoint_are_caught_by_its_checksums(uninterrupted, tmp_path, caplog):
    """Same length, different bytes: Orbax's own reads accepted these (a resume that died with NaN at
    every restart, or one flipped bit that finished with a different model). checksums.json catches them."""
    import shutil
    src = uninterrupted.run_dir / "checkpoints"
    ckpt = tmp_path / "checkpoints"
    for step in (10, 15, 20):
        shutil.copytree(src / str(step), ckpt / str(step))
        assert (ckpt / str(step) / "checksums.json").is_file()
    arrays = lambda step: max((p for p in (ckpt / str(step) / "state").rglob("*") if p.is_file()),  # noqa: E731
                              key=lambda p: p.stat().st_size)
    big = arrays(20)
    raw = bytearray(big.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 256] = bytes(255 - b for b in raw[mid:mid + 256])  # 256 bytes overwritten in the middle
    big.write_bytes(bytes(raw))
    one = arrays(15)
    raw = bytearray(one.read_bytes())
    raw[len(raw) // 3] ^= 0x04  # one bit
    one.write_bytes(bytes(raw))

    with caplog.at_level(logging.WARNING, logger="gemma_qat.train.checkpointing"):
        again = train(base_config(tmp_path), **QUIET)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for step, path in ((20, big), (15, one)):
        assert any(f"STEP {step} IS UNREADABLE" in w and "does not match its checksum" in w for w in warnings), warnings
    assert again.resumed_from == 10
    for s in range(11, TOTAL_STEPS + 1):
        assert again.losses[s] == uninterrupted.losses[s]
    assert len(list(ckpt.glob("corrupt-20-*"))) == 1 and len(list(ckpt.glob("corrupt-15-*"))) == 1


def test_checkpoints_of_another_model_are_an_error_not_corruption(uninterrupted, tmp_path):
    import shutil
    shutil.copytree(uninterrupted.run_dir / "checkpoints" / "5", tmp_path / "checkpoints" / "5")
    cfg = base_config(tmp_path, "model.name=tiny-31b", "model.init_noise=0.0")
    with pytest.raises(ValueError, match=r"written by a different run \(model.name: checkpoint '.*ckpt' vs config "
                                         r"'tiny-31b'\)"):
        train(cfg, **QUIET)
    assert (tmp_path / "checkpoints" / "5").is_dir()  # left where it was


def test_a_run_saved_before_mesh_recipe_was_renamed_resumes_bit_exactly(uninterrupted, tmp_path):
    """Runs saved with `mesh.recipe` (now mesh.parallelism) in their config.json and in each
    checkpoint's config still load and resume: the old key is mapped where a saved config is read."""
    import json
    import shutil
    from gemma_qat.train import checksums
    from gemma_qat.train.config import load_run_config

    def to_old_key(path):
        saved = json.loads(path.read_text())
        saved["mesh"]["recipe"] = saved["mesh"].pop("parallelism")
        path.write_text(json.dumps(saved))

    step_dir = tmp_path / "checkpoints" / "10"
    shutil.copytree(uninterrupted.run_dir / "checkpoints" / "10", step_dir)
    saved_configs = [p for p in step_dir.rglob("*") if p.is_file() and b'"parallelism"' in p.read_bytes()]
    assert len(saved_configs) == 1
    to_old_key(saved_configs[0])
    checksums.seal(step_dir)  # as the old run sealed it: these are its bytes, not damage
    shutil.copy(uninterrupted.run_dir / "config.json", tmp_path / "config.json")
    to_old_key(tmp_path / "config.json")

    cfg = load_run_config(tmp_path / "config.json", [f"run_dir={tmp_path}"])
    assert cfg == base_config(tmp_path)
    again = train(cfg, **QUIET)
    assert again.resumed_from == 10
    for s in range(11, TOTAL_STEPS + 1):
        assert again.losses[s] == uninterrupted.losses[s]
