"""meta.json of a model checkpoint: one typed, versioned record (checkpoint.CheckpointMeta), one writer,
one reader; files written before it had a version read as version 0 with the same meaning."""

import dataclasses
import json

import pytest

from gemma_qat.model.checkpoint import META_VERSION, CheckpointMeta, read_meta, write_meta

# What the training loop wrote into <run_dir>/model/meta.json before the record was versioned.
OLD_QAT = {"kind": "qat", "step": 20, "param_dtype": "bfloat16", "tokenizer": "/t/sp.model",
           "run_config": {"mesh": {"fsdp": 8, "recipe": "fsdp_tp"}, "quant": {"backend": "aqt"}},
           "recipe": {"name": "q4_0", "activations": "none", "rules": []}}


def test_written_meta_is_versioned_and_reads_back(tmp_path):
    meta = CheckpointMeta(kind="ptq", param_dtype="bfloat16", recipe={"name": "q4_0"}, source="/ck/teacher")
    write_meta(tmp_path, meta)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == {"version": META_VERSION, "kind": "ptq", "param_dtype": "bfloat16",
                       "recipe": {"name": "q4_0"}, "source": "/ck/teacher"}
    assert read_meta(tmp_path) == meta


def test_unversioned_meta_reads_as_version_0_with_the_same_meaning(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({**OLD_QAT, "note": "hand-added"}))
    meta = read_meta(tmp_path)
    assert meta.version == 0 and meta.kind == "qat" and meta.step == 20 and meta.param_dtype == "bfloat16"
    assert meta.tokenizer == "/t/sp.model" and meta.recipe == OLD_QAT["recipe"]
    assert meta.run_config == OLD_QAT["run_config"]  # as saved; train.config.from_dict upgrades its keys
    assert meta.extra == {"note": "hand-added"}
    # Rewritten (e.g. `gemma-qat quantize` copying a teacher's meta) it is the current version, nothing lost.
    (tmp_path / "copy").mkdir()
    write_meta(tmp_path / "copy", dataclasses.replace(meta, kind="ptq"))
    again = json.loads((tmp_path / "copy" / "meta.json").read_text())
    assert again == {**OLD_QAT, "note": "hand-added", "kind": "ptq", "version": META_VERSION}


def test_no_meta_file_is_the_old_empty_meta(tmp_path):
    assert read_meta(tmp_path) == CheckpointMeta(version=0)
    assert read_meta(tmp_path).param_dtype == "float32"  # what load_model assumed for {} before


def test_future_and_broken_versions_name_the_file(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"version": META_VERSION + 1, "kind": "qat"}))
    with pytest.raises(ValueError, match=rf"{tmp_path}/meta.json has metadata version {META_VERSION + 1}; "
                                         rf"this gemma-qat reads versions up to {META_VERSION}"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"version": "one"}))
    with pytest.raises(ValueError, match=r"meta.json is corrupt: version 'one'"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"step": "20"}))
    with pytest.raises(ValueError, match=r"meta.json is corrupt: step = '20' is not of type int"):
        read_meta(tmp_path)
