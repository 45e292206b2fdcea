"""Collectives of a compiled (SPMD-partitioned) XLA program, read from its HLO text.

Each collective is counted as often as it runs in one step: an op inside a while loop's body
(a scanned block stack) counts trip-count times, the trip count read from the while's
`known_trip_count` or else the loop condition's bound. The GPU compiler's asynchronous
all-gather-start and reduce-scatter-start have a tuple type, (operands, results): an
all-gather counts its results, a reduce-scatter its operands. An all-reduce inside a
computation the TPU compiler names `all-reduce-scatter...` (its fusion of an all-reduce with
each device keeping its slice) counts as a reduce-scatter. The TPU compiler's asynchronous
collective fusions (v5e) keep a copy of their collective in the computation of each of their
parts (`async-collective-start`, the `async_collective_fusion` steps that overlap it with
compute, `async-collective-done`): it is counted once, at its start. On groups that span the
whole slice the TPU compiler may write an all-gather as an all-reduce of a zero buffer
holding each device's shard (`dynamic-update-slice` into a broadcast, at an offset computed
from the device's id): those operands count as all-gathers, sent at the all-reduce's rate.
`bytes` is the full buffer an op works on (all-gather: its result; reduce-scatter: its
input; the others: their operand), per device; replica groups are decoded in XLA's three
spellings and named by the mesh axes they span.
"""
import collections
import dataclasses
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
# Bytes each chip sends per byte of `bytes` in a ring over a group of n (lower bound).
RING_FACTOR = {
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}

_COMP_RE = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR_RE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) (all-gather|reduce-scatter|all-reduce|all-to-all|"
    r"collective-permute)(?:-start)?\((.*)$")
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*(?:e\d+m\d+(?:fn)?)?)\[([0-9,]*)\]")
_CALL_RE = re.compile(r"\b(?:calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCH_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_ASYNC_DONE_RE = re.compile(r"^\s*(?:ROOT )?%async-collective-done[.\d]* = ")
_WHILE_RE = re.compile(r"condition=%([\w.\-]+), body=%([\w.\-]+)")
_KNOWN_TRIPS_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Collective:
  kind: str
  bytes: int       # per device, the full buffer (see the module docstring)
  group_size: int
  axes: str        # mesh axes the groups span ("fsdp", "data", "data+fsdp", "?")
  count: int       # executions per step
  where: str       # the op_name of its metadata (the JAX operation it came from)
  form: str = ""   # the op the compiler wrote it as, where not `kind` (ICI: that op's rate)


def shape_bytes(type_text):
  """Bytes of an HLO type: `bf16[8,50,192]{...}` or a tuple of such."""
  total = 0
  for dtype, dims in _SHAPE_RE.findall(type_text):
    if dtype in DTYPE_BYTES:
      total += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def split_computations(hlo_text):
  """{name: [lines]} and the ENTRY computation's name."""
  comps, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    match = _COMP_RE.match(line)
    if match:
      name = match.group(2)
      comps[name] = []
      if match.group(1):
        entry = name
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def async_copies(comps):
  """Computations that hold a copy of an asynchronous collective fusion's collective: the
  `async_collective_fusion` steps and what `async-collective-done` calls. The collective
  runs once, and is counted in the computation its `async-collective-start` calls."""
  copies = {name for name in comps if name.startswith("async_collective_fusion")}
  for lines in comps.values():
    for line in lines:
      if _ASYNC_DONE_RE.match(line):
        copies.update(_CALL_RE.findall(line))
  return copies


def trip_count(while_line, cond_lines):
  """A scan's loop bound: the while's `known_trip_count` where the compiler wrote one (the
  GPU compiler fuses the condition's compare, constant and all), else the integer constant
  its condition compares the counter with."""
  known = _KNOWN_TRIPS_RE.search(while_line)
  if known:
    return int(known.group(1))
  consts = [int(c) for line in cond_lines
            for c in re.findall(r"s32\[\]\S* constant\((\d+)\)", line)]
  return consts[0] if len(consts) == 1 else 1


def multipliers(comps, entry):
  """How many times per step each computation reachable from ENTRY runs."""
  mult = collections.Counter({entry: 1})
  order = [entry]
  for name in order:  # breadth-first; HLO call graphs are DAGs
    for line in comps.get(name, ()):
      whiles = _WHILE_RE.search(line)
      callees = []
      if whiles:
        callees.append((whiles.group(2), trip_count(line, comps.get(whiles.group(1), ()))))
      callees += [(c, 1) for c in _CALL_RE.findall(line)]
      for names in _BRANCH_RE.findall(line):  # a conditional: every branch counted once
        callees += [(c.strip().lstrip("%"), 1) for c in names.split(",") if c.strip()]
      for callee, times in callees:
        if callee in comps:
          if callee not in mult:
            order.append(callee)
          mult[callee] += mult[name] * times
  return mult


def replica_groups(attrs, num_devices):
  """The device groups of a collective as a set of frozensets of partition indices."""
  match = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", attrs)
  if match:
    return {frozenset(int(x) for x in g.split(",") if x)
            for g in re.findall(r"\{([\d,]*)\}", match.group(1))}
  match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if match:
    ids = _iota(match.group(3), match.group(4)).reshape(int(match.group(1)), -1)
    return {frozenset(row.tolist()) for row in ids}
  match = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                    r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}", attrs)
  if match:
    axes = re.findall(r"'(\w+)'=(\d+)", match.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = (_iota(match.group(2), match.group(3)) if match.group(2)
           else np.arange(num_devices)).reshape(sizes)
    over = [names.index(a) for a in re.findall(r"'(\w+)'", match.group(4))]
    rest = [i for i in range(len(names)) if i not in over]
    rows = ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over])))
    return {frozenset(row.tolist()) for row in rows}
  if "source_target_pairs" in attrs:
    return None
  return {frozenset(range(num_devices))}


