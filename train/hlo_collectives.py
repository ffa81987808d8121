"""The collectives of a compiled program and the bytes they move per step, read from its HLO text.

    collective_bytes(compiled.as_text()) -> {"all-gather": Collectives(ops, bytes_per_step), "all-reduce": ...}
    collective_operand_shapes(compiled.as_text(), "collective-permute") -> [("f32", (2, 4, 96)), ...]

Kinds: all-gather, reduce-scatter, all-reduce, all-to-all (ragged-all-to-all counts here), collective-permute.
Async pairs (`all-gather-start` / `-done`, as GPU programs have them) count once, at the start. Bytes are the operands' bytes on one device (for an all-gather its
shard, for a reduce-scatter its whole input; compiled HLO names operands without their types, so each is looked up
at its definition), summed over every execution in one step: an op inside a while loop (the layer scan, gradient
accumulation, the loss chunks) runs once per iteration, so it is multiplied by the loop's trip count: the
known_trip_count XLA records on a GPU `while`, or the N of the loop condition `i < N` (a jax scan's counter runs
0..N-1; TPU programs keep that form). A loop whose trip count cannot be read is not guessed: its collectives are
listed in `unknown_trip_count`.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODE_KIND = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter", "reduce-scatter-start": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all", "all-to-all-start": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
}
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented "[ENTRY] %name (...) -> ... {"
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply|select|scatter)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


class Collectives(NamedTuple):
    ops: int  # instructions of this kind that run in a step
    bytes_per_step: int  # operand bytes on one device, times how often each runs in a step


class CollectiveReport(NamedTuple):
    by_kind: dict[str, Collectives]
    unknown_trip_count: list[str]  # collectives under a loop whose trip count could not be read
    loop_trip_counts: list[int | None]  # of every while loop in the program, in text order


class _Instruction(NamedTuple):
    name: str
    root: bool
    type: str  # the result type text
    opcode: str
    args: str  # the text after the opcode's "(": operands, then attributes


def array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type string, e.g. "(bf16[4,8]{1,0}, s32[])" -> 68."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _BYTES:
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _parse(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    root, name, rhs = match.groups()
    depth = 0
    for i, ch in enumerate(rhs):  # the result type ends at the first space outside brackets
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == " " and depth == 0:
            opcode = re.match(r"([\w\-]+)\((.*)$", rhs[i + 1:])
            if opcode:
                return _Instruction(name, bool(root), rhs[:i], opcode.group(1), opcode.group(2))
            return None
    return None


def _operand_names(args: str) -> list[str]:
    depth = 1
    for i, ch in enumerate(args):  # the operand list ends at the parenthesis that closes the opcode's
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return _OPERAND.findall(args[:i])
    return _OPERAND.findall(args)


def _trip_count(args: str, computations: dict[str, list[_Instruction]]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count when it recorded one (GPU), else read from a condition
    `i < N` with N a constant (TPU), which is the form of every jax scan (the counter runs 0, 1, ..., N - 1)."""
    known = _TRIP_COUNT.search(args)
    if known:
        return int(known.group(1))
    condition = _CONDITION.search(args)
    instructions = computations.get(condition.group(1), []) if condition else []
    root = next((i for i in instructions if i.root), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.args:
        return None
    operands = _operand_names(root.args)
    constants = {i.name: i.args.split(")")[0] for i in instructions if i.opcode == "constant"}
    if len(operands) == 2 and constants.get(operands[1], "").isdigit():
        return int(constants[operands[1]])
    return None


def _computations(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """The module's computations ({name: instructions}) and the name of its entry."""
    computations: dict[str, list[_Instruction]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith("HloModule"):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        instruction = _parse(line) if current is not None else None
        if instruction is not None:
            computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def collective_operand_shapes(hlo_text: str, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every operand of every collective of `kind` (one of KINDS) in the module, e.g.
    [("f32", (2, 4, 96)), ...], each instruction listed once however often it runs."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; kinds: {', '.join(KINDS)}")
    computations, _ = _computations(hlo_text)
    types = {i.name: i.type for instructions in computations.values() for i in instructions}
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for instructions in computations.values() for i in instructions if _OPCODE_KIND.get(i.opcode) == kind
            for o in _operand_names(i.args) for dtype, dims in _ARRAY.findall(types.get(o, ""))]


def collective_bytes(hlo_text: str) -> CollectiveReport:
    """Collectives by kind in a compiled module's text (`compiled.as_text()`), with their bytes per step."""
    computations, entry = _computations(hlo_text)
    types = {i.name: i.type for instructions in computations.values() for i in instructions}

    # How often each computation runs per step: the entry once; a while body/condition trip-count times per run
    # of its caller; anything else (fusions, reductions, branches, async wrappers) once per run of its caller.
    call_sites: dict[str, list[tuple[str, int | None]]] = {}
    trip_counts = []
    for name, instructions in computations.items():
        for instruction in instructions:
            callees = _CALLEE.findall(instruction.args)
            for group in _CALLEE_LIST.findall(instruction.args):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            factor = 1
            if instruction.opcode == "while":
                factor = _trip_count(instruction.args, computations)
                trip_counts.append(factor)
            for callee in callees:
                call_sites.setdefault(callee, []).append((name, factor))

    runs: dict[str, int | None] = {entry: 1}

    def count_runs(name: str) -> int | None:
        if name not in runs:
            runs[name] = 0  # a cycle (none in valid HLO) would count nothing rather than recurse forever
            total: int | None = 0
            for caller, factor in call_sites.get(name, []):
                caller_runs = count_runs(caller)
                total = None if None in (total, caller_runs, factor) else total + caller_runs * factor
            runs[name] = total
        return runs[name]

    totals = {kind: [0, 0] for kind in KINDS}
    unknown = []
    for name, instructions in computations.items():
        for instruction in instructions:
            kind = _OPCODE_KIND.get(instruction.opcode)
            times = count_runs(name) if kind else 0
            if times == 0:
                continue  # not a collective, or in a computation nothing calls
            totals[kind][0] += 1
            if times is None:
                unknown.append(f"{instruction.opcode} in {name}")
                continue
            operand_bytes = sum(array_bytes(types.get(o, "")) for o in _operand_names(instruction.args))
            totals[kind][1] += operand_bytes * times
    return CollectiveReport({k: Collectives(*v) for k, v in totals.items()}, unknown, trip_counts)
