"""A small reader of compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`), enough for the
preflight's communication count and step model: computations, instructions, shapes, and how many times
each computation runs per step (its call graph, with while-loop trip counts).

Checked on the text that XLA:CPU (jax 0.10.2) and the GPU compiler (jax 0.11.2, AOT on an 8-device
`get_topology_desc(platform="cuda")`) print; the TPU compiler prints the same grammar. What it reads:

    HloModule NAME, is_scheduled=true, ..., num_partitions=8, ...
    %comp (p: f32[8]) -> f32[8] {            a computation (ENTRY before the entry one)
      %x = f32[8]{0} parameter(0)
      ROOT %y = (f32[8]{0}, bf16[2]{0}) op(%a, f32[8]{0} %b), attr=..., metadata={...}
    }

Operands are names, with or without a leading shape (both spellings occur); a tuple shape may carry
`/*index=5*/` comments. Trip counts come from a while's `backend_config` `"known_trip_count":{"n":"4"}`;
a while without one makes every computation under it run an unknown number of times (None).
"""

from __future__ import annotations

import dataclasses
import math
import re

# Bytes per element of each HLO primitive type (4-bit types count half a byte).
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25,
    "u2": 0.25, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation|branch_computations)"
                    r"=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NAME = re.compile(r"%?([\w.\-]+)$")


def dtype_bytes(dtype: str) -> float:
    """f8e4m3fn and the other 8-bit floats are 1 byte; an unknown type raises (better than a silent 0)."""
    if dtype.startswith("f8"):
        return 1
    return DTYPE_BYTES[dtype]


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in a (possibly nested tuple) shape string, in order: [(dtype, dims), ...]."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape)
            if d in DTYPE_BYTES or d.startswith("f8")]


def nbytes(shape: str) -> int:
    return int(sum(math.prod(dims) * dtype_bytes(d) for d, dims in arrays(shape)))


def nelements(shape: str) -> int:
    return sum(math.prod(dims) for _, dims in arrays(shape))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str      # the result shape as printed, e.g. "f32[8,512]{1,0}" or a tuple "(...)"
    opcode: str
    operands: list[str]
    attrs: str      # everything after the operand list
    computation: str

    def called(self) -> dict[str, list[str]]:
        """{'calls': [...], 'body': [...], ...}: the computations this instruction names (outside its
        backend_config, whose text, a Pallas kernel's for one, may hold words like `body=` of its own)."""
        out: dict[str, list[str]] = {}
        for key, val in _CALLS.findall(_without_backend_config(self.attrs)):
            out.setdefault(key, []).extend(v.strip().lstrip("%") for v in val.strip("{}").split(",") if v.strip())
        return out

    @property
    def op_name(self) -> str:
        """The jax op_name of the instruction's metadata ("" when it has none)."""
        m = _OP_NAME.search(self.attrs)
        return m.group(1) if m else ""

    @property
    def trip_count(self) -> int | None:
        m = _TRIP.search(self.attrs)
        return int(m.group(1)) if m else None

    def attr(self, key: str) -> str | None:
        """A plain `key=value` attribute (value up to the next top-level comma), e.g. replica_groups."""
        m = re.search(r"\b" + re.escape(key) + r"=", self.attrs)
        if not m:
            return None
        depth, i = 0, m.end()
        for j in range(i, len(self.attrs)):
            c = self.attrs[j]
            if c in "{[(":
                depth += 1
            elif c in "}])":
                depth -= 1
            elif c == "," and depth == 0:
                return self.attrs[i:j].strip()
        return self.attrs[i:].strip()


