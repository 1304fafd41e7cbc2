"""The QuantPolicy that a resolved recipe hands to the model: fake-quant of each weight in its
format along its contraction axes, and int8 static activation fake-quant where the recipe asks.

Static activation scales live in their own collection (`quant_scales`), never in `params`, so the
student's parameter tree stays the BF16 tree. They start at 0 (= pass-through, the HF "gemma"
quantizer convention for uncalibrated scales) and are set by `calibrate` (absmax/127 over data).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.layers import param_path
from gemma_qat.model.params import abstract_params, flat_shapes
from gemma_qat.model.transformer import Transformer
from gemma_qat.quant import formats, q4_0_kernel
from gemma_qat.quant.recipe import FLOAT, Resolution

SCALES = "quant_scales"


def weight_axes(fmt: str, in_axes: tuple[int, ...]):
    """Q4_0 blocks run along one axis: for multi-axis contractions ([N, H, D] attention output)
    the innermost one, which is the contiguous axis of the flattened HF/GGUF layout [D, N·H]."""
    return in_axes[-1] if fmt == "q4_0" else in_axes


BACKENDS = ("auto", "formats", "aqt")


def choose_backend(backend: str, resolution: Resolution) -> str:
    """`quant.backend = auto` in one rule: formats for a recipe with any Q4_0 weight, AQT otherwise.

    Both backends give the same bits (tests/test_quant_backend.py), so only speed decides. Measured on one
    H200 (BENCHMARKS.md, "Quantization backends"), QAT + teacher steps: Q4_0 through AQT cost +2.0% on
    bench-1b against formats' own XLA path and +3.1% on E2B against the one-pass kernel (AQT calibrates,
    quantizes and dequantizes a tiled weight in separate passes: +3% bytes accessed), while E2B's mobile
    recipe (per-channel int2/int4/int8, no kernel) ran 1.2% faster through AQT. An explicit `formats` or
    `aqt` is kept as given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "formats" if "q4_0" in set(resolution.formats.values()) else "aqt"


class RecipePolicy:
    """Applies a Resolution. `calibrating=True` records activation absmax instead of quantizing.
    `backend="aqt"` computes the weight fake-quant through AQT (aqt_backend.py), which reproduces
    formats.py bit for bit; "formats" calls formats.py directly (fewer layers, same numbers); "auto" (the
    default) picks one by `choose_backend`'s rule, and `self.backend` is the one picked.
    `q4_0_impl` (formats backend): "xla" runs formats.py's Q4_0 under XLA, "pallas" the one-pass kernel
    of q4_0_kernel.py (same bits), "auto" the kernel on one NVIDIA GPU where the shape allows. The kernel
    writes the weight in the calling module's compute dtype, which the module casts to anyway."""

    def __init__(self, resolution: Resolution, *, calibrating: bool = False, backend: str = "auto",
                 static_scales: dict | None = None, q4_0_impl: str = "auto"):
        backend = choose_backend(backend, resolution)
        if q4_0_impl not in q4_0_kernel.IMPLS:
            raise ValueError(f"unknown Q4_0 implementation {q4_0_impl!r}; choose one of {q4_0_kernel.IMPLS}")
        self.q4_0_impl = q4_0_impl
        self.resolution = resolution
        self.formats = resolution.formats
        self.act_int8 = resolution.recipe.activations == "int8_static"
        self.calibrating = calibrating
        self.backend = backend
        # Frozen activation scales (a `quant_scales` tree from `calibrate`) carried by the policy
        # itself, so a training step uses them without threading a second collection through it.
        self.static_scales = static_scales
        self._static = ({"/".join(k[:-1]) + ":" + k[-1]: float(v)
                         for k, v in traverse_util.flatten_dict(static_scales).items()}
                        if static_scales is not None else None)

    def layer_key(self, i: int):
        """What this policy does to layer i, relative to the layer (formats; which activations carry frozen
        scales, not their values, which `layer_constants` hands over): layers with equal keys share one
        scanned body (model/scan.py)."""
        prefix = f"layer_{i}/"
        rel = lambda keys: tuple(sorted(k[len(prefix):] for k in keys if k.startswith(prefix)))
        formats = tuple((k, self.formats[prefix + k]) for k in rel(self.formats))
        return formats, None if self._static is None else rel(self._static), self.calibrating

    def layer_constants(self, i: int) -> dict[str, float]:
        """Layer i's frozen activation scales by key relative to the layer (scanned inputs of a scan body)."""
        prefix = f"layer_{i}/"
        return {k[len(prefix):]: v for k, v in (self._static or {}).items() if k.startswith(prefix)}

    def with_layer_constants(self, i: int, values: dict) -> "RecipePolicy":
        """This policy with layer i's frozen scales replaced by `values` (traced scalars in a scan body)."""
        new = copy.copy(self)
        new._static = {**self._static, **{f"layer_{i}/{k}": v for k, v in values.items()}}
        return new

    def _format(self, module, name) -> str:
        path = param_path(module, name)
        try:
            return self.formats[path]
        except KeyError:
            raise ValueError(f"recipe {self.resolution.recipe.name!r} was resolved for another model: "
                             f"no format for {path}") from None

    def weight(self, module, name, w, *, in_axes):
        fmt = self._format(module, name)
        if fmt == FLOAT:
            return w
        if self.backend == "aqt":
            from gemma_qat.quant.aqt_backend import aqt_fake_quant
            axes = weight_axes(fmt, in_axes)  # an int or a tuple: aqt_backend takes either
            # AQT's own straight-through gradient lives in its dot_general; used on the weight alone
            # its dequant has zero gradient, so wrap it in the same identity VJP as formats.py.
            return formats.straight_through(lambda v: aqt_fake_quant(v, weight_format=fmt, in_axes=axes), w)
        axes = weight_axes(fmt, in_axes)
        if fmt == "q4_0" and q4_0_kernel.use_kernel(self.q4_0_impl, w.shape, axes):
            return q4_0_kernel.q4_0_fake_quant_fused(w, in_axis=axes, dtype=getattr(module, "dtype", None))
        return formats.get_format(fmt).fake_quant(w, axes)

    def activation(self, module, name, x, *, site):
        if not self.act_int8 or self._format(module, name) == FLOAT:
            return x
        key = f"{name}_{site}"
        if self._static is not None:
            s = self._static.get("/".join(module.scope.path) + ":" + key, 0.0)
            return formats.act_fake_quant_int8(x, jnp.asarray(s, jnp.float32)).astype(x.dtype)
        if not (module.has_variable(SCALES, key) or module.is_mutable_collection(SCALES)):
            return x  # no scales given: uncalibrated, pass-through
        scale = module.variable(SCALES, key, lambda: jnp.zeros((), jnp.float32))
        if self.calibrating:
            scale.value = jnp.maximum(scale.value, jnp.max(jnp.abs(x)).astype(jnp.float32) / 127.0)
            return x
        return formats.act_fake_quant_int8(x, jax.lax.stop_gradient(scale.value)).astype(x.dtype)

    def __repr__(self):
        return f"RecipePolicy({self.resolution.recipe.name}, backend={self.backend}, q4_0_impl={self.q4_0_impl})"