def _iota(dims, perm):
  dims = [int(d) for d in dims.split(",")]
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def axis_groups(mesh_shape):
  """{axes name: set of groups} for a (data, fsdp) mesh, over partition indices."""
  ids = np.arange(int(np.prod(mesh_shape))).reshape(mesh_shape)
  return {"fsdp": {frozenset(r.tolist()) for r in ids},
          "data": {frozenset(r.tolist()) for r in ids.T},
          "data+fsdp": {frozenset(ids.ravel().tolist())}}


def name_axes(groups, mesh_shape):
  if groups is None:
    return "permute"
  for name, want in axis_groups(mesh_shape).items():
    if groups == want:
      return name
  return "?"


def collectives(hlo_text, mesh_shape):
  """Every collective of a compiled module with its per-step execution count."""
  comps, entry = split_computations(hlo_text)
  mult = multipliers(comps, entry)
  num_devices = int(np.prod(mesh_shape))
  copies = async_copies(comps)
  values = Values(comps)
  found = []
  for name, lines in comps.items():
    if not mult.get(name) or name in copies:
      continue
    for line in lines:
      match = _INSTR_RE.match(line)
      if not match:
        continue
      kind = match.group(2)
      if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
      groups = replica_groups(match.group(3), num_devices)
      group_size = len(next(iter(groups))) if groups else 2
      where = re.search(r'op_name="([^"]*)"', line)
      common = dict(group_size=group_size, axes=name_axes(groups, mesh_shape),
                    count=mult[name], where=where.group(1) if where else "")
      if kind == "all-reduce":
        found += all_reduce_parts(match, name, values, common)
        continue
      parts = async_parts(match.group(1)) if f"{kind}-start(" in line else None
      if parts:  # the GPU's asynchronous start: its type holds operands and results
        size = shape_bytes(parts[0] if kind == "reduce-scatter" else parts[1])
      else:
        # reduce-scatter: its input is the full buffer; the result type is one shard
        size = shape_bytes(match.group(1))
        if kind == "reduce-scatter" and not name.startswith("all-reduce-scatter"):
          size *= group_size
      found.append(Collective(kind, size, **common))
  return found


def async_parts(type_text):
  """The top-level elements of an asynchronous collective start's tuple type, e.g. the GPU's
  `((operands...), (results...))` for a combined all-gather-start or reduce-scatter-start,
  `(operand, result)` for a single one; None where the type is not such a tuple."""
  text = type_text.strip()
  if not text.startswith("("):
    return None
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(text):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        parts.append(text[start:i])
        break
    elif ch == "," and depth == 1:
      parts.append(text[start:i])
      start = i + 1
  return parts if len(parts) >= 2 else None


def all_reduce_parts(match, comp, values, common):
  """An all-reduce as Collectives: the operands that are a zero buffer with this device's
  shard written in (`dynamic-update-slice` into a broadcast constant: the TPU compiler's
  form of an all-gather, on full-slice groups) count as all-gathers of their size, the
  rest as the all-reduce. A tuple all-reduce (combined by the compiler) is split so."""
  operands = re.findall(r"%[\w.\-]+", match.group(3).split(")")[0])
  sizes = [shape_bytes(f"{dtype}[{dims}]") for dtype, dims in _SHAPE_RE.findall(match.group(1))
           if dtype in DTYPE_BYTES]
  if len(sizes) != len(operands):  # not a plain list of array operands: one all-reduce
    return [Collective("all-reduce", shape_bytes(match.group(1)), **common)]
  gathered = sum(size for op, size in zip(operands, sizes) if values.is_shard_in_zeros(comp, op))
  parts = [("all-gather", gathered, "all-reduce"), ("all-reduce", sum(sizes) - gathered, "")]
  return [Collective(kind, size, form=form, **common) for kind, size, form in parts if size]


