"""Tests for gemma_qat.data: corpus, tokenizer, sources, packing and grain pipelines."""

import json
import pickle

import numpy as np
import pytest

from gemma_qat.data import corpus, packing, pipeline, sources
from gemma_qat.data import tokenizer as tk

SEQ_LEN = 128
KEYS = {"tokens", "targets", "loss_mask", "segment_ids", "positions"}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    return corpus.build_python_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=1 << 20)


@pytest.fixture(scope="module")
def tok(corpus_files, tmp_path_factory):
    path = tk.train_sentencepiece([corpus_files[0]], tmp_path_factory.mktemp("tok") / "sp",
                                  vocab_size=600)
    return tk.Tokenizer.load(path)


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Short docs that each fit one row, so each packed segment is one whole doc."""
    d = tmp_path_factory.mktemp("numbered")
    a = _write_jsonl(d / "a.jsonl", [f"alpha {i} def f(x): return x" for i in range(150)])
    b = _write_jsonl(d / "b.jsonl", [f"beta {i} import os" for i in range(150)])
    return a, b


def _segments(batches, tokenizer):
    """Decoded text of every packed segment (= document chunk) in the batches."""
    out = []
    for b in batches:
        for row_tok, row_seg in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, row_seg.max() + 1):
                out.append(tokenizer.decode(row_tok[row_seg == s]))
    return out


# ---- corpus --------------------------------------------------------------------------------------
def test_corpus_deterministic_disjoint(corpus_files, tmp_path):
    train, valid = corpus_files
    again = corpus.build_python_corpus(tmp_path, max_bytes=1 << 20)
    assert train.read_bytes() == again[0].read_bytes()
    assert valid.read_bytes() == again[1].read_bytes()
    tr = [json.loads(l)["text"] for l in train.open()]
    va = [json.loads(l)["text"] for l in valid.open()]
    assert len(tr) > 20 and len(va) >= 1
    assert not set(tr) & set(va)
    assert sum(len(t.encode()) for t in tr + va) <= 1 << 20


def test_corpus_site_packages_follow_the_stdlib(tmp_path, monkeypatch):
    lib, site = tmp_path / "lib", tmp_path / "site"
    (lib / "json").mkdir(parents=True)
    (lib / "json" / "enc.py").write_text('"""Encode JSON."""\nx = 1\n')
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "pkg" / "core.py").write_text("def f():\n    return 2\n")
    (site / "pkg" / "tests" / "test_core.py").write_text("assert True\n")
    (site / "pkg" / "table.py").write_text("T = [" + "0, " * (1 << 19) + "]\n")  # > 1 MiB: generated, skipped
    monkeypatch.setattr(corpus, "_stdlib_root", lambda: lib)
    monkeypatch.setattr(corpus, "_site_roots", lambda: [site])
    assert [r for r, _ in corpus.iter_python_documents()] == ["json/enc.py", "json/enc.py"]  # code, docstrings
    assert [r for r, _ in corpus.iter_python_documents(site_packages=True)] == [
        "json/enc.py", "json/enc.py", "site-packages/pkg/core.py", "site-packages/pkg/tests/test_core.py"]
    train, valid = corpus.build_python_corpus(tmp_path / "out", max_bytes=1 << 20, site_packages=True)
    texts = [json.loads(line)["text"] for f in (train, valid) for line in f.open()]
    assert "def f():\n    return 2\n" in texts and len(texts) == 4


# ---- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_ids_and_round_trip(tok, corpus_files, tmp_path):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.piece_to_id("<unk>") == 3 and tok.vocab_size == 600
    sot, eot = tok.piece_to_id(tk.START_OF_TURN), tok.piece_to_id(tk.END_OF_TURN)
    assert sot > 3 and eot > 3
    # The chat markers are single ids when they appear in rendered text.
    ids = tok.encode(f"{tk.START_OF_TURN}user\nhi{tk.END_OF_TURN}\n")
    assert ids[0] == sot and eot in ids
    for text in ["def f(x):\n    return x + 1  # ok", "héllo wörld, 世界 🙂 Ж\t\n  end"]:
        assert tok.decode(tok.encode(text)) == text
    # Unseen characters go through <0xNN> byte pieces, not <unk>.
    emoji = tok.encode("🙂")
    assert [tok._sp.id_to_piece(i) for i in emoji] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tok.encode("x", add_bos=True, add_eos=True)[::len(tok.encode("x")) + 1] == [2, 1]
    # Deterministic training, picklable wrapper.
    again = tk.train_sentencepiece([corpus_files[0]], tmp_path / "sp", vocab_size=600)
    assert again.read_bytes() == tk.Tokenizer.load(again)._sp_proto == tok._sp_proto
    assert pickle.loads(pickle.dumps(tok)).encode("abc def") == tok.encode("abc def")


def test_tokenizer_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tk.Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="bad.model"):
        tk.Tokenizer.load(bad)
    with pytest.raises(ValueError, match=r"vocab_size=600.*vocab_size=512"):
        tk.check_vocab(tok, 512)
    tk.check_vocab(tok, 600)
    tk.check_vocab(tok, 262_144)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(["hello world", "hello there"] * 10, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    t = tk.Tokenizer.load(tmp_path / "tokenizer.json")
    assert (t.pad_id, t.eos_id, t.bos_id) == (0, 1, 2)
    ids = t.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1 and t.decode(ids) == "hello world"


# ---- sources -------------------------------------------------------------------------------------
def test_parse_spec_and_errors(tmp_path, numbered):
    a, b = numbered
    specs = sources.parse_spec(f"jsonl:{a}@0.7,{b}#field=text@0.3")
    assert sources.parse_spec(f"{b}@0.3#field=text") == specs[1:]
    assert [(s.scheme, s.path, s.weight) for s in specs] == [("jsonl", str(a), 0.7),
                                                            ("jsonl", str(b), 0.3)]
    assert specs[1].options == (("field", "text"),)
    (t,) = sources.parse_spec("tfds:wiki40b/en:train[:1%]")
    assert (t.scheme, t.path) == ("tfds", "wiki40b/en:train[:1%]")
    with pytest.raises(ValueError, match="'parquet'"):
        sources.parse_spec("parquet:/x/y")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        sources.make_source(f"jsonl:{tmp_path}/missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.txt"):
        sources.make_source(f"text:{tmp_path}/nothing*.txt")
    with pytest.raises(ValueError, match="field"):
        sources.parse_spec(f"text:{a}#field=x")
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"gemma-qat\[tfds\]"):
            sources.make_source("tfds:wiki40b/en:train")


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nline2\n\n\npara two\n")
    (tmp_path / "b.txt").write_text("only one")
    assert [sources.make_source(f"text:{tmp_path}/*.txt")[i] for i in range(2)] == [
        "para one\nline2\n\n\npara two\n", "only one"]
    para = sources.make_source(f"text:{tmp_path}/*.txt#split=paragraph")
    assert [para[i] for i in range(len(para))] == ["para one\nline2", "para two", "only one"]

    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"body": "plain"}) + "\n\n" + json.dumps(chat) + "\n")
    js = sources.make_source(f"{tmp_path}/c.jsonl#field=body")
    assert len(js) == 2 and js[0] == "plain"
    assert js[1] == ("<start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n"
                     "<start_of_turn>model\nHello.<end_of_turn>\n")

    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for rec in [b"raw text", json.dumps({"text": "from json"}).encode()]:
        w.write(rec)
    w.close()
    ar = sources.make_source(f"arrayrecord:{tmp_path}/*.array_record")
    assert [ar[0], ar[1]] == ["raw text", "from json"]


# ---- packing -------------------------------------------------------------------------------------
def test_packing_hand_made():
    docs = [[10, 11, 12], list(range(20, 30)), [30, 31], [40]]
    rows = packing.pack_documents(docs, 4)
    # Greedy, 1 bin: a row is closed when the next chunk does not fit. Doc 2 (10 tokens) becomes
    # chunks of 4, 4, 2; its chunk-final targets are the next chunk's first token (same doc).
    want = [
        # tokens            targets            loss_mask     segment_ids   positions
        ([10, 11, 12, 0], [11, 12, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 2, 0]),
        ([20, 21, 22, 23], [21, 22, 23, 24], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 2, 3]),
        ([24, 25, 26, 27], [25, 26, 27, 28], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 2, 3]),
        ([28, 29, 30, 31], [29, 0, 31, 0], [1, 0, 1, 0], [1, 1, 2, 2], [0, 1, 0, 1]),
        ([40, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]),
    ]
    assert len(rows) == len(want)
    for row, w in zip(rows, want):
        assert set(row) == KEYS and all(v.dtype == np.int32 and v.shape == (4,) for v in row.values())
        got = tuple(row[k].tolist() for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                              "positions"))
        assert got == w


@pytest.mark.parametrize("bins", [1, 3])
def test_packing_properties(bins):
    rng = np.random.default_rng(0)
    # Token value = 1000 * doc + index, so every token names its document and its place in it.
    docs = [[1000 * d + i for i in range(1, rng.integers(2, 40))] for d in range(1, 60)]
    rows = packing.pack_documents(docs, 16, num_packing_bins=bins)
    chunks = {}
    for r in rows:
        seg, tok = r["segment_ids"], r["tokens"]
        assert (tok[seg == 0] == 0).all() and (r["loss_mask"][seg == 0] == 0).all()
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            assert (r["positions"][idx] == np.arange(len(idx))).all()
            doc = set(tok[idx] // 1000)
            assert len(doc) == 1  # no segment crosses documents
            d = doc.pop()
            # Targets are the next token of the same document; masked only at the doc end.
            t, m = r["targets"][idx], r["loss_mask"][idx]
            last = docs[d - 1][-1]
            assert ((t == tok[idx] + 1) == (tok[idx] != last)).all()
            assert (m == (tok[idx] != last)).all()
            chunks.setdefault(d, []).extend(tok[idx].tolist())
    assert {d: sorted(c) for d, c in chunks.items()} == {i + 1: d for i, d in enumerate(docs)}
    if bins == 1:  # greedy keeps document order, so tokens also appear in order
        assert [t for r in rows for t in r["tokens"][r["segment_ids"] > 0]] == sum(docs, [])


# ---- pipeline ------------------------------------------------------------------------------------
def test_train_iterator_restore(tok, corpus_files, numbered):
    spec_many = [f"jsonl:{corpus_files[0]}", f"jsonl:{numbered[0]}@2,jsonl:{numbered[1]}@1"]
    for spec in spec_many:
        kw = dict(seq_len=SEQ_LEN, global_batch_size=4, seed=3, shard_index=1, shard_count=2)
        it = pipeline.make_train_iterator(spec, tok, **kw)
        first = [next(it) for _ in range(5)]
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
        cont = [next(it) for _ in range(4)]
        it2 = pipeline.make_train_iterator(spec, tok, **kw)
        it2.set_state(state)
        for a, b in zip(cont, [next(it2) for _ in range(4)]):
            assert all(np.array_equal(a[k], b[k]) for k in KEYS)
        b = first[0]
        assert set(b) == KEYS
        assert all(v.shape == (2, SEQ_LEN) and v.dtype == np.int32 for v in b.values())
        assert not np.array_equal(first[0]["tokens"], cont[0]["tokens"])
        again = next(pipeline.make_train_iterator(spec, tok, **kw))
        assert np.array_equal(again["tokens"], first[0]["tokens"])


def test_two_hosts_disjoint_and_complete(tok, numbered):
    spec = f"jsonl:{numbered[0]}"
    seen = []
    for host in range(2):
        it = pipeline.make_train_iterator(spec, tok, seq_len=SEQ_LEN, global_batch_size=8, seed=0,
                                          shard_index=host, shard_count=2, num_epochs=1)
        batches = list(it)
        assert all(b["tokens"].shape == (4, SEQ_LEN) for b in batches)
        seen.append(_segments(batches, tok))
    everything = [f"alpha {i} def f(x): return x" for i in range(150)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(everything)  # each doc once, nothing lost
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    # Shuffled before sharding: host 0 does not simply get every other document.
    assert set(seen[0]) != set(everything[0::2])


def test_mixture_weights(tok, numbered):
    a, b = numbered
    it = pipeline.make_train_iterator(f"jsonl:{a}@0.75,jsonl:{b}@0.25", tok, seq_len=SEQ_LEN,
                                      global_batch_size=4, seed=1, shard_index=0, shard_count=1)
    segs = _segments([next(it) for _ in range(40)], tok)
    frac = np.mean([s.startswith("alpha") for s in segs])
    assert len(segs) > 300 and abs(frac - 0.75) < 0.05, (len(segs), frac)


def test_eval_batches(tok, numbered):
    spec = f"jsonl:{numbered[1]}"
    ev = pipeline.make_eval_batches(spec, tok, seq_len=SEQ_LEN, global_batch_size=8)
    ev2 = pipeline.make_eval_batches(spec, tok, seq_len=SEQ_LEN, global_batch_size=8)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(ev, ev2) for k in KEYS)
    # Every document exactly once (first-fit bins may reorder within a batch).
    assert sorted(_segments(ev, tok)) == sorted(f"beta {i} import os" for i in range(150))
    greedy = pipeline.make_eval_batches(spec, tok, seq_len=SEQ_LEN, global_batch_size=8,
                                        num_packing_bins=1)
    assert _segments(greedy, tok) == [f"beta {i} import os" for i in range(150)]  # file order
    padded = pipeline.make_eval_batches(spec, tok, seq_len=SEQ_LEN, global_batch_size=8,
                                        num_batches=len(ev) + 2)
    assert len(padded) == len(ev) + 2 and padded[-1]["loss_mask"].sum() == 0


def test_pipeline_errors(tok, numbered):
    with pytest.raises(ValueError, match=r"global_batch_size=6.*shard_count=4"):
        pipeline.make_train_iterator(f"jsonl:{numbered[0]}", tok, seq_len=SEQ_LEN,
                                     global_batch_size=6, seed=0, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match=r"vocab_size=600.*vocab_size=256"):
        pipeline.make_train_iterator(f"jsonl:{numbered[0]}", tok, seq_len=SEQ_LEN,
                                     global_batch_size=4, seed=0, shard_index=0, shard_count=1,
                                     model_vocab_size=256)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        pipeline.make_train_iterator("jsonl:/no/such/absent.jsonl", tok, seq_len=SEQ_LEN,
                                     global_batch_size=4, seed=0, shard_index=0, shard_count=1)