class _Recorder:
    """Records each weight's contraction axes as the model presents them (used for checks)."""

    def __init__(self):
        self.axes: dict[str, tuple[int, ...]] = {}

    def weight(self, module, name, w, *, in_axes):
        # Embeddings pass gathered rows [B, T, ...] through the policy; their trailing dims are
        # the table's, so shift the axes back onto the table [V, ...].
        lead = w.ndim - nn.unbox(module.get_variable("params", name)).ndim
        self.axes[param_path(module, name)] = tuple(a % w.ndim - lead for a in in_axes)
        return w

    def activation(self, module, name, x, *, site):
        return x


def weight_in_axes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """path → contraction axes of every weight the model routes through the policy."""
    rec = _Recorder()
    model = Transformer(config, quant=rec)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)
    return rec.axes


def check_q4_0_blocks(resolution: Resolution, config: ModelConfig, param_shardings) -> None:
    """A Q4_0 block must never straddle a shard boundary of its contraction axis: the per-device
    length of that axis must stay a multiple of 32. Raises naming the parameters otherwise."""
    axes = weight_in_axes(config)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(param_shardings).items()}
    shapes = flat_shapes(abstract_params(config))
    bad = []
    for path, fmt in resolution.quantized().items():
        if fmt != "q4_0":
            continue
        ax = weight_axes(fmt, axes[path])
        sh = flat[path]
        local = sh.shard_shape(shapes[path])[ax]
        if local % formats.Q4_0_BLOCK_SIZE:
            bad.append(f"{path} (axis {ax}: {shapes[path][ax]} → {local} per device)")
    if bad:
        raise ValueError("this mesh would split Q4_0 blocks of 32 across devices: " + "; ".join(bad[:5]) +
                         " — use fewer shards on the contraction axis (e.g. a smaller fsdp)")


def calibrate(model_config: ModelConfig, params, resolution: Resolution, batches, *, dtype=jnp.float32):
    """Static activation scales: running absmax/127 over `batches` (dicts with `tokens`, optional
    `positions`, `segment_ids`). Returns the `quant_scales` collection."""
    step = calibration_step(model_config, resolution, dtype=dtype)
    scales = None
    for batch in batches:
        scales = step(params, scales, {k: jnp.asarray(v) for k, v in batch.items()
                                       if k in ("tokens", "positions", "segment_ids")})
    return nn.unbox(scales) if scales is not None else {}


def calibration_step(model_config: ModelConfig, resolution: Resolution, *, dtype=jnp.float32):
    """jit((params, scales | None, batch) -> scales): one forward that folds a batch's absmax into the
    running scales. The params are an argument, not a closure: closed over, they become constants of
    the program and XLA constant-folds the weights' fake-quant (minutes at 155M parameters on a GPU)."""
    model = Transformer(model_config, quant=RecipePolicy(resolution, calibrating=True), dtype=dtype)

    @jax.jit
    def step(params, scales, batch):
        variables = {"params": params, **({SCALES: scales} if scales is not None else {})}
        _, upd = model.apply(variables, batch["tokens"], batch.get("positions"), batch.get("segment_ids"),
                             mutable=[SCALES])
        return upd[SCALES]

    return step


def placeholder_scales(model_config: ModelConfig, resolution: Resolution, value: float = 1.0) -> dict:
    """The `quant_scales` tree `calibrate` would return, each scale `value`: enough to build and compile
    the training step without data (preflight), since a frozen scale is a constant of the program,
    not a shape. Traced with `jax.eval_shape`: nothing is allocated."""
    model = Transformer(model_config, quant=RecipePolicy(resolution, calibrating=True))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    tree = jax.eval_shape(lambda p, t: model.apply({"params": p}, t, mutable=[SCALES])[1][SCALES],
                          abstract_params(model_config), tokens)
    return jax.tree.map(lambda _: value, nn.unbox(tree))
