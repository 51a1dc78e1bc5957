"""What a compiled step executes, read from its HLO text with loops multiplied out.

XLA's cost analysis and a regex over the HLO text both count a loop body once: with scanned
layers (model.scan_layers) the 32 blocks of an 8B model are one while body, so a static count
sees one layer's weight all-gathers and one layer's FLOPs. This module splits the text into
computations, follows the calls from ENTRY (while bodies run their known trip count; fusions,
calls and branches run once per caller run; a loop bounded at runtime, such as the causal
block attention's key loop, is a causal triangle) and gives every instruction a multiplicity,
then sums per step:
- collectives: kind, operand bytes, replica groups, times run;
- FLOPs of dots and convolutions (2 x output elements x contracted size x real window taps);
- HBM bytes: operands + results of each top-level instruction (a fusion reads its operands and
  writes its result once; what happens inside a fusion stays on chip), without buffers XLA:TPU
  placed in VMEM, and only the slices read of operands a fusion dynamic-slices.
"""
import dataclasses
import math
import re

import numpy as np

from train.hlo_text import (Computation, Instruction, operand_names, operand_sizes,
                            operand_text, parse_computations, replica_groups, shape_bytes,
                            shapes)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_CALLS_RE = re.compile(r"\b(?:calls|body|to_apply|true_computation|false_computation)="
                       r"%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
# Instructions that move no HBM bytes of their own: aliases, bookkeeping, control flow
# (the computations they call are counted instead), and the halves of async pairs.
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
               "call", "conditional", "after-all", "partition-id", "replica-id", "iota",
               "opt-barrier", "add-dependency", "copy-done", "all-gather-done",
               "all-reduce-done", "collective-permute-done", "async-done", "async-update",
               "send-done", "recv-done"}


