"""Random-access text sources (grain `RandomAccessDataSource` protocol).

Every source maps an int index to one document `str`; tokenisation happens
later in the pipeline. Sources are built from spec strings:

  text:/dir/*.txt                  one document per file
  text:/dir/*.txt#split=paragraph  one document per blank-line paragraph
  jsonl:/path/train.jsonl          field "text", or a chat "messages" list
  jsonl:/p/*.jsonl#field=content   another field name
  arrayrecord:/p/*.array_record    utf-8 text or JSON records (auto-detected)
  tfds:name/config:split           needs `pip install gemma-qat[tfds]`
  spec1@0.7,spec2@0.3              weighted mixture (weights renormalised)

A scheme-less path is inferred from its suffix (.jsonl, .txt, .array_record).
Paths may not contain ',' (mixture separator) or '#' (options separator).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gemma_qat.data.tokenizer import END_OF_TURN, START_OF_TURN

SCHEMES = ("text", "jsonl", "arrayrecord", "tfds")
_SUFFIX_SCHEME = {".jsonl": "jsonl", ".txt": "text", ".array_record": "arrayrecord"}


# ---- chat rendering --------------------------------------------------------
def render_chat(messages: Sequence[dict[str, str]]) -> str:
    """Renders [{role, content}] with Gemma's turn template.

    Gemma has only `user` and `model` roles: `assistant` maps to `model` and a
    `system` message is folded into the next user turn, as Gemma's own chat
    template does.
    """
    out, pending_system = [], None
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            pending_system = content
            continue
        role = "model" if role == "assistant" else role
        if role not in ("user", "model"):
            raise ValueError(f"Unknown chat role {role!r}; expected user/model/"
                             "assistant/system")
        if pending_system is not None and role == "user":
            content, pending_system = f"{pending_system}\n\n{content}", None
        out.append(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n")
    return "".join(out)


def record_to_text(record: Any, field: str = "text") -> str:
    """str | bytes | dict record -> document text (field, or chat messages)."""
    if isinstance(record, bytes):
        record = record.decode("utf-8")
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if field in record:
            value = record[field]
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if "messages" in record:
            return render_chat(record["messages"])
        raise KeyError(f"Record has neither {field!r} nor 'messages' "
                       f"(keys: {sorted(record)})")
    raise TypeError(f"Unsupported record type {type(record).__name__}")


def check_raw_record(raw: bytes, field: str, where: str) -> None:
    """check_record on a record as stored (one JSON object), naming `where` when it does not parse."""
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    check_record(record, field, where)


def check_record(record: Any, field: str, where: str) -> None:
    """ValueError naming `where`, the field expected and the fields found, unless record_to_text can
    read the record."""
    if isinstance(record, (str, bytes)):
        return
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a {field!r} field, found a "
                         f"{type(record).__name__}")
    if field not in record and "messages" not in record:
        raise ValueError(f"{where}: no {field!r} field (nor a chat 'messages' list); its fields are "
                         f"{sorted(record)}. Fix: name the field in data.spec with #field=NAME (e.g. jsonl:FILE#field=body)")


def expand_paths(pattern: str) -> list[str]:
    """Sorted glob matches (deterministic order); FileNotFoundError if none."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else (
        [pattern] if Path(pattern).is_file() else [])
    if not paths:
        raise FileNotFoundError(f"No data files match {pattern!r}")
    return paths


