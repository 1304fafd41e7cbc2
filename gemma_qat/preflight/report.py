"""The preflight's result: per-device memory rows (each saying whether it is exact, compiled or an
estimate), the verdict against the chip's usable HBM, the largest tensors' shardings, notes."""

from __future__ import annotations

import dataclasses
from typing import Any

from gemma_qat.preflight.step_model import cost_dict
from gemma_qat.preflight.topologies import GIB, Topology


def size(nbytes: float) -> str:
    """GiB for the big numbers, MiB below one GiB (the tiny configs)."""
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB else f"{nbytes / 2**20:.1f} MiB"


def memory_stats(compiled) -> dict | None:
    """Per-device bytes of a compiled program's buffers, with the peak the runtime will need."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    stats = {k.replace("_in_bytes", ""): int(getattr(m, k)) for k in keys}
    stats["peak"] = stats["argument_size"] + stats["output_size"] - stats["alias_size"] + stats["temp_size"]
    return stats


COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")


def cost_stats(compiled) -> dict:
    """The compiler's per-device cost analysis: flops, bytes accessed, and on TPU `optimal_seconds` (the
    compiler's own runtime estimate); {} where it gives none (the GPU compiler's AOT compile)."""
    cost = cost_dict(compiled.cost_analysis())
    return {k: float(cost[k]) for k in COST_KEYS if k in cost}


@dataclasses.dataclass(frozen=True)
class TensorRow:
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str  # the PartitionSpec over mesh axes
    local_shape: tuple[int, ...]  # per device
    local_bytes: int


@dataclasses.dataclass
class Report:
    topology: Topology
    mesh: dict[str, int]
    parallelism: str
    config: Any  # RunConfig
    rows: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)  # (what, bytes/device, source)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)  # anything here makes ok False
    checks: list[str] = dataclasses.field(default_factory=list)  # passed checks worth saying
    largest: list[TensorRow] = dataclasses.field(default_factory=list)
    estimate_terms: dict[str, int] = dataclasses.field(default_factory=dict)
    rows_per_device: int = 0
    step_check: str = ""
    compiled: dict | None = None  # memory_analysis of a compile (bytes), with `peak`
    compiled_on: str = ""
    compiled_by_target: bool = False  # the target's own compiler (libtpu, the CUDA plugin), not XLA:CPU fakes
    compile_seconds: float | None = None  # lowering + compiling the step
    layout_padding: int = 0  # bytes of tile padding in the argument buffers (TPU layouts)
    cost: dict = dataclasses.field(default_factory=dict)  # the compiler's cost analysis: flops, bytes accessed, ...
    compiled_program: Any = dataclasses.field(default=None, repr=False)  # the jax Compiled (not serialised)
    collectives: dict = dataclasses.field(default_factory=dict)  # collectives.summarize of the compiled step
    collectives_table: str = ""
    weight_gathers: dict = dataclasses.field(default_factory=dict)  # FSDP weight all-gather bytes by dtype
    prediction: dict = dataclasses.field(default_factory=dict)  # performance.analyse: step time, MFU
    total: int = 0
    total_source: str = ""
    fits: bool = False
    compiler_out_of_memory: bool = False  # the target's compiler refused: no estimate overrules it

    def add(self, what: str, nbytes: int, source: str) -> None:
        self.rows.append((what, int(nbytes), source))

    @property
    def usable(self) -> int:
        return self.topology.usable_bytes

    @property
    def margin(self) -> int:
        return self.usable - self.total

    @property
    def ok(self) -> bool:
        return self.fits and not self.problems

    @property
    def target_compiled(self) -> bool:
        # Only the target's own compiler gives buffer sizes to trust; XLA:CPU fuses and upcasts differently.
        return self.compiled is not None and self.compiled_by_target

    def set_compiled(self, compiled, compiled_on: str, seconds: float, *, target: bool) -> None:
        """Records a compile of the step: its memory analysis, cost analysis and the program itself."""
        self.compiled, self.compiled_on = memory_stats(compiled), compiled_on
        self.compiled_by_target, self.compile_seconds, self.compiled_program = target, seconds, compiled
        self.cost = cost_stats(compiled)

    def finish(self) -> None:
        if self.target_compiled:
            self.total, self.total_source = self.compiled["peak"], f"compiled ({self.compiled_on})"
        else:
            self.total = sum(b for _, b, _ in self.rows)
            self.total_source = "exact sizes + activation estimate"
        self.fits = self.total <= self.usable and not self.compiler_out_of_memory

    def to_dict(self) -> dict:
        t = self.topology
        return {
            "topology": {"name": t.name, "chip": t.chip.name, "platform": t.platform, "chips": t.chips,
                         "hosts": t.hosts, "chips_per_host": t.chips_per_host, "hbm_bytes": t.hbm_bytes,
                         "usable_bytes": self.usable},
            "mesh": self.mesh, "parallelism": self.parallelism, "rows_per_device": self.rows_per_device,
            "memory_per_device": [{"what": w, "bytes": b, "source": s} for w, b, s in self.rows],
            "estimate_terms": self.estimate_terms,
            "compiled": self.compiled, "compiled_on": self.compiled_on or None,
            "compile_seconds": self.compile_seconds, "cost": self.cost, "layout_padding_bytes": self.layout_padding,
            "collectives": self.collectives, "weight_gathers": self.weight_gathers, "prediction": self.prediction,
            "total_bytes": self.total, "total_source": self.total_source,
            "fits": self.fits, "margin_bytes": self.margin, "ok": self.ok,
            "step_check": self.step_check, "checks": self.checks, "problems": self.problems, "notes": self.notes,
            "largest_tensors": [dataclasses.asdict(r) for r in self.largest],
        }

    def format(self) -> str:
        t, c = self.topology, self.config
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        out = [f"preflight: {c.model.name} (quant {c.quant.recipe}, remat {c.remat}"
               f"{', layers scanned' if c.scan_layers else ''}, seq {c.data.seq_len}, "
               f"global batch {c.data.global_batch_size}) on {t.describe()}",
               f"mesh: {mesh}, parallelism {self.parallelism}; {self.rows_per_device} rows per device",
               f"step: {self.step_check}", "", "per device:"]
        out += [f"  {w:28s}{size(b):>12s}   {s}" for w, b, s in self.rows]
        if self.compiled:
            cc = self.compiled
            trust = "" if self.target_compiled else " — indicative only: CPU fusion/dtypes differ from the target"
            out.append(f"  compiled ({self.compiled_on}): arguments {size(cc['argument_size'])}, temp "
                       f"{size(cc['temp_size'])}, peak {size(cc['peak'])}{trust}")
        pct = self.margin / self.usable
        verdict = "yes" if self.fits else "NO"
        out += [f"  {'total':28s}{size(self.total):>12s}   {self.total_source}",
                f"fits: {verdict} — usable {size(self.usable)} of {t.hbm_bytes / GIB:.0f} GiB "
                f"({t.chip.usable_fraction:.0%}), margin {size(self.margin)} ({pct:+.0%})", "",
                "largest tensors (student params; optimizer moments share their sharding):"]
        for r in self.largest:
            out.append(f"  {r.path:48s} {str(r.shape):22s} {r.spec:34s} → {str(r.local_shape):20s} "
                       f"{r.local_bytes / 2**20:9.1f} MiB")
        if self.collectives:
            out += ["", self.collectives_table]
        if self.weight_gathers:
            out.append("FSDP weight all-gathers by dtype: " + ", ".join(
                f"{k} {v / 2**20:,.1f} MiB" for k, v in sorted(self.weight_gathers.items())))
        if self.prediction:
            p = self.prediction
            out.append(f"predicted ({self.compiled_on}; calibration {p['calibration']:.2f} of peak): {p['text']}")
        out += [f"check: {x}" for x in self.checks]
        out += [f"note: {x}" for x in self.notes]
        out += [f"PROBLEM: {x}" for x in self.problems]
        return "\n".join(out)