def trip_count(instr: Instruction, comps: dict) -> int | None:
  """A while loop's trip count: XLA's known_trip_count annotation, else the constant its
  condition compares the counter with (a counter from 0, step 1: jax.lax.scan's loops); None
  where the bound is a runtime value."""
  found = _TRIP_RE.search(instr.args)
  if found:
    return int(found.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", instr.args)
  if cond and cond.group(1) in comps:
    for i in comps[cond.group(1)].instructions:
      if i.opcode == "constant" and re.match(r"s32\[\]|s64\[\]|u32\[\]", i.result):
        value = re.match(r"\s*(-?\d+)", i.args)
        if value:
          return int(value.group(1))
  return None


def _callees(instr: Instruction, comps: dict) -> list[tuple[str, int, bool]]:
  """(computation, runs per run of `instr`, fused?) for what `instr` calls. A reduction's
  to_apply (all-reduce, reduce, scatter, sort) is per element, not a program: skipped."""
  if instr.opcode == "while":
    body = re.search(r"body=%?([\w.\-]+)", instr.args)
    return [(body.group(1), trip_count(instr, comps), False)] if body else []
  if instr.opcode in ("fusion",):
    return [(n, 1, True) for n in _CALLS_RE.findall(instr.args)]
  if instr.opcode in ("call", "async-start", "custom-call"):
    return [(n, 1, False) for n in _CALLS_RE.findall(instr.args)
            if not instr.opcode == "custom-call" or "to_apply" not in instr.args]
  if instr.opcode == "conditional":
    branches = _BRANCHES_RE.search(instr.args)
    names = (re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches
             else _CALLS_RE.findall(instr.args))
    # One branch runs; counting each once bounds the step from above (branches are rare here).
    return [(n, 1, False) for n in names]
  return []


def multiplicities(comps: dict, entry: str) -> dict:
  """{computation: (times it runs per step, fused?)} for what ENTRY reaches, nested loops
  multiplied; a computation called from several places adds up its callers' runs.

  A loop whose bound is a runtime value (the causal block attention's loop over the key blocks
  a query block needs) counts (n + 1) / 2 trips inside a loop of n trips, the triangle of a
  causal mask, and 1 elsewhere; `unknown_trip_loops` lists them."""
  sites = {}   # callee -> [(caller, runs per caller run, fused call?)]
  bodies = {}  # loop body -> known trips
  for comp in comps.values():
    for instr in comp.instructions:
      for callee, times, _ in _callees(instr, comps):
        if instr.opcode == "while" and times:
          bodies[callee] = times
  for name, comp in comps.items():
    for instr in comp.instructions:
      for callee, times, fused in _callees(instr, comps):
        if callee in comps:
          if times is None:
            times = (bodies[name] + 1) / 2 if name in bodies else 1
          sites.setdefault(callee, []).append((name, times, fused))
  memo = {entry: (1, False)}

  def runs(name, seen=()):
    if name not in memo:
      callers = [(runs(c, seen + (name,)), t, f) for c, t, f in sites.get(name, ())
                 if c not in seen]
      memo[name] = (sum(r[0] * t for r, t, _ in callers),
                    any(f or r[1] for r, _, f in callers))
    return memo[name]

  reached = {name: runs(name) for name in comps}
  return {name: r for name, r in reached.items() if r[0] > 0}


@dataclasses.dataclass
class Collective:
  kind: str               # one of COLLECTIVES
  operand_bytes: int      # per device, all operands
  groups: np.ndarray | None   # [groups, size] logical device ids (pairs for a permute)
  times: int              # runs per step
  computation: str
  # An all-reduce of shards written into zeros (dynamic-update-slice): an all-gather in effect.
  # XLA:TPU compiles the FSDP weight gathers of a scanned layer this way.
  gather_like: bool = False
  # Across slices: a multi-slice program reaches other slices through host-transfer sends to
  # the megascale runtime (_xla_megascale_transfer_type), over DCN; this many slices take part.
  dcn_slices: int = 0


def _kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def _writes_into(instr: Instruction, comp: Computation, comps: dict) -> bool:
  """Whether an operand of `instr` comes out of a dynamic-update-slice (itself or a fusion that
  holds one)."""
  defs = {i.name: i for i in comp.instructions}
  for operand in operand_names(instr.args):
    d = defs.get(operand)
    if d is None:
      continue
    if d.opcode == "dynamic-update-slice":
      return True
    called = _CALLS_RE.findall(d.args) if d.opcode == "fusion" else []
    if called and called[0] in comps and any(
        i.opcode == "dynamic-update-slice" for i in comps[called[0]].instructions):
      return True
  return False


_MEGASCALE_RE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_TARGET_RE = re.compile(r'_xla_megascale_target="\{([\d,]*)\}')


def _megascale(instr: Instruction, comp: Computation) -> Collective | None:
  """A cross-slice collective (the send half of a megascale transfer), or None."""
  kind = _MEGASCALE_RE.search(instr.args) if instr.opcode == "send" else None
  if not kind:
    return None
  target = _MEGASCALE_TARGET_RE.search(instr.args)
  slices = len(target.group(1).split(",")) if target else 2
  return Collective(kind.group(1).lower().replace("_", "-"),
                    sum(operand_sizes(instr, comp)[:1]), None, 1, comp.name,
                    dcn_slices=slices)


def collectives(comps: dict, runs: dict, num_devices: int) -> list[Collective]:
  """Every collective instruction (an async pair once, at its -start) with its runs per step,
  cross-slice ones included."""
  out = []
  for name, (times, _) in runs.items():
    for instr in comps[name].instructions:
      across = _megascale(instr, comps[name])
      if across is not None and across.kind in COLLECTIVES:
        out.append(dataclasses.replace(across, times=times))
        continue
      kind = _kind(instr.opcode)
      if kind:
        out.append(Collective(
            kind, sum(operand_sizes(instr, comps[name])),
            replica_groups(instr.args, num_devices), times, name,
            kind == "all-reduce" and _writes_into(instr, comps[name], comps)))
  return out


def _dot_flops(instr: Instruction, comp: Computation) -> float:
  out = math.prod(shapes(instr.result)[0]) if shapes(instr.result) else 0
  operands = shapes(operand_text(instr.args)) or [
      (shapes(comp.types.get(n, "")) or [()])[0] for n in operand_names(instr.args)]
  if instr.opcode == "dot" and operands:
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.args)
    contracted = [int(d) for d in dims.group(1).split(",") if d] if dims else []
    return 2.0 * out * math.prod(operands[0][d] for d in contracted)
  if instr.opcode == "convolution" and len(operands) > 1:
    return 2.0 * out * _conv_taps(instr.args, operands[0], operands[1])
  return 0.0


