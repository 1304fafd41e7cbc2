"""The shipped presets (configs/*.toml) resolve to exactly the run configs pinned in
tests/data/preset_configs.json, dumped from the presets as they were before they shared a base: a
refactor of the files must not move a single value."""

import json
from pathlib import Path

import pytest

from gemma_qat.train.config import from_dict, load_run_config

REPO = Path(__file__).resolve().parents[1]
PINNED = json.loads((REPO / "tests" / "data" / "preset_configs.json").read_text())


def test_every_preset_is_pinned():
    assert sorted(p.stem for p in (REPO / "configs").glob("[!_]*.toml")) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_preset_resolves_to_pinned_config(name):
    cfg = load_run_config(REPO / "configs" / f"{name}.toml")
    # JSON text, not dict equality: 1 == 1.0 would hide an int that became a float.
    assert json.dumps(cfg.to_dict(), sort_keys=True) == json.dumps(PINNED[name], sort_keys=True)
    assert cfg == from_dict(PINNED[name])


@pytest.mark.parametrize("command", ["train", "preflight"])
@pytest.mark.parametrize("name", sorted(PINNED))
def test_print_config_is_the_whole_config_and_loads_back(tmp_path, capsys, command, name):
    from gemma_qat import cli
    from gemma_qat.preflight.topologies import from_config_comment
    preset = REPO / "configs" / f"{name}.toml"
    overrides = ["distill.alpha_end=0.5", "data.spec=text:/a b/\"q\"/*.txt", "data.tokenizer=/t/ünï.model"]
    assert cli.main([command, "--config", str(preset), "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "base =" not in printed  # self-contained: no include left to resolve
    (tmp_path / "full.toml").write_text(printed)
    assert load_run_config(tmp_path / "full.toml") == load_run_config(preset, overrides)
    assert from_config_comment(printed) == from_config_comment(preset.read_text())  # preflight still finds it


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_layers_key_by_key_relative_to_each_file(tmp_path):
    _write(tmp_path / "shared" / "root.toml", '[optimizer]\nlr = 1.0\ntotal_steps = 50\n[data]\nseq_len = 32\n')
    _write(tmp_path / "shared" / "mid.toml", 'base = "root.toml"\n[optimizer]\ntotal_steps = 60\n')
    run = _write(tmp_path / "run.toml", 'base = "shared/mid.toml"\nrun_dir = "r"\n[optimizer]\nwarmup_steps = 5\n')
    cfg = load_run_config(run, ["optimizer.total_steps=70"])
    assert (cfg.optimizer.lr, cfg.optimizer.total_steps, cfg.optimizer.warmup_steps) == (1.0, 70, 5)
    assert (cfg.data.seq_len, cfg.run_dir) == (32, "r")
    assert "base" not in cfg.to_dict()  # what checkpoints save is the resolved config


def test_base_errors_name_the_files(tmp_path):
    missing = _write(tmp_path / "a.toml", 'base = "nope.toml"\n')
    with pytest.raises(FileNotFoundError, match=r"nope.toml \(the base of .*a.toml\) does not exist"):
        load_run_config(missing)
    _write(tmp_path / "b.toml", 'base = "c.toml"\n')
    _write(tmp_path / "c.toml", 'base = "b.toml"\n')
    with pytest.raises(ValueError, match=r"chain is a cycle: .*b.toml → .*c.toml → .*b.toml"):
        load_run_config(tmp_path / "b.toml")
    with pytest.raises(ValueError, match=r"`base` must be a file name"):
        load_run_config(_write(tmp_path / "d.toml", "base = 3\n"))
    with pytest.raises(ValueError, match=r"unknown config key 'base'"):  # only a file has a base
        load_run_config(None, ["base=x.toml"])


def test_cli_reports_a_missing_base_in_one_line(tmp_path, capsys):
    from gemma_qat import cli
    rc = cli.main(["train", "--config", str(_write(tmp_path / "a.toml", 'base = "gone.toml"\n')), "--print-config"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "gone.toml (the base of" in err, err