_DEF_RE = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*?) ([a-z][\w\-]*)\(([^)]*)\)(.*)$")
_INDEX_RE = re.compile(r"\bindex=(\d+)")
# Ops that pass their (first) operand's value through unchanged in content.
_PASS_THROUGH = ("copy", "copy-start", "copy-done", "bitcast", "reshape", "convert")


class Values:
  """Where an HLO value comes from, following copies, tuple elements, fusion roots and
  fusion parameters (to the fusion's operand in its caller)."""

  def __init__(self, comps):
    self.defs, self.roots, self.callers = {}, {}, {}
    for name, lines in comps.items():
      for line in lines:
        match = _DEF_RE.match(line)
        if not match:
          continue
        var, _, op, args, rest = match.groups()
        operands = re.findall(r"%[\w.\-]+", args)
        self.defs[(name, var)] = (op, operands, args if op == "parameter" else rest)
        if line.lstrip().startswith("ROOT "):
          self.roots[name] = var
        if op == "fusion":
          for callee in _CALL_RE.findall(rest):
            self.callers[callee] = (name, operands)

  def source(self, comp, var, index=None, depth=0):
    """(computation, variable, opcode) of the op that produces the value, or None."""
    entry = self.defs.get((comp, var))
    if entry is None or depth > 50:
      return None
    op, operands, rest = entry
    if op in _PASS_THROUGH and operands:
      return self.source(comp, operands[0], index, depth + 1)
    index_of = _INDEX_RE.search(rest)
    if op == "get-tuple-element" and operands and index_of:
      return self.source(comp, operands[0], int(index_of.group(1)), depth + 1)
    if op == "tuple" and index is not None and index < len(operands):
      return self.source(comp, operands[index], None, depth + 1)
    if op == "fusion":
      callee = _CALL_RE.findall(rest)
      if callee and callee[0] in self.roots:
        return self.source(callee[0], self.roots[callee[0]], index, depth + 1)
    if op == "parameter" and comp in self.callers and rest.isdigit():
      caller, args = self.callers[comp]
      if int(rest) < len(args):
        return self.source(caller, args[int(rest)], index, depth + 1)
    return comp, var, op

  def is_shard_in_zeros(self, comp, var):
    """Whether the value is a dynamic-update-slice into a broadcast (a zero buffer) at an
    offset computed from the device's id: each device writes its own part, as in a
    gather (a write at the same offset on every device would be a real reduction)."""
    src = self.source(comp, var)
    if src is None or src[2] != "dynamic-update-slice":
      return False
    _, operands, _ = self.defs[(src[0], src[1])]
    base = self.source(src[0], operands[0]) if operands else None
    return (base is not None and base[2] in ("broadcast", "constant")
            and any(self.from_device_id(src[0], i) for i in operands[2:]))

  def from_device_id(self, comp, var, depth=0):
    """Whether a (scalar index) value is computed from partition-id or replica-id."""
    entry = self.defs.get((comp, var))
    if entry is None or depth > 12:
      return False
    op, operands, rest = entry
    if op in ("partition-id", "replica-id"):
      return True
    if op == "parameter" and comp in self.callers and rest.isdigit():
      caller, args = self.callers[comp]
      return int(rest) < len(args) and self.from_device_id(caller, args[int(rest)], depth + 1)
    if op == "fusion":
      callee = _CALL_RE.findall(rest)
      if callee and callee[0] in self.roots:
        return self.from_device_id(callee[0], self.roots[callee[0]], depth + 1)
    return any(self.from_device_id(comp, o, depth + 1) for o in operands)


def summarize(found):
  """{kind: {count, bytes, ici_bytes}} per step: bytes = sum of buffers, ici_bytes = what
  each chip must send at least (ring algorithms, RING_FACTOR, at the rate of the op the
  compiler wrote: an all-gather written as an all-reduce sends as an all-reduce)."""
  out = {k: {"count": 0, "bytes": 0, "ici_bytes": 0} for k in KINDS}
  for c in found:
    row = out[c.kind]
    row["count"] += c.count
    row["bytes"] += c.count * c.bytes
    row["ici_bytes"] += round(c.count * c.bytes * RING_FACTOR[c.form or c.kind](c.group_size))
  return out
