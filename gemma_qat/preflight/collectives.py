"""Communication of a compiled program, counted from its HLO text (`compiled.as_text()`), for any backend.

Every collective is found: all-gather, all-reduce, reduce-scatter, all-to-all, ragged-all-to-all,
collective-permute, collective-broadcast; their async pairs (`all-gather-start`/`-done`, ...; the GPU
compiler prints these, with `"is_sync":true` in the backend config when it runs them synchronously);
a collective wrapped in an `async-start`/`async-done` computation; and one inside a fusion or any other
called computation (the TPU compiler's collective fusions). Seen on real output: XLA:CPU never emits
async collectives or reduce-scatter for an SPMD gradient (it all-reduces the whole weight); the GPU
compiler (jax 0.11.2) emits all-gather-start/done and all-reduce-start/done for FSDP, and plain
reduce-scatter / all-to-all / collective-permute marked is_sync for shard_map collectives.

Bytes moved (`bytes_moved`): what one device sends (or, for all-gather, receives) over its links for one
execution of the op, by the bandwidth-optimal (ring) algorithm, with n the replica-group size and B the
op's per-device *input* bytes (operand shapes; n·B is an all-gather's output):

    all-gather          B·(n−1)         = (n−1)/n of the gathered output, received
    reduce-scatter      B·(n−1)/n       the input, less the 1/n shard that stays
    all-reduce          2·B·(n−1)/n     reduce-scatter then all-gather of the buffer
    all-to-all          B·(n−1)/n       every block but its own (ragged: an upper bound, the buffers' size)
    collective-permute  B               each source sends its whole buffer once
    collective-broadcast B

`bytes_per_step` multiplies by how many times the op runs per step (`runs`): the product of the trip
counts of the while loops around it (`known_trip_count`); None when one of them is unknown.

Replica groups: every spelling XLA prints (replica_groups.py). `spans_hosts(chips_per_host)` says
whether a group holds devices of two hosts, taking device id // chips_per_host as the host (jax's
meshes number devices host by host).

Overlap: an async collective is `overlapped` when, in its computation's schedule (the module must be
`is_scheduled`), at least one non-trivial instruction (a fusion, dot, convolution, custom-call, call,
while or conditional with more than one element) lies between its start and its done. A synchronous
collective is not overlapped; the flag is None when the module is not scheduled.

Source (`source`) — how it is told, and its limits:
  moe          an op_name naming moe/expert/router/dispatch, or a ragged-all-to-all. A plain all-to-all
               is not enough: the SPMD partitioner emits all-to-alls to reshard dense tensors (the
               tiny config's embedding lookup has six), so those read as activations.
  other        integer collectives (indices), scalars (≤ 64 bytes: the loss, norms), and
               collective-permutes that match no parameter.
  gradients    reduce-scatter or all-reduce whose buffer has a parameter's shape or a gathered weight's
               shape, inside the backward pass (op_name contains `transpose(`); or an op_name from the
               optimizer (optax/adam/global_norm/clip).
  weights      all-gather whose operand has the shape of an entry parameter (or of one layer of a
               stacked parameter [L, ...]: scan over layers): the FSDP gather, forward or backward.
  activations  every other all-gather / reduce-scatter / all-reduce / all-to-all of more than 64 bytes
               (tensor-parallel collectives of activations and of their gradients).
  Shapes are compared as multisets of dims, size-1 dims dropped, dtype ignored: the compiler transposes
  layouts (the tiny step gathers a [F, D] weight as [256, 64] and all-reduces its gradient as [64, 256]).
  Limits: so an activation that happens
  to have a parameter's shard shape counts as weights; a weight made inside the program (not an entry
  parameter) is not recognised; a TP backward all-reduce of a [D, D]-shaped activation gradient would
  read as a gradient; collective matmuls that the TPU compiler decomposes into collective-permute loops
  read as other. jax's op_name is the *consumer's* name for a gather (e.g. `.../dynamic_slice`), so
  names alone cannot tell weights from activations, hence the shape test.
"""

from __future__ import annotations

import dataclasses
import re

from gemma_qat.preflight import hlo, replica_groups

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
         "collective-broadcast")