# ---- sources ----------------------------------------------------------------
class TextSource:
    """Plain text. split="file": one doc per file (read lazily on access).

    split="paragraph": one doc per paragraph separated by blank lines; all
    files are read at construction, so use it for modest corpora only.
    """

    def __init__(self, paths: Sequence[str], split: str = "file"):
        if split not in ("file", "paragraph"):
            raise ValueError(f"text split must be 'file' or 'paragraph', got {split!r}")
        self._paths, self._split = list(paths), split
        self._paragraphs: list[str] | None = None
        if split == "paragraph":
            self._paragraphs = [
                p.strip("\n") for path in self._paths
                for p in re.split(r"\n\s*\n", Path(path).read_text(encoding="utf-8"))
                if p.strip()]

    def __len__(self) -> int:
        return len(self._paragraphs if self._paragraphs is not None else self._paths)

    def __getitem__(self, index: int) -> str:
        if self._paragraphs is not None:
            return self._paragraphs[index]
        return Path(self._paths[index]).read_text(encoding="utf-8")

    def __repr__(self):
        return f"TextSource({len(self._paths)} files, split={self._split!r})"


class JsonlSource:
    """JSON-lines; builds a byte-offset index so access is O(1) per record."""

    def __init__(self, paths: Sequence[str], field: str = "text"):
        self._paths, self._field = list(paths), field
        self._offsets: list[np.ndarray] = []  # Per file: start byte of each record.
        self._cum = [0]  # Cumulative record counts, for file lookup by bisect.
        for path in self._paths:
            offs, pos = [], 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():  # Blank lines are not records.
                        offs.append(pos)
                    pos += len(line)
            self._offsets.append(np.asarray(offs, np.int64))
            self._cum.append(self._cum[-1] + len(offs))
            self._check_opening(path, offs)

    def _check_opening(self, path: str, offsets: list[int], n: int = 3) -> None:
        """The first records, when the source opens: a wrong file fails here, not after the start-up."""
        if not offsets:
            raise ValueError(f"data file {path} has no records (one JSON object per line expected)")
        with open(path, "rb") as f:
            for k, off in enumerate(offsets[:n]):
                f.seek(off)
                check_raw_record(f.readline(), self._field, f"data file {path}, record {k + 1}")

    def __len__(self) -> int:
        return self._cum[-1]

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(index)
        f_idx = bisect.bisect_right(self._cum, index) - 1
        # Open per access: thread-safe under grain's threaded reads and picklable.
        with open(self._paths[f_idx], "rb") as f:
            f.seek(int(self._offsets[f_idx][index - self._cum[f_idx]]))
            line = f.readline()
        return record_to_text(json.loads(line), self._field)

    def __repr__(self):
        return f"JsonlSource({self._paths!r}, field={self._field!r})"


class ArrayRecordSource:
    """ArrayRecord files whose records are utf-8 text or JSON objects.

    format="auto" parses a record as JSON iff it starts with '{'.
    """

    def __init__(self, paths: Sequence[str], field: str = "text",
                 format: str = "auto"):  # pylint: disable=redefined-builtin
        import grain  # Local import keeps `sources` importable without grain.
        if format not in ("auto", "text", "json"):
            raise ValueError(f"arrayrecord format must be auto/text/json, got {format!r}")
        self._paths, self._field, self._format = list(paths), field, format
        self._src = grain.sources.ArrayRecordDataSource(self._paths)
        if len(self._src) == 0:
            raise ValueError(f"data files {self._paths} hold no records")
        for k in range(min(3, len(self._src))):  # the first records, when the source opens
            raw = self._src[k]
            if self._format == "json" or (self._format == "auto" and raw.lstrip()[:1] == b"{"):
                check_raw_record(raw, field, f"data files {self._paths}, record {k + 1}")

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int) -> str:
        raw: bytes = self._src[index]
        if self._format == "json" or (
            self._format == "auto" and raw.lstrip()[:1] == b"{"):
            return record_to_text(json.loads(raw), self._field)
        return raw.decode("utf-8")

    def __repr__(self):
        return f"ArrayRecordSource({len(self._paths)} files)"


class TfdsSource:
    """tfds.data_source (random access, array_record-backed) -> text."""

    def __init__(self, name: str, split: str, field: str = "text",
                 data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds  # Optional, heavy dependency.
        except ImportError as e:
            raise ImportError(
                f"Data spec 'tfds:{name}:{split}' needs tensorflow-datasets; "
                "install it with `pip install gemma-qat[tfds]`.") from e
        self._name, self._field = name, field
        self._src = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int) -> str:
        return record_to_text(self._src[index], self._field)

    def __repr__(self):
        return f"TfdsSource({self._name!r})"


