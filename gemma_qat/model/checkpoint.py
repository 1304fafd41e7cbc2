"""Model checkpoints on disk: an Orbax parameter tree, the model config and a versioned metadata
record (CheckpointMeta, meta.json), written atomically so an output folder is either complete or absent;
a quantized student's static activation scales beside them (quant_scales.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.params import abstract_params, flat_shapes

CONFIG_FILE = "model_config.json"
META_FILE = "meta.json"
PARAMS_DIR = "params"
# The static activation scales (the `quant_scales` collection of quant/policy.py's RecipePolicy) live
# beside the params: JSON numbers ({"layer_0": {"attn": {"q_einsum": {"w_in": 0.01, ...}}}}), or an Orbax
# tree in SCALES_DIR where there is no JSON file. Training writes them, export and eval read them.
SCALES_JSON = "quant_scales.json"
SCALES_DIR = "quant_scales"
SCALE_DTYPE = np.float32
# meta.json versions: 0 = the unversioned file written before the record was typed (the same keys
# with the same meaning); 1 = the same keys plus `version`. Bump it when a key changes meaning.
META_VERSION = 1
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What the weights of a model checkpoint are and where they came from. Every writer builds one
    (`save_model(meta=...)`); `read_meta` is the one reader."""

    kind: str | None = None  # "float" (imported or float-trained), "ptq" (`gemma-qat quantize`), "qat"
    param_dtype: str = "float32"  # the stored dtype; load_model restores in it
    recipe: dict | None = None  # Recipe.to_dict() the weights were trained (qat) or quantized (ptq) under
    step: int | None = None  # the training step of a run's final model
    tokenizer: str | None = None  # the run's tokenizer
    source: str | None = None  # what the weights came from (an HF folder, the checkpoint quantized)
    run_config: dict | None = None  # RunConfig.to_dict() of the run that wrote it, as saved
    extra: dict = dataclasses.field(default_factory=dict)  # keys no version defines, kept as found
    version: int = META_VERSION  # the version the file was read as; a write is always META_VERSION

    def to_json(self) -> dict:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "version")}
        return {"version": META_VERSION, **{k: v for k, v in known.items() if v is not None}, **self.extra}


