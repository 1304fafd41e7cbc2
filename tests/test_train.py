"""End-to-end distillation on tiny-e2b (CPU): the loss goes down, metrics land in JSONL and
TensorBoard, a custom quant policy is really used, and bad runs fail with one clear error."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat.model.checkpoint import save_model
from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.train import metrics as metrics_lib
from gemma_qat.train.loop import train
from gemma_qat.train.tensorboard import read_scalars
from train_helpers import TOTAL_STEPS, base_config

ONE_DEVICE = jax.devices()[:1]
METRIC_KEYS = {"step", "loss", "kl", "ce", "top1_agree", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    lines = []
    result = train(base_config(run_dir), devices=ONE_DEVICE, print_fn=lines.append)
    return result, lines


def test_distillation_loss_decreases(run):
    result, _ = run
    losses = [result.losses[s] for s in range(1, TOTAL_STEPS + 1)]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, f"loss did not fall enough: {losses}"
    assert int(result.state.step) == TOTAL_STEPS and not result.stopped_early


def test_jsonl_tensorboard_and_console(run):
    result, lines = run
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    assert METRIC_KEYS <= set(records[-1]), sorted(METRIC_KEYS - set(records[-1]))
    assert records[-1]["loss"] == pytest.approx(result.losses[TOTAL_STEPS])
    assert 0 < records[-1]["mfu"] < 1  # peak set to 1e12 FLOP/s per device in the base config
    (event_file,) = (result.run_dir / "tensorboard").glob("events.out.tfevents.*")
    scalars = read_scalars(event_file)
    loss_steps = [s for s, tag, _ in scalars if tag == "train/loss"]
    assert loss_steps == list(range(1, TOTAL_STEPS + 1))
    assert {"train/kl", "train/grad_norm", "train/lr", "train/tokens_per_s"} <= {t for _, t, _ in scalars}
    assert lines[-1].startswith(f"step {TOTAL_STEPS}/{TOTAL_STEPS} | loss") and "ETA" in lines[-1]
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["optimizer"]["total_steps"] == TOTAL_STEPS and saved["mesh"]["parallelism"] == "fsdp"


class RoundWeights:
    """A trivial policy: every weight on a 1/16 grid (straight-through gradient). Hashable, so runs
    with it can share a compiled step like registry policies do."""

    calls = 0

    def weight(self, module, name, w, *, in_axes):
        RoundWeights.calls += 1
        return w + jax.lax.stop_gradient(jnp.round(w * 16) / 16 - w)

    def activation(self, module, name, x, *, site):
        return x


def test_injected_quant_policy_is_used(tmp_path):
    # No init noise: with NoQuant the student would equal the teacher (KL 0); rounding makes it differ.
    cfg = base_config(tmp_path, "model.init_noise=0.0", "optimizer.total_steps=2", "checkpoint.every_steps=100")
    result = train(cfg, devices=ONE_DEVICE, quant_policy=RoundWeights(), print_fn=lambda s: None)
    assert RoundWeights.calls > 0
    assert result.losses[1] > 1e-3


def test_flops_per_token_counts_student_backward_and_teacher_forward():
    cfg = get_config("tiny-e2b")
    n = metrics_lib.matmul_params(cfg)
    attn = metrics_lib.attention_flops_per_token(cfg, 32)
    assert metrics_lib.flops_per_token(cfg, cfg, 32) == 8 * n + 4 * attn
    assert n > cfg.vocab_size * cfg.d_model  # the head plus the blocks


# --- one clear error per bad run ------------------------------------------------------------------
def test_mesh_that_does_not_fit_the_devices(tmp_path):
    with pytest.raises(ValueError, match=r"\[mesh\] does not fit the devices: .*has 3 devices but 8"):
        train(base_config(tmp_path, "mesh.fsdp=3"))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
def test_q4_0_mesh_that_splits_blocks_is_refused(tmp_path):
    # tiny-e2b has d_model 64: fsdp=4 leaves 16 of a 32-wide Q4_0 block per device.
    with pytest.raises(ValueError, match="split Q4_0 blocks"):
        train(base_config(tmp_path, "quant.recipe=q4_0", "mesh.fsdp=4"), devices=jax.devices()[:4])


def test_batch_not_divisible_by_batch_shards(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=12 must be a multiple of the 8 batch shards"):
        train(base_config(tmp_path, "mesh.fsdp=8", "data.global_batch_size=12"))


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.spec .*No data files match"):
        train(base_config(tmp_path, f"data.spec=jsonl:{tmp_path}/nope.jsonl"), devices=ONE_DEVICE)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer .*does not exist"):
        train(base_config(tmp_path, f"data.tokenizer={tmp_path}/nope.model"), devices=ONE_DEVICE)


def test_teacher_with_another_vocab(tmp_path):
    other = dataclasses.replace(get_config("tiny-e2b"), vocab_size=1024)
    save_model(tmp_path / "teacher", init_params(other, jax.random.PRNGKey(0)), other)
    with pytest.raises(ValueError, match="teacher .* has vocab_size 1024 but the student 'tiny-e2b' has 512"):
        train(base_config(tmp_path, f"teacher.checkpoint={tmp_path}/teacher"), devices=ONE_DEVICE)


def test_q4_0_qat_run_writes_an_exportable_student(tmp_path):
    """quant.recipe=q4_0 trains the fake-quant student from the teacher's own weights: on a fixed
    held-out batch its KL to the teacher falls, and <run_dir>/model records the recipe that export
    reads back."""
    from gemma_qat.model.checkpoint import load_model
    from gemma_qat.loss.distill import chunked_distill_loss
    from gemma_qat.export.common import load_student
    from gemma_qat.model.transformer import Transformer
    from gemma_qat.train.policy import recipe_policy

    cfg = base_config(tmp_path, "model.init_noise=0.0", "quant.recipe=q4_0", "optimizer.total_steps=16",
                      "optimizer.lr=1e-4", "checkpoint.every_steps=100")
    result = train(cfg, devices=ONE_DEVICE, print_fn=lambda s: None)
    config, params, resolution, _ = load_student(tmp_path / "model")
    assert resolution.recipe.name == "q4_0" and config.name == "tiny-e2b"
    _, teacher = load_model(cfg.model.name)

    tokens = jax.random.randint(jax.random.PRNGKey(5), (4, 32), 0, config.vocab_size)
    t_h, t_e = Transformer(config).apply({"params": teacher}, tokens, return_hidden=True)
    student = Transformer(config, quant=recipe_policy("q4_0", config))

    def kl(p):
        s_h, s_e = student.apply({"params": p}, tokens, return_hidden=True)
        return float(chunked_distill_loss(s_h, t_h, s_e, t_e, softcap=config.final_softcap)[0])

    assert kl(teacher) > 0  # Q4_0 changes the model
    # 16 small steps: a modest but deterministic drop (about 7% on this set-up).
    assert kl(params) < 0.97 * kl(teacher), (kl(teacher), kl(params))


def test_mobile_run_calibrates_and_carries_static_activation_scales(tmp_path):
    """The mobile recipe's int8 activation scales are calibrated on the initial student, frozen for
    the run (kept in the run dir for resume) and shipped with the final model for export."""
    from gemma_qat.export.common import load_student
    from gemma_qat.model.transformer import Transformer
    from gemma_qat.quant.policy import RecipePolicy

    cfg = base_config(tmp_path, "quant.recipe=mobile", "optimizer.total_steps=3", "optimizer.lr=1e-4",
                      "checkpoint.every_steps=100")
    train(cfg, devices=ONE_DEVICE, print_fn=lambda s: None)
    assert (tmp_path / "quant_scales.json").is_file()
    config, params, resolution, scales = load_student(tmp_path / "model")
    leaves = jax.tree.leaves(scales)
    assert leaves and all(float(s) > 0 for s in leaves)
    tokens = jnp.arange(24)[None] % config.vocab_size
    with_scales = Transformer(config, quant=RecipePolicy(resolution, static_scales=scales))
    weights_only = Transformer(config, quant=RecipePolicy(resolution))
    a = with_scales.apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(weights_only.apply(
        {"params": params, "quant_scales": scales}, tokens)))  # policy-carried == collection-carried
    assert float(jnp.abs(a - weights_only.apply({"params": params}, tokens)).max()) > 0


def test_pure_cross_entropy_step_skips_the_teacher():
    """α = 1 at every step: the KL term weighs 0, so the step runs no teacher forward (it never reads the
    teacher's params) and gives the α = 1 distillation step's loss and update."""
    from gemma_qat.loss.distill import DistillSchedule
    from gemma_qat.model.transformer import Transformer
    from gemma_qat.train.config import OptimizerSection
    from gemma_qat.train.optimizer import lr_schedule, make_optimizer
    from gemma_qat.train.state import TrainState
    from gemma_qat.train.step import make_step_fn

    cfg = get_config("tiny-e2b")
    params = init_params(cfg, jax.random.PRNGKey(0))
    o = OptimizerSection(lr=1e-3, warmup_steps=1, total_steps=4)
    tx = make_optimizer(o)
    model = Transformer(cfg)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 32), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((2, 32), jnp.int32),
             "segment_ids": jnp.ones((2, 32), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(32), (2, 32))}
    kw = dict(grad_accum_steps=1, chunk_size=16, loss_impl="xla")
    full = make_step_fn(model, model, tx, DistillSchedule(1.0, 1.0), lr_schedule(o), **kw)
    lean = make_step_fn(model, model, tx, DistillSchedule(1.0, 1.0), lr_schedule(o), ce_only=True, **kw)
    other = init_params(cfg, jax.random.PRNGKey(5))  # a teacher unlike the student: its KL is not 0
    s_full, m_full = jax.jit(full)(state, other, batch)
    s_lean, m_lean = jax.jit(lean)(state, None, batch)  # no teacher params at all
    np.testing.assert_allclose(m_lean["loss"], m_full["loss"], rtol=1e-6)
    assert float(m_lean["kl"]) == 0.0 and float(m_full["kl"]) > 0  # the full step did compute a KL
    for a, b in zip(jax.tree.leaves(s_lean.params), jax.tree.leaves(s_full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
