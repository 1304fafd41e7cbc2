"""A plain-text corpus that every machine has: the Python stdlib (about 30 MB),
and on request the installed site-packages after it (hundreds of MB where
torch, jax or transformers are installed).

Used for demos, smoke tests, tokenizer training and the fidelity benchmark when
no real data is at hand. The stdlib part depends only on the running
interpreter, so two runs with the same Python give byte-identical files; with
site-packages the content also follows what is installed.

Layout written to `out_dir`:
  train.jsonl   one {"text": ...} object per line
  valid.jsonl   held-out documents (chosen by a hash of the module path, so
                a module never has docs in both splits)
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator

DEFAULT_MAX_BYTES = 8 * 1024 * 1024  # Enough for a demo, builds in ~1 s.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
_MAX_FILE_BYTES = 1 << 20  # larger .py files are generated tables, not code anyone wrote


def _site_roots() -> list[Path]:
    """The interpreter's site-packages folders (purelib, platlib, site's list), each once, sorted."""
    import site
    found = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    found.update(getattr(site, "getsitepackages", lambda: [])())
    return sorted({Path(p).resolve() for p in found if Path(p).is_dir()})


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[Path]:
    """All stdlib .py files in a deterministic order, library code first.

    Test suites are big and repetitive; sorting them last means small budgets
    get mostly library code (better prose/docstring mix) while large budgets
    can still reach ~30 MB.
    """
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if _SKIP_DIRS & set(rel.parts):
            continue
        files.append(rel)
    files.sort(key=lambda r: (bool(_TEST_DIRS & set(r.parts)), r.as_posix()))
    return [root / r for r in files]


def _docstrings(source: str) -> str:
    """Module, class and function docstrings joined as one prose document."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # A few stdlib files are py2 fixtures.
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


def _is_valid(rel_path: str, valid_percent: float) -> bool:
    # sha256 rather than hash(): the builtin is salted per process.
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
    return (h % 10_000) < valid_percent * 100


def iter_python_documents(
    *, with_docstrings: bool = True, site_packages: bool = False) -> Iterator[tuple[str, str]]:
    """Yields (relative_path, text) for each stdlib module (+ docstring doc), then, with
    `site_packages`, each installed package's modules (paths prefixed `site-packages/`)."""
    roots = [("", _stdlib_root())] + ([("site-packages/", r) for r in _site_roots()] if site_packages else [])
    for prefix, root in roots:
        for f in _module_files(root):
            try:
                if prefix and f.stat().st_size > _MAX_FILE_BYTES:
                    continue
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # Some test fixtures are deliberately not utf-8.
            if not text.strip():
                continue
            rel = prefix + f.relative_to(root).as_posix()
            yield rel, text
            if with_docstrings:
                docs = _docstrings(text)
                if docs:
                    yield rel, docs


def build_python_corpus(
    out_dir: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    valid_percent: float = 5.0,
    with_docstrings: bool = True,
    site_packages: bool = False,
) -> list[Path]:
    """Writes the stdlib corpus to `out_dir` and returns [train, valid] paths.

    Args:
      out_dir: Directory to create / overwrite `train.jsonl`, `valid.jsonl` in.
      max_bytes: Stop once this many utf-8 text bytes (both splits) are written.
      valid_percent: Percentage of modules (by path hash) held out.
      with_docstrings: Also emit each module's docstrings as a separate doc.
      site_packages: After the stdlib, the installed packages' modules too.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, valid_path = out / "train.jsonl", out / "valid.jsonl"
    total = 0
    # Write to temp names first so a crash never leaves a half corpus behind
    # under the final names.
    tmp_train, tmp_valid = (p.with_suffix(".jsonl.tmp")
                            for p in (train_path, valid_path))
    with open(tmp_train, "w", encoding="utf-8") as ft, \
         open(tmp_valid, "w", encoding="utf-8") as fv:
        for rel, text in iter_python_documents(with_docstrings=with_docstrings,
                                                   site_packages=site_packages):
            n = len(text.encode("utf-8"))
            if total + n > max_bytes:
                if total == 0:
                    # Always emit at least a prefix so tiny budgets still give data.
                    text = text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                    n = max_bytes
                else:
                    break
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            (fv if _is_valid(rel, valid_percent) else ft).write(line)
            total += n
    tmp_train.replace(train_path)
    tmp_valid.replace(valid_path)
    return [train_path, valid_path]