_META_TYPES = {"kind": str, "param_dtype": str, "recipe": dict, "step": int, "tokenizer": str, "source": str,
               "run_config": dict}


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it replaces `out_dir`. An existing `out_dir`
    is kept unless `force`, and even then is only removed after the new one is complete.

    In a multi-process run every host yields the SAME folder (Orbax writes each host's shards under
    one path and waits for the primary to create it) and only process 0 creates, swaps and deletes,
    with barriers between, so no host renames a folder another is still writing."""
    out = Path(out_dir).absolute()
    multi = jax.process_count() > 1
    primary = jax.process_index() == 0
    if primary:
        _recover_interrupted(out)
    _barrier(multi, f"gemma_qat.atomic_dir.recovered:{out}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    # A per-call random name would differ between hosts; one fixed name is safe because the
    # barriers keep hosts in step and a stale copy from a crashed run is cleared first.
    tmp = out.parent / (f".{out.name}.tmp-multihost" if multi else f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    if primary:
        out.parent.mkdir(parents=True, exist_ok=True)
        if multi:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(multi, f"gemma_qat.atomic_dir.start:{out}")
    try:
        yield tmp
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(multi, f"gemma_qat.atomic_dir.written:{out}")
    if primary:
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(multi, f"gemma_qat.atomic_dir.done:{out}")  # nobody reads `out` before it exists


def _recover_interrupted(out: Path) -> None:
    """What a kill inside `atomic_dir` leaves beside `out`: `.NAME.tmp-*` (a write that never finished,
    removed) and `.NAME.old-*` (the previous complete folder, moved aside for the swap: put back if
    `out` is missing, else removed). Each with a warning naming the path."""
    if not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            old.rename(out)
            log.warning("%s: restored from %s, which an interrupted replacement had moved aside", out, old)
        else:
            shutil.rmtree(old, ignore_errors=True)
            log.warning("removed %s, left by an interrupted replacement of %s", old, out)
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, an unfinished write of %s", tmp, out)


def _barrier(multi: bool, name: str) -> None:
    if multi:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save_model(out_dir, params: dict, config: ModelConfig, *, meta: CheckpointMeta | None = None,
               force: bool = False) -> Path:
    """Writes OUT/params (Orbax), OUT/model_config.json and OUT/meta.json atomically."""
    check_tree(params, config)
    with atomic_dir(out_dir, force=force) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, params)
        ckptr.wait_until_finished()
        if jax.process_index() == 0:  # one writer for the small files (shared folder when multi-host)
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
            write_meta(tmp, meta or CheckpointMeta())
    return Path(out_dir)


def load_config(ckpt_dir) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a gemma-qat model checkpoint: {CONFIG_FILE} is missing "
                                "(create one with `gemma-qat import-hf` or a training run)")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from None


def _restore_args(target):
    # Without target shardings Orbax reuses the saved ones; a model saved by a multi-host run (its
    # shardings span processes that do not exist here, e.g. in a 1-process export or eval) would be
    # a "topology mismatch", so it falls back to whole arrays on this process's first device.
    try:
        return ocp.args.StandardRestore(target, fallback_sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0]))
    except TypeError:  # an Orbax without fallback_sharding: saved shardings only
        return ocp.args.StandardRestore(target)


def load_model(ckpt_dir, *, dtype=None, shardings=None) -> tuple[ModelConfig, dict]:
    """Restores (config, params). `dtype` casts on restore; `shardings` (a tree of Shardings like
    the params) places each array directly on its devices without a full host copy."""
    config = load_config(ckpt_dir)
    stored = jnp.dtype(read_meta(ckpt_dir).param_dtype)
    target = abstract_params(config, param_dtype=dtype or stored)
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    path = Path(ckpt_dir).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; the checkpoint at {ckpt_dir} is incomplete")
    try:
        params = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(path, args=_restore_args(target))
    except Exception as e:  # Orbax raises many types; name the folder and the likely fix once.
        raise ValueError(f"could not restore parameters from {path} ({type(e).__name__}: {e}); "
                         "the checkpoint is corrupt or was written for another model config") from e
    return config, params


def write_meta(ckpt_dir, meta: CheckpointMeta) -> None:
    (Path(ckpt_dir) / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, default=str))


def read_meta(ckpt_dir) -> CheckpointMeta:
    """meta.json as a CheckpointMeta; no file reads as the defaults (version 0, as before)."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        return CheckpointMeta(version=0)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: a JSON object expected")
    version = data.pop("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{path} is corrupt: version {version!r} is not a version number")
    if version > META_VERSION:
        raise ValueError(f"{path} has metadata version {version}; this gemma-qat reads versions up to "
                         f"{META_VERSION}: upgrade gemma-qat to read it")
    for key, tp in _META_TYPES.items():  # versions 0 and 1 share keys and meanings
        value = data.get(key)
        if value is not None and (not isinstance(value, tp) or isinstance(value, bool)):
            raise ValueError(f"{path} is corrupt: {key} = {value!r} is not of type {tp.__name__}")
    known = {k: v for k in _META_TYPES if (v := data.pop(k, None)) is not None}
    return CheckpointMeta(**known, extra=data, version=version)


def check_tree(params: dict, config: ModelConfig) -> None:
    """Every parameter present with the architecture's shape, nothing extra; one error lists all."""
    want = flat_shapes(abstract_params(config))
    have = flat_shapes(params)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k}: {have[k]} != expected {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if missing or extra or wrong:
        raise ValueError(f"parameter tree does not match model {config.name!r}: missing={missing[:8]} "
                         f"unexpected={extra[:8]} wrong_shapes={wrong[:8]}")


def load_quant_scales(ckpt_dir) -> dict:
    d = Path(ckpt_dir)
    if (d / SCALES_JSON).is_file():
        tree = json.loads((d / SCALES_JSON).read_text())
        return jax.tree.map(lambda v: np.asarray(v, SCALE_DTYPE), tree)
    if (d / SCALES_DIR).is_dir():
        tree = ocp.StandardCheckpointer().restore((d / SCALES_DIR).absolute())
        return jax.tree.map(lambda v: np.asarray(v, SCALE_DTYPE), tree)
    return {}


def save_quant_scales(ckpt_dir, scales: dict) -> Path:
    """Writes DIR/quant_scales.json atomically (temp file + os.replace). Python floats hold fp32
    exactly, so the JSON round trip is lossless."""
    path = Path(ckpt_dir) / SCALES_JSON
    tree = jax.tree.map(lambda v: float(np.asarray(v, SCALE_DTYPE)), scales)
    _write_text_atomic(path, json.dumps(tree, indent=1))
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