# ---- spec parsing -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source. `path` is a glob, or `name/config:split` for tfds."""
    scheme: str
    path: str
    weight: float = 1.0
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown data scheme {self.scheme!r} in "
                             f"{self.scheme}:{self.path}; known: {', '.join(SCHEMES)}")
        if not self.weight > 0:
            raise ValueError(f"Mixture weight must be > 0, got {self.weight} "
                             f"for {self.scheme}:{self.path}")


_OPTIONS = {"text": {"split"}, "jsonl": {"field"},
            "arrayrecord": {"field", "format"}, "tfds": {"field", "data_dir"}}


def _parse_one(s: str) -> SourceSpec:
    s = s.strip()
    weight = 1.0
    # "@w" may sit at the end or just before "#options"; an '@' followed by
    # anything but a number belongs to the path.
    m = re.search(r"@(\d*\.?\d+(?:[eE][-+]?\d+)?)(?=#|$)", s)
    if m:
        weight, s = float(m.group(1)), s[:m.start()] + s[m.end():]
    s, _, opt_str = s.partition("#")
    options = tuple(tuple(kv.split("=", 1)) for kv in opt_str.split("&") if kv)
    if any(len(kv) != 2 for kv in options):
        raise ValueError(f"Bad options {opt_str!r} in {s!r}; use #key=value&k2=v2")
    m = re.match(r"^([A-Za-z][\w]*):(?!//)(.*)$", s)
    if m and len(m.group(1)) > 1:  # len>1: don't mistake "C:\..." for a scheme.
        scheme, path = m.group(1).lower(), m.group(2)
    else:
        suffix = next((k for k in _SUFFIX_SCHEME if s.endswith(k)), None)
        if suffix is None:
            raise ValueError(f"Data spec {s!r} has no scheme; prefix one of "
                             f"{', '.join(s + ':' for s in SCHEMES)}")
        scheme, path = _SUFFIX_SCHEME[suffix], s
    spec = SourceSpec(scheme, path, weight, options)
    bad = {k for k, _ in options} - _OPTIONS[scheme]
    if bad:
        raise ValueError(f"Unknown option(s) {sorted(bad)} for scheme {scheme!r}; "
                         f"allowed: {sorted(_OPTIONS[scheme])}")
    return spec


def parse_spec(spec: str | SourceSpec | Sequence[SourceSpec | str]
               ) -> tuple[SourceSpec, ...]:
    """Parses a spec string / SourceSpec / list of them into SourceSpecs."""
    if isinstance(spec, SourceSpec):
        return (spec,)
    if isinstance(spec, str):
        parts = [p for p in spec.split(",") if p.strip()]
        if not parts:
            raise ValueError("Empty data spec")
        return tuple(_parse_one(p) for p in parts)
    return tuple(s for item in spec for s in parse_spec(item))


def make_source(spec: SourceSpec | str):
    """Builds the random-access source for one spec (checks files exist)."""
    if isinstance(spec, str):
        (spec,) = parse_spec(spec)
    opts = dict(spec.options)
    if spec.scheme == "tfds":
        name, sep, split = spec.path.rpartition(":")
        if not sep or not name:
            raise ValueError(f"tfds spec must be tfds:name[/config]:split, got "
                             f"{spec.path!r}")
        return TfdsSource(name, split, opts.get("field", "text"),
                          opts.get("data_dir"))
    paths = expand_paths(spec.path)
    if spec.scheme == "text":
        return TextSource(paths, opts.get("split", "file"))
    if spec.scheme == "jsonl":
        return JsonlSource(paths, opts.get("field", "text"))
    return ArrayRecordSource(paths, opts.get("field", "text"),
                             opts.get("format", "auto"))