def _conv_taps(args: str, lhs: tuple, rhs: tuple) -> float:
  """Multiply-adds per output element of a convolution: input features x the window taps that
  land on real (unpadded) input. XLA:TPU writes batched matmuls as convolutions whose window
  slides over a padded size-1 dimension (window 32, padding 31 each side): one real tap."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->", args)
  if not labels:
    return math.prod(rhs) / max(rhs[-1], 1)
  lhs_labels, rhs_labels = labels.group(1), labels.group(2)
  sizes = re.search(r"window=\{size=([\dx]+)", args)
  window = [int(w) for w in sizes.group(1).split("x")] if sizes else []
  dilated = re.search(r"lhs_dilate=([\dx]+)", args)
  dilation = [int(d) for d in dilated.group(1).split("x")] if dilated else [1] * len(window)
  taps = 1
  for d, (w, dil) in enumerate(zip(window, dilation)):
    # Real inputs under a window of w: at most the dimension's size, and with the input
    # dilated by dil (zeros between), one in every dil positions.
    pos = lhs_labels.find(str(d))
    real = lhs[pos] if 0 <= pos < len(lhs) else w
    taps *= min(real, -(-w // dil))
  return rhs[rhs_labels.index("i")] * taps


def _sliced_params(comp: Computation, comps: dict, cache: dict) -> dict:
  """{parameter index: bytes actually read} for fusion parameters read only through
  dynamic-slice (a scanned layer's slice of the stacked weights, an attention block of the
  stacked keys), updated in place by dynamic-update-slice, or handed to a nested fusion that
  does either; and under 'root' the bytes written where the result is an in-place update."""
  if comp.name in cache:
    return cache[comp.name]
  params = {i.name: int(re.match(r"\s*(\d+)", i.args).group(1)) for i in comp.instructions
            if i.opcode == "parameter" and re.match(r"\s*(\d+)", i.args)}
  users = {}
  for i in comp.instructions:
    for pos, operand in enumerate(operand_names(i.args)):
      users.setdefault(operand, []).append((i, pos))
  out = {}
  for pname, index in params.items():
    read = _read_through(users.get(pname, []), comps, cache)
    if read is not None:
      out[index] = read
  root = next((i for i in comp.instructions if i.name == _root_name(comp)), None)
  if root is not None and any(i.opcode == "dynamic-update-slice" for i in comp.instructions):
    out["root"] = _written_bytes(root, comp)
  cache[comp.name] = out
  return out


def _read_through(uses: list, comps: dict, cache: dict) -> int | None:
  """Bytes a value's `uses` [(instruction, operand position)] read of it when each reads a
  slice (or writes one in place); None when any reads it whole."""
  total = 0
  for user, pos in uses:
    if user.opcode in ("dynamic-slice", "dynamic-update-slice") and pos == 0:
      total += shape_bytes(user.result) if user.opcode == "dynamic-slice" else 0
    elif user.opcode == "fusion":
      called = _CALLS_RE.findall(user.args)
      nested = (_sliced_params(comps[called[0]], comps, cache)
                if called and called[0] in comps else {})
      if pos not in nested:
        return None
      total += nested[pos]
    else:
      return None
  return total if uses else None


def _root_name(comp: Computation) -> str | None:
  return comp.root or (comp.instructions[-1].name if comp.instructions else None)


def _written_bytes(instr: Instruction, comp: Computation) -> int:
  """Bytes a fusion's root writes: a dynamic-update-slice (through bitcasts, inside a tuple)
  writes only its update."""
  defs = {i.name: i for i in comp.instructions}
  if instr.opcode == "tuple":
    return sum(_written_bytes(defs[n], comp) if n in defs else 0
               for n in operand_names(instr.args))
  while instr.opcode == "bitcast" and operand_names(instr.args)[0] in defs:
    instr = defs[operand_names(instr.args)[0]]
  if instr.opcode == "dynamic-update-slice":
    update = operand_names(instr.args)[1:2]
    return shape_bytes(comp.types.get(update[0], "")) if update else 0
  return shape_bytes(instr.result, hbm_only=True)


def _traffic(instr: Instruction, comp: Computation, comps: dict, cache: dict) -> int:
  """HBM bytes one run of a top-level instruction of `comp` reads and writes."""
  if instr.opcode in _NO_TRAFFIC:
    return 0
  sizes = operand_sizes(instr, comp, hbm_only=True)
  result = shape_bytes(instr.result, hbm_only=True)
  if instr.opcode == "dynamic-slice":
    return 2 * result
  if instr.opcode == "dynamic-update-slice":
    return 2 * (sizes[1] if len(sizes) > 1 else result)
  if instr.opcode == "fusion":
    called = _CALLS_RE.findall(instr.args)
    sliced = (_sliced_params(comps[called[0]], comps, cache)
              if called and called[0] in comps else {})
    sizes = [sliced.get(k, s) for k, s in enumerate(sizes)]
    result = sliced.get("root", result)
  return sum(sizes) + result


@dataclasses.dataclass
class StepCounts:
  flops: float            # per device per step, loops multiplied out
  hbm_bytes: float        # per device per step
  collectives: list       # [Collective]
  loops: list             # [(body computation, trip count)]


def walk(hlo_text: str, num_devices: int) -> StepCounts:
  """FLOPs, HBM bytes and collectives per device per step of a compiled module's text. A
  multi-slice program covers one slice (num_partitions): its replica groups count within it."""
  partitions = re.search(r"num_partitions=(\d+)", hlo_text[:5000])
  num_devices = min(num_devices, int(partitions.group(1))) if partitions else num_devices
  comps, entry = parse_computations(hlo_text)
  runs = multiplicities(comps, entry)
  flops = hbm = 0.0
  loops, cache = [], {}
  for name, (times, fused) in runs.items():
    for instr in comps[name].instructions:
      if instr.opcode in ("dot", "convolution"):
        flops += times * _dot_flops(instr, comps[name])
      if not fused:
        hbm += times * _traffic(instr, comps[name], comps, cache)
      if instr.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", instr.args)
        loops.append((body.group(1) if body else "?", trip_count(instr, comps)))   # None: runtime
  return StepCounts(flops, hbm, collectives(comps, runs, num_devices), loops)


def count_by_kind(found: list) -> dict:
  """{kind: runs per step} over `collectives(...)`'s records, and how many of the all-reduces
  gather shards ("all-reduce as all-gather")."""
  counts = dict.fromkeys(COLLECTIVES + ("all-reduce as all-gather",), 0)
  for c in found:
    counts[c.kind] += c.times
    counts["all-reduce as all-gather"] += c.times if c.gather_like else 0
  return {k: round(v) for k, v in counts.items()}   # runtime-bounded loops give halves
