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