def _without_backend_config(attrs: str) -> str:
    m = re.search(r"\bbackend_config=", attrs)
    if not m:
        return attrs
    i = m.end()
    if i < len(attrs) and attrs[i] == "{":
        return attrs[:m.start()] + attrs[_balanced(attrs, i):]
    if i < len(attrs) and attrs[i] == '"':  # a quoted string form
        j = i + 1
        while j < len(attrs) and attrs[j] != '"':
            j += 2 if attrs[j] == "\\" else 1
        return attrs[:m.start()] + attrs[j + 1:]
    return attrs


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: list[Instruction] = dataclasses.field(default_factory=list)
    shapes: dict[str, str] = dataclasses.field(default_factory=dict)  # instruction name -> result shape


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_LHS = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")


def _instruction(line: str, computation: str) -> Instruction | None:
    m = _LHS.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)
    shape, rest = rest[:end], rest[end:]
    op = _OPCODE.match(rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    operands = [_NAME.search(o.split()[-1]).group(1) for o in _split_top(rest[op.end():close - 1])
                if _NAME.search(o.split()[-1])]
    return Instruction(m.group(1), shape, op.group(1), operands, rest[close:].lstrip(", "), computation)


@dataclasses.dataclass
class Module:
    name: str
    header: str
    computations: dict[str, Computation]
    entry: str

    @property
    def is_scheduled(self) -> bool:
        return "is_scheduled=true" in self.header

    @property
    def num_devices(self) -> int:
        """Partitions × replicas: the devices an empty `replica_groups={}` means."""
        get = lambda key: int(m.group(1)) if (m := re.search(key + r"=(\d+)", self.header)) else 1  # noqa: E731
        return get("num_partitions") * get("replica_count")

    def instructions(self):
        for comp in self.computations.values():
            yield from comp.instructions

    def callers(self) -> dict[str, list[tuple[Instruction, str]]]:
        """computation -> [(calling instruction, how: 'body', 'calls', ...)]."""
        out: dict[str, list[tuple[Instruction, str]]] = {}
        for inst in self.instructions():
            for how, names in inst.called().items():
                for n in names:
                    out.setdefault(n, []).append((inst, how))
        return out

    def while_trip_count(self, inst: Instruction) -> int | None:
        """The while's `known_trip_count`, else read from its condition: the TPU compiler prints no
        backend trip count, but jax's loops keep the form `ROOT compare(gte(param, index=k), constant(N)),
        direction=LT` with the counter starting at the init tuple's element k (a constant; 0 assumed when
        it is not one, as jax's scan and fori_loop start there). None for any other condition."""
        if inst.trip_count is not None:
            return inst.trip_count
        cond = self.computations.get((inst.called().get("condition") or [""])[0])
        if cond is None or not cond.instructions:
            return None
        by_name = {i.name: i for i in cond.instructions}
        root = cond.instructions[-1]  # the printer puts ROOT last
        if root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
            return None
        counter, limit = (by_name.get(o) for o in root.operands)
        if counter is None or limit is None or limit.opcode != "constant" or counter.opcode != "get-tuple-element":
            return None
        index = int(counter.attr("index") or 0)
        start = 0
        init = self._defining(inst.computation, inst.operands[0]) if inst.operands else None
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            first = self._defining(inst.computation, init.operands[index])
            if first is not None and first.opcode == "constant":
                start = int(first.operands[0])  # a scalar constant's literal parses as its one operand
        return int(limit.operands[0]) - start

    def _defining(self, computation: str, name: str) -> Instruction | None:
        return next((i for i in self.computations[computation].instructions if i.name == name), None)

    def runs(self) -> dict[str, tuple[int | None, tuple[int | None, ...]]]:
        """computation -> (times it runs per execution of the entry, or None if a while on the way has no
        known trip count; the trip counts of the while loops it sits in, outermost first, along its first
        call path). A computation reached by several call sites sums them (both branches of a conditional
        count: an upper bound)."""
        callers, memo = self.callers(), {}
        for root in self.computations:  # depth-first without recursion: no call depth can exhaust the stack
            stack, open_ = [(root, False)], set()
            while stack:
                name, ready = stack.pop()
                if name in memo:
                    continue
                if name == self.entry or name not in callers:
                    memo[name] = (1, ())
                    continue
                if not ready:
                    if name in open_:
                        continue  # a cycle: a call graph has none, so it is a misread name, not a call
                    open_.add(name)
                    stack.append((name, True))
                    stack.extend((i.computation, False) for i, _ in callers[name] if i.computation not in memo)
                    continue
                open_.discard(name)
                total, loops = 0, None
                for inst, how in callers[name]:
                    if inst.computation not in memo:
                        continue  # the edge that closed a cycle
                    times, outer = memo[inst.computation]
                    factor, here = 1, ()
                    if inst.opcode == "while" and how in ("body", "condition"):
                        trip = self.while_trip_count(inst)
                        factor = None if trip is None else trip + (how == "condition")
                        here = (trip,)
                    total = None if total is None or times is None or factor is None else total + times * factor
                    loops = outer + here if loops is None else loops
                memo[name] = (total, loops or ())
        return {name: memo[name] for name in self.computations}


def _logical_lines(raw: list[str]) -> list[str]:
    """Instruction lines joined with their continuations: a custom call's backend_config can span lines
    (a Pallas TPU kernel's JSON does), and its unindented `}}, metadata=...` tail must not read as the end
    of the computation. Inside a computation only `}` alone closes it and only indented lines start
    instructions; anything else continues the line before."""
    out: list[str] = []
    inside = False
    for ln in raw:
        if not inside:
            out.append(ln)
            inside = ln.rstrip().endswith("{") and not ln.startswith((" ", "\t", "HloModule"))
        elif ln.strip() == "}":
            out.append(ln)
            inside = False
        elif ln.startswith((" ", "\t")) or not out:
            out.append(ln)
        else:
            out[-1] += ln
    return out


def parse(text: str) -> Module:
    """The module in `text` (one HloModule; compiled output of `Compiled.as_text()`)."""
    lines = _logical_lines(text.splitlines())
    header = next((ln for ln in lines if ln.startswith("HloModule")), "")
    name = header.split()[1].rstrip(",") if header else ""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("//") or raw.startswith("HloModule"):
            continue
        if current is None or not raw.startswith((" ", "\t")):
            if line.startswith("}"):
                current = None
                continue
            if line.endswith("{") and " = " not in line.split("(")[0]:
                is_entry = line.startswith("ENTRY")
                cname = line.removeprefix("ENTRY").strip().split()[0].split("(")[0].lstrip("%")
                current = comps[cname] = Computation(cname, is_entry)
                entry = cname if is_entry else entry
                continue
        if current is not None:
            inst = _instruction(line, current.name)
            if inst is not None:
                current.instructions.append(inst)
                current.shapes[inst.name] = inst.shape
    if not entry and comps:
        entry = list(comps)[-1]  # printers put ENTRY last when the keyword is missing
    return Module(name, header, comps, entry)


def dot_flops(module: Module) -> int | None:
    """2·M·N·K of every `dot` in the module (fused ones too), times how often its computation runs: a
    loop-aware matmul count, since XLA's cost_analysis() counts a while body once. None when a dot sits
    in a loop of unknown trip count. Library GEMMs that the GPU compiler emits as custom-calls
    (`__cublas$gemm`) are not dots in the text and are not counted."""
    runs, total = module.runs(), 0
    for inst in module.instructions():
        if inst.opcode != "dot":
            continue
        times, _ = runs[inst.computation]
        if times is None:
            return None
        lhs = module.computations[inst.computation].shapes.get(inst.operands[0], "")
        dims = arrays(lhs)[0][1] if arrays(lhs) else ()
        contracting = inst.attr("lhs_contracting_dims") or "{}"
        k = math.prod(dims[int(i)] for i in contracting.strip("{}").split(",") if i.strip())
        total += 2 * nelements(inst.shape) * k * times
    return total