SOURCES = ("weights", "gradients", "activations", "moe", "other")
SCALAR_BYTES = 64  # at most this many bytes: a loss or a norm, not a tensor
_COMPUTE = {"fusion", "fusion-start", "dot", "convolution", "custom-call", "call", "while", "conditional"}
_MOE = re.compile(r"moe|expert|router|dispatch|ragged", re.I)
_OPTIMIZER = re.compile(r"optax|adam|opt_state|global_norm|clip_by|scale_by", re.I)
_SOURCE_FILE = re.compile(r'source_file="([^"]*)"')


@dataclasses.dataclass
class Collective:
    name: str
    kind: str                                  # one of KINDS
    is_async: bool
    dtypes: tuple[str, ...]                    # of the operands
    shapes: tuple[tuple[int, ...], ...]        # operand dims (per device)
    result_shapes: tuple[tuple[int, ...], ...]
    input_bytes: int                           # per device, all operands
    group_size: int
    groups: list[list[int]] | None             # device ids per group (None: spelling not understood)
    bytes_moved: int                           # per device, one execution (module docstring)
    runs: int | None                           # executions per step (None: a loop of unknown trip count)
    loop_trip_counts: tuple[int | None, ...]   # of the while loops around it, outermost first
    overlapped: bool | None
    source: str = "other"
    op_name: str = ""
    source_file: str = ""
    computation: str = ""

    @property
    def in_loop(self) -> bool:
        return bool(self.loop_trip_counts)

    @property
    def bytes_per_step(self) -> int | None:
        return None if self.runs is None else self.bytes_moved * self.runs

    @property
    def dtype(self) -> str:
        return "+".join(sorted(set(self.dtypes))) or "?"

    def spans_hosts(self, chips_per_host: int) -> bool | None:
        if self.groups is None:
            return None
        return any(len({d // chips_per_host for d in g}) > 1 for g in self.groups)


def moved_bytes(kind: str, input_bytes: int, n: int) -> int:
    """Per-device bytes over the links for one execution (the module docstring's table)."""
    if kind == "all-gather":
        return input_bytes * (n - 1)
    if kind == "all-reduce":
        return 2 * input_bytes * (n - 1) // n
    if kind in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return input_bytes * (n - 1) // n
    return input_bytes  # collective-permute, collective-broadcast


def _norm(dims) -> tuple[int, ...]:
    """A shape as a sorted multiset of its dims other than 1 (layouts transpose; see the docstring)."""
    return tuple(sorted(d for d in dims if d != 1))


def _param_shapes(module: hlo.Module) -> set[tuple[int, ...]]:
    """Entry parameters' per-device shapes and one layer of each (a scan over a stacked [L, ...] param);
    integer inputs (tokens, step counters) left out."""
    out: set[tuple[int, ...]] = set()
    for inst in module.computations[module.entry].instructions:
        if inst.opcode == "parameter":
            out |= {s for dtype, dims in hlo.arrays(inst.shape) if dtype[0] in "fb"
                    for s in (_norm(dims), _norm(dims[1:]))}
    out.discard(())
    return out


def classify(c: Collective, params: set, gathered: set) -> str:
    """The module docstring's rules, in order. params: parameter shard shapes; gathered: the results of
    the all-gathers classified as weights (full layer weights)."""
    if c.kind == "ragged-all-to-all" or _MOE.search(c.op_name):
        return "moe"
    if any(d[0] in "su" or d == "pred" for d in c.dtypes) or c.input_bytes <= SCALAR_BYTES:
        return "other"
    if _OPTIMIZER.search(c.op_name):
        return "gradients"
    ins, outs = {_norm(s) for s in c.shapes}, {_norm(s) for s in c.result_shapes}
    # The collective combiners merge many small collectives into one and drop their op names.
    backward = "transpose(" in c.op_name or not c.op_name
    # Dims, not sizes: a weight the fake-quant reshaped into blocks ([..., D/32, 32]) before the compiler
    # gathered it reads as an activation (a size match misread embedding-gradient rows as weights).
    if c.kind == "all-gather":
        return "weights" if ins & params else "activations"
    if c.kind in ("reduce-scatter", "all-reduce"):
        weight_shaped = ins & (params | gathered) or (c.kind == "reduce-scatter" and outs & params)
        return "gradients" if backward and weight_shaped else "activations"
    if c.kind == "all-to-all":
        return "activations"
    if c.kind == "collective-permute" and ins & params:
        return "weights"
    return "other"


def _done_index(comp: hlo.Computation, start: int) -> int | None:
    """Index of the -done (or async-done) that ends the async op started at `start` (through -update)."""
    chain = {comp.instructions[start].name}
    for j in range(start + 1, len(comp.instructions)):
        inst = comp.instructions[j]
        if set(inst.operands) & chain:
            if inst.opcode.endswith("-done"):
                return j
            if inst.opcode.endswith("-update"):
                chain.add(inst.name)
    return None


def _overlapped(module: hlo.Module, comp: hlo.Computation, start: int) -> bool | None:
    end = _done_index(comp, start) if module.is_scheduled else None
    if end is None:
        return None
    return any(i.opcode in _COMPUTE and hlo.nelements(i.shape) > 1 for i in comp.instructions[start + 1:end])


def _is_sync(inst: hlo.Instruction) -> bool:
    return '"is_sync":true' in inst.attrs.replace(" ", "")


def _meta(pattern: re.Pattern, attrs: str) -> str:
    m = pattern.search(attrs)
    return m.group(1) if m else ""


def from_module(module: hlo.Module) -> list[Collective]:
    runs = module.runs()
    wrapped = {}  # computation called by an async-start -> (the start's computation, its index)
    for comp in module.computations.values():
        for i, inst in enumerate(comp.instructions):
            if inst.opcode == "async-start":
                wrapped.update({name: (comp, i) for name in inst.called().get("calls", [])})
    callers = module.callers()
    found = []
    for comp in module.computations.values():
        for i, inst in enumerate(comp.instructions):
            kind = inst.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            # TPU: a reduce-scatter is a fusion calling `%all-reduce-scatter.N` (an all-reduce and the
            # dynamic-slice of this device's part, emitted as one reduce-scatter); the fusion carries
            # the op name and the scattered result shape.
            fused_by = next((c for c, how in callers.get(comp.name, []) if c.opcode == "fusion"), None)
            if kind == "all-reduce" and fused_by is not None and comp.name.startswith("all-reduce-scatter"):
                kind, inst = "reduce-scatter", dataclasses.replace(inst, shape=fused_by.shape,
                                                                   attrs=inst.attrs + " " + fused_by.attrs)
            # Where it is scheduled: its own computation, or the caller of its async wrapper.
            sched, idx = wrapped.get(comp.name, (comp, i))
            is_async = (inst.opcode.endswith("-start") or comp.name in wrapped) and not (
                _is_sync(inst) or _is_sync(sched.instructions[idx]))
            operands = inst.operands[:1] if kind == "collective-permute" else inst.operands
            ins = [a for o in operands for a in hlo.arrays(comp.shapes.get(o, ""))]
            outs = hlo.arrays(inst.shape)[-max(len(ins), 1):]
            n, groups = replica_groups.parse(inst, module.num_devices)
            in_bytes = int(sum(hlo.nbytes(f"{d}[{','.join(map(str, dims))}]") for d, dims in ins))
            times, loops = runs[sched.name]
            if is_async:
                overlapped = _overlapped(module, sched, idx)
            else:
                overlapped = False if module.is_scheduled else None
            found.append(Collective(
                name=inst.name, kind=kind, is_async=is_async, dtypes=tuple(d for d, _ in ins),
                shapes=tuple(dims for _, dims in ins), result_shapes=tuple(dims for _, dims in outs),
                input_bytes=in_bytes, group_size=n, groups=groups, bytes_moved=moved_bytes(kind, in_bytes, n),
                runs=times, loop_trip_counts=loops, overlapped=overlapped, op_name=inst.op_name,
                source_file=_meta(_SOURCE_FILE, inst.attrs), computation=sched.name))
    params = _param_shapes(module)
    gathered = {_norm(s) for c in found if c.kind == "all-gather" and {_norm(s) for s in c.shapes} & params
                for s in c.result_shapes}
    for c in found:
        c.source = classify(c, params, gathered)
    return found


def from_text(text: str) -> list[Collective]:
    return from_module(hlo.parse(text))


def from_compiled(compiled) -> list[Collective]:
    """From a jax `Compiled` (anything with `.as_text()`)."""
    return from_text(compiled.as_text())


# ---- totals -------------------------------------------------------------------------------------------

def _add(table: dict, key: str, c: Collective) -> None:
    row = table.setdefault(key, {"ops": 0, "runs": 0, "bytes": 0})
    row["ops"] += 1
    row["runs"] += c.runs or 0
    row["bytes"] += c.bytes_per_step or 0


def summarize(collectives: list[Collective], chips_per_host: int | None = None) -> dict:
    """Per-step totals (bytes = Σ bytes_moved × runs per device), overall and by kind, dtype and source.
    Collectives in a loop of unknown trip count add nothing to the bytes and are counted in
    `unknown_runs`. With chips_per_host, also the bytes over intra-host and inter-host links."""
    out = {"ops": len(collectives), "runs": 0, "bytes": 0, "unknown_runs": 0, "in_loops": 0,
           "overlapped_bytes": 0, "exposed_bytes": 0, "by_kind": {}, "by_dtype": {}, "by_source": {}}
    for c in collectives:
        out["runs"] += c.runs or 0
        out["bytes"] += c.bytes_per_step or 0
        out["unknown_runs"] += c.runs is None
        out["in_loops"] += c.in_loop
        out["overlapped_bytes" if c.overlapped else "exposed_bytes"] += c.bytes_per_step or 0
        _add(out["by_kind"], c.kind, c)
        _add(out["by_dtype"], c.dtype, c)
        _add(out["by_source"], c.source, c)
    if chips_per_host:
        out["links"] = link_bytes(collectives, chips_per_host)
    return out


def link_bytes(collectives: list[Collective], chips_per_host: int) -> dict:
    """{'intra_host': bytes, 'inter_host': bytes, 'unknown_groups': ops}: per-step bytes by the links a
    collective's groups use; a group layout not understood counts as inter-host (the pessimistic side)."""
    out = {"intra_host": 0, "inter_host": 0, "unknown_groups": 0}
    for c in collectives:
        spans = c.spans_hosts(chips_per_host)
        out["unknown_groups"] += spans is None
        out["intra_host" if spans is False else "inter_host"] += c.bytes_per_step or 0
    return out


def weight_gather_dtypes(collectives: list[Collective]) -> dict[str, int]:
    """Are the FSDP weight all-gathers bf16 or fp32? Per-step gathered bytes by dtype (weights only)."""
    out: dict[str, int] = {}
    for c in collectives:
        if c.kind == "all-gather" and c.source == "weights":
            out[c.dtype] = out.get(c.dtype, 0) + (c.bytes_per_step or 0)
    return out


def _mib(b: int) -> str:
    return f"{b / 2**20:,.2f}"


def format_table(collectives: list[Collective], top: int = 10) -> str:
    """Totals by kind, dtype and source, then the `top` largest collectives."""
    s = summarize(collectives)
    lines = [f"collectives: {s['ops']} ops, {s['runs']} runs per step, {_mib(s['bytes'])} MiB moved per device "
             f"({_mib(s['overlapped_bytes'])} overlapped with compute)"
             + (f"; {s['unknown_runs']} in loops of unknown trip count (not counted)" if s["unknown_runs"] else "")]
    for title in ("by_kind", "by_dtype", "by_source"):
        lines.append(f"  {title.replace('_', ' '):<22}{'ops':>6}{'runs':>8}{'MiB':>12}")
        for key, row in sorted(s[title].items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"    {key:<20}{row['ops']:>6}{row['runs']:>8}{_mib(row['bytes']):>12}")
    lines.append(f"  {'largest':<22}{'kind':<20}{'dtype':<9}{'n':>3}{'runs':>6}{'MiB/step':>10}  source, async")
    for c in sorted(collectives, key=lambda c: -(c.bytes_per_step or 0))[:top]:
        flag = "" if not c.is_async else (", overlapped" if c.overlapped else ", async, exposed")
        lines.append(f"    {c.name[:20]:<20}{c.kind:<20}{c.dtype:<9}{c.group_size:>3}"
                     f"{c.runs if c.runs is not None else '?':>6}{_mib(c.bytes_per_step or 0):>10}  {c.source}{flag}")
    return "\n".join(lines)
