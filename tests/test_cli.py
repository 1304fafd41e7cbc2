"""The `gemma-qat` command line on real inputs: info, import-hf, logits and their errors."""

import json

import numpy as np
import pytest

from gemma_qat.cli import main
from hf_fixtures import hf_logits, save_text_model


@pytest.mark.parametrize("name,total", [("31b", 30_697_345_280), ("26b-a4b", 25_233_141_760)])
def test_info_json(capsys, name, total):
    assert main(["info", "--model", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == total
    for key in ("embedding_params", "per_layer_embedding_params"):
        assert key in info
    assert ("active_params" in info) == (name == "26b-a4b")


def test_import_hf_then_logits_matches_transformers(tmp_path, capsys):
    model = save_text_model("e", tmp_path / "hf", seed=5)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    tokens = [2, 451, 17, 300, 5, 9, 100, 101, 102, 7, 8, 11, 12, 13]
    out = tmp_path / "logits.npy"
    assert main(["logits", "--checkpoint", str(tmp_path / "ck"), "--tokens", ",".join(map(str, tokens)),
                 "--out", str(out)]) == 0
    ours = np.load(out)
    ref = hf_logits(model, [tokens])[0].numpy()
    assert ours.dtype == np.float32 and ours.shape == (len(tokens), 512)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def test_import_never_clobbers_or_half_writes(tmp_path, capsys):
    save_text_model("dense", tmp_path / "hf")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("previous output")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ck" / "keep.txt").read_text() == "previous output"
    # A failing import leaves neither the output nor temporary folders behind.
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "new")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new.tmp")]


def test_logits_errors(tmp_path, capsys):
    assert main(["logits", "--checkpoint", str(tmp_path), "--tokens", "1,2"]) == 2
    assert "model_config.json is missing" in capsys.readouterr().err
    save_text_model("dense", tmp_path / "hf")
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck")])
    assert main(["logits", "--checkpoint", str(tmp_path / "ck"), "--tokens", "1,99999"]) == 2
    assert "outside the model vocabulary" in capsys.readouterr().err


def test_quantize_writes_the_ptq_baseline(tmp_path, capsys):
    import jax

    from gemma_qat.model.checkpoint import load_model, read_meta
    from gemma_qat.quant.formats import q4_0_fake_quant

    save_text_model("dense", tmp_path / "hf")
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck")])
    assert main(["quantize", "--checkpoint", str(tmp_path / "ck"), "--recipe", "q4_0",
                 "--out", str(tmp_path / "ptq")]) == 0
    _, fp = load_model(tmp_path / "ck")
    _, q = load_model(tmp_path / "ptq")
    assert read_meta(tmp_path / "ptq").recipe["name"] == "q4_0"
    w = fp["layer_0"]["mlp"]["linear"]["w"]  # [F, D], contraction over F (axis 0)
    np.testing.assert_array_equal(np.asarray(q["layer_0"]["mlp"]["linear"]["w"]),
                                  np.asarray(q4_0_fake_quant(w, in_axis=0)))
    np.testing.assert_array_equal(np.asarray(q["final_norm"]["scale"]), np.asarray(fp["final_norm"]["scale"]))
    assert main(["quantize", "--checkpoint", str(tmp_path / "ck"), "--recipe", "mobile",
                 "--out", str(tmp_path / "m")]) == 2
    assert "E-type" in capsys.readouterr().err
