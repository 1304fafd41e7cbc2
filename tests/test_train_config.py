"""Run config: TOML + dotted overrides into typed frozen dataclasses, one clear error per mistake;
the quant-policy registry; multi-host environment detection."""

import json
from pathlib import Path

import pytest

from gemma_qat.model.config import get_config
from gemma_qat.model.layers import NoQuant
from gemma_qat.train import distributed, policy
from gemma_qat.train.config import RunConfig, from_dict, load_run_config

REPO = Path(__file__).resolve().parents[1]


def _toml(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = _toml(tmp_path, '[optimizer]\nlr = 1\ntotal_steps = 50\n[mesh]\nfsdp = 2\nparallelism = "fsdp_tp"\n')
    cfg = load_run_config(path, ["optimizer.total_steps=70", "logging.tensorboard=false", "distill.alpha_end=none"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)  # int literal is a fine float
    assert cfg.optimizer.total_steps == 70 and cfg.mesh.fsdp == 2 and cfg.mesh.parallelism == "fsdp_tp"
    assert cfg.logging.tensorboard is False and cfg.distill.alpha_end is None
    assert cfg.optimizer.b1 == RunConfig().optimizer.b1  # untouched keys keep their defaults


def test_to_dict_round_trips_through_json(tmp_path):
    cfg = load_run_config(None, ["optimizer.lr=3e-4", "distill.temperature_end=2.0", "mesh.expert=2"])
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_run_config(tmp_path / "config.json") == cfg  # a saved run config loads as a config file


def test_unknown_key_names_the_dotted_key_and_the_known_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer.learning_rate'; known keys at "
                                         r"\[optimizer\]: lr, warmup_steps"):
        load_run_config(None, ["optimizer.learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"unknown config key 'optimiser'; known keys at the top level: run_dir"):
        load_run_config(_toml(tmp_path, "[optimiser]\nlr = 1.0\n"))
    with pytest.raises(ValueError, match=r"unknown config key 'mesh.pipeline'"):
        load_run_config(_toml(tmp_path, "[mesh]\npipeline = 2\n"))


def test_wrong_type_names_key_type_and_value(tmp_path):
    with pytest.raises(ValueError, match=r"config key optimizer.total_steps expects int, got 'ten'"):
        load_run_config(None, ["optimizer.total_steps=ten"])
    with pytest.raises(ValueError, match=r"config key data.seq_len expects int, got 64.5 \(float\)"):
        load_run_config(_toml(tmp_path, "[data]\nseq_len = 64.5\n"))
    with pytest.raises(ValueError, match=r"config key logging.tensorboard expects bool, got 'maybe'"):
        load_run_config(None, ["logging.tensorboard=maybe"])
    with pytest.raises(ValueError, match=r"config key optimizer.lr expects float, got True \(bool\)"):
        load_run_config(_toml(tmp_path, "[optimizer]\nlr = true\n"))
    with pytest.raises(ValueError, match=r"'optimizer' is a table"):
        load_run_config(None, ["optimizer=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_run_config(None, ["optimizer.lr"])


def test_value_checks_collect_every_problem():
    with pytest.raises(ValueError) as e:
        load_run_config(None, ["optimizer.compute_dtype=fp8", "remat=some", "distill.alpha=1.5",
                               "optimizer.warmup_steps=2000", "quant.q4_0_impl=triton", "distill.loss_impl=cuda"])
    msg = str(e.value)
    for part in ("optimizer.compute_dtype='fp8' must be one of", "remat='some'", "distill.alpha=1.5 must be in [0, 1]",
                 "warmup_steps=2000 exceeds optimizer.total_steps=1000", "quant.q4_0_impl='triton' must be one of",
                 "distill.loss_impl='cuda' must be one of"):
        assert part in msg
    with pytest.raises(ValueError, match=r"mesh.parallelism='zero3' must be one of \['fsdp', 'fsdp_tp', 'fsdp_tp_ep'\]"):
        load_run_config(None, ["mesh.parallelism=zero3"])
    with pytest.raises(ValueError, match="data.tokenizer is required"):
        load_run_config(None, ["data.spec=jsonl:/x.jsonl"])


def test_old_mesh_recipe_key_is_one_error_naming_the_new_key(tmp_path):
    msg = r"config key 'mesh.recipe' was renamed 'mesh.parallelism'; set mesh.parallelism instead"
    with pytest.raises(ValueError, match=msg):
        load_run_config(_toml(tmp_path, '[mesh]\nrecipe = "fsdp_tp"\n'))
    with pytest.raises(ValueError, match=msg):
        load_run_config(None, ["mesh.recipe=fsdp_tp"])


def test_saved_run_config_with_the_old_mesh_key_still_loads(tmp_path):
    """config.json beside a run (and the copy in each checkpoint) of a run saved before the rename."""
    cfg = load_run_config(None, ["mesh.parallelism=fsdp_tp", "mesh.tensor=2"])
    old = cfg.to_dict()
    old["mesh"]["recipe"] = old["mesh"].pop("parallelism")
    assert from_dict(old) == cfg
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_run_config(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("command", ["train", "preflight"])
@pytest.mark.parametrize("where", ["override", "toml"])
def test_cli_old_mesh_recipe_is_one_line_naming_the_new_key(capsys, tmp_path, command, where):
    from gemma_qat import cli
    config = _toml(tmp_path, f'run_dir = "{tmp_path}/run"\n' + ('[mesh]\nrecipe = "fsdp"\n' if where == "toml" else ""))
    args = [command, "--config", str(config), *(["mesh.recipe=fsdp"] if where == "override" else [])]
    rc = cli.main(args + (["--topology", "8xH100", "--no-lower"] if command == "preflight" else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "'mesh.recipe' was renamed 'mesh.parallelism'" in err, err
    assert not (tmp_path / "run").exists()


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_run_config(_toml(tmp_path, "[optimizer\nlr = 1\n"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")


def test_shipped_tiny_config_loads():
    cfg = load_run_config(REPO / "configs" / "tiny.toml")
    assert cfg.model.name == "tiny-e2b" and cfg.data.seq_len == 64 and cfg.data.global_batch_size == 8


# --- quant policy registry --------------------------------------------------------------------
def test_policy_registry():
    cfg = get_config("tiny-e2b")
    assert isinstance(policy.resolve_policy("none", cfg), NoQuant)
    assert policy.resolve_policy("none", cfg) is policy.resolve_policy("none", cfg)  # one compiled step

    class Marker(NoQuant):
        pass

    policy.register_policy("test-marker", lambda c: Marker())
    assert isinstance(policy.resolve_policy("test-marker", cfg), Marker)


# --- multi-host detection ---------------------------------------------------------------------
def test_distributed_detection_is_explicit():
    assert distributed.detect({}) == ("single", {})
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})[0] == "single"
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == ("slurm", {})
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}) == ("tpu", {})
    mode, kw = distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": "1", "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert mode == "explicit" and kw == dict(coordinator_address="h:1234", num_processes=2, process_id=1,
                                             local_device_ids=[0, 1])
    with pytest.raises(ValueError, match=r"incomplete.*'JAX_PROCESS_ID'"):
        distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2"})
    assert distributed.initialize({}) == "single"  # no jax.distributed call for a single host


def test_cli_train_reports_config_errors_in_one_line(capsys):
    from gemma_qat import cli
    rc = cli.main(["train", "--config", str(REPO / "configs" / "tiny.toml"), "optimizer.lr=fast"])
    assert rc == 2
    assert "gemma-qat train: error: config key optimizer.lr expects float, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("override,shown", [("optimizer.lr=nan", "nan"), ("optimizer.lr=inf", "inf"),
                                            ("distill.temperature=-inf", "-inf")])
def test_cli_train_rejects_non_finite_floats_in_one_line(capsys, tmp_path, override, shown):
    from gemma_qat import cli
    key = override.split("=")[0]
    rc = cli.main(["train", "--config", str(REPO / "configs" / "tiny.toml"), f"run_dir={tmp_path}/run", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"{key}={shown} must be a finite number" in err, err
    assert not (tmp_path / "run").exists()  # rejected before anything is written


# --- every name is checked when the config loads -----------------------------------------------
@pytest.mark.parametrize("command", ["train", "preflight"])
@pytest.mark.parametrize("override,choices", [
    ("quant.recipe=q4_O", "'q4_0', 'mobile', 'mobile-e2b', 'mobile-e4b']"),  # after 'none' and registered names
    ("quant.q4_0_impl=triton", "['auto', 'xla', 'pallas']"),
    ("quant.backend=torchao", "['auto', 'formats', 'aqt']"),
    ("distill.loss_impl=cuda", "['auto', 'xla', 'pallas']"),
    ("attention=flash", "['xla', 'cudnn', 'splash', 'auto']"),
    ("grouped=dense", "['ragged', 'blocked', 'kernel', 'auto']"),
    ("remat=some", "['none', 'full', 'dots', 'weights']"),
    ("mesh.parallelism=zero3", "['fsdp', 'fsdp_tp', 'fsdp_tp_ep']"),
])
def test_cli_unknown_name_is_one_line_with_key_value_and_choices(capsys, tmp_path, command, override, choices):
    """Raised by config loading, so neither command reads data, a tokenizer or a model first."""
    from gemma_qat import cli
    key, value = override.split("=")
    args = [command, "--config", str(REPO / "configs" / "tiny.toml"), f"run_dir={tmp_path}/run", override]
    rc = cli.main(args + (["--topology", "8xH100"] if command == "preflight" else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"{key}={value!r} must be one of [" in err and choices in err, err
    assert not (tmp_path / "run").exists()


def test_quant_recipe_accepts_presets_in_any_case_and_registered_names():
    assert load_run_config(None, ["quant.recipe=Q4_0"]).quant.recipe == "Q4_0"  # get_recipe lowercases
    policy.register_policy("test-registered", lambda c: NoQuant())
    assert load_run_config(None, ["quant.recipe=test-registered"]).quant.recipe == "test-registered"
