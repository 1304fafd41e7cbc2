"""Truncated, cut and garbage files get one line from `gemma-qat inspect` (and every loader that reads
their headers) naming the file and what is wrong: no traceback, no allocation trusted from a header."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gemma_qat import cli


def _safetensors(path, arrays: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, a in arrays.items():
        a = np.asarray(a, np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.astype("<f4").tobytes())
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _gguf(path) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_tensor("w", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _inspect_fails(path, capsys, *needles: str) -> None:
    before = path.read_bytes()
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err, err
    for needle in needles:
        assert needle in err, err
    assert path.read_bytes() == before  # reading never changes what it reads


def test_inspect_reads_a_good_safetensors_and_gguf(tmp_path, capsys):
    _safetensors(tmp_path / "ok.safetensors", {"a": np.ones((4, 8)), "b": np.zeros(3)})
    assert cli.main(["inspect", str(tmp_path / "ok.safetensors")]) == 0
    _gguf(tmp_path / "ok.gguf")
    assert cli.main(["inspect", str(tmp_path / "ok.gguf")]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("damage,needle", [
    ("garbage", "header length"),            # 8 random bytes read as a length: was a MemoryError
    ("short", "shorter than its 8-byte header length"),
    ("cut_header", "header length"),
    ("cut_data", "truncated: the header describes 140 bytes of tensor data, the file holds"),  # was exit 0
    ("bad_json", "corrupt safetensors header"),
])
def test_damaged_safetensors(tmp_path, capsys, damage, needle):
    p = tmp_path / "m.safetensors"
    _safetensors(p, {"a": np.ones((4, 8)), "b": np.zeros(3)})
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    damaged = {"garbage": bytes(range(200, 256)) * 40, "short": raw[:5], "cut_header": raw[:8 + n // 2],
               "cut_data": raw[:8 + n + 70], "bad_json": raw[:8] + b"{" * n + raw[8 + n:]}[damage]
    p.write_bytes(damaged)
    _inspect_fails(p, capsys, needle)


@pytest.mark.parametrize("damage,needle", [
    ("cut_header", "truncated or corrupt GGUF file"),  # was an IndexError
    ("cut_data", "truncated or corrupt GGUF file"),
    ("garbage", "not a GGUF file"),
])
def test_damaged_gguf(tmp_path, capsys, damage, needle):
    p = tmp_path / "m.gguf"
    _gguf(p)
    raw = p.read_bytes()
    damaged = {"cut_header": raw[:40], "cut_data": raw[:len(raw) - 1000], "garbage": b"\x00\x17" * 500}[damage]
    p.write_bytes(damaged)
    _inspect_fails(p, capsys, needle)


def test_a_jsonl_without_the_text_field_fails_when_the_source_opens(tmp_path):
    """Before, a KeyError after the whole start-up (29 s on tiny); now one line from the CLI, naming the
    file, the field expected and the fields found, before any model is built."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from train_helpers import base_overrides

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(5)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "gemma_qat.cli", "train",
                        *base_overrides(tmp_path / "run", f"data.spec=jsonl:{bad}")],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(line) == 1 and f"data file {bad}, record 1: no 'text' field" in line[0], r.stderr[-2000:]
    assert "['body', 'id']" in line[0]


def test_an_interrupted_folder_write_is_cleaned_or_put_back(tmp_path):
    """A kill inside checkpoint.atomic_dir leaves `.NAME.tmp-*` (removed by the next write) or, between
    the two renames of a replacement, `.NAME.old-*` with no NAME (the previous folder: put back)."""
    from gemma_qat.model.checkpoint import atomic_dir

    out = tmp_path / "model"
    (tmp_path / ".model.tmp-dead").mkdir()
    (tmp_path / ".model.tmp-dead" / "half").write_bytes(b"x" * 100)
    (tmp_path / ".model.old-beef").mkdir()
    (tmp_path / ".model.old-beef" / "params").write_text("previous")
    with pytest.raises(FileExistsError):  # the previous model is back, and not replaced without force
        with atomic_dir(out):
            pass
    assert (out / "params").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / ".model.tmp-dead2").mkdir()
    with atomic_dir(out, force=True) as tmp:
        (tmp / "params").write_text("new")
    assert (out / "params").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    from gemma_qat.train.metrics import _truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    warnings = []
    _truncate_jsonl(path, 2, warn=warnings.append)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert len(warnings) == 1 and str(path) in warnings[0] and "dropped 1 unreadable line" in warnings[0]


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli.main(["train", "--config", "configs/tiny.toml", f"run_dir={blocker}/run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"run_dir {blocker}/run is not writable" in err, err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("text,needle", [("{\"format\": \"gemma-qat-q4_0", "not valid JSON"), ("[1, 2]", "manifest"),
                                         (None, "incomplete export manifest")])
def test_a_damaged_export_manifest_is_one_line(tmp_path, capsys, text, needle):
    from gemma_qat.export import common, orbax_q4_0

    out = tmp_path / "export"
    out.mkdir()
    manifest = out / common.EXPORT_FILE
    manifest.write_text(text if text is not None else json.dumps({"format": orbax_q4_0.FORMAT, "tensors": {}}))
    before = manifest.read_bytes()
    assert cli.main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(manifest) in err and needle in err, err
    assert manifest.read_bytes() == before


def test_an_array_record_source_checks_its_first_records_when_it_opens(tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    from gemma_qat.data.sources import ArrayRecordSource

    path = tmp_path / "x.array_record"
    w = ar.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(3):
        w.write(json.dumps({"body": f"doc {i}"}).encode())
    w.close()
    with pytest.raises(ValueError, match=r"record 1: no 'text' field .* its fields are \['body'\]"):
        ArrayRecordSource([str(path)])
    assert len(ArrayRecordSource([str(path)], field="body")) == 3


def test_a_corrupt_meta_file_names_itself(tmp_path):
    from gemma_qat.model.checkpoint import read_meta

    (tmp_path / "meta.json").write_text('{"kind": "qat", ')
    with pytest.raises(ValueError, match=r"meta.json is corrupt"):
        read_meta(tmp_path)


def test_the_bounds_checks_accept_a_file_the_safetensors_library_wrote(tmp_path):
    """An independent writer: the checks of safetensors_hf.read_header must not reject a valid file."""
    st = pytest.importorskip("safetensors.numpy")
    from gemma_qat.export.safetensors_hf import read_header

    path = tmp_path / "lib.safetensors"
    st.save_file({"a": np.ones((4, 8), np.float32), "b": np.arange(6, dtype=np.int64).reshape(2, 3),
                  "c": np.zeros(5, np.float16)}, str(path))
    header, start = read_header(path)
    assert sorted(header) == ["a", "b", "c"] and header["b"]["shape"] == [2, 3]
    assert start + max(h["data_offsets"][1] for h in header.values()) == path.stat().st_size
