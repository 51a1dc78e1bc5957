"""HLO module text, parsed: computations, instructions, array shapes and their bytes, operands,
replica groups. What train/hlo_walk.py walks.
"""
import dataclasses
import math
import re

import numpy as np

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([0-9,]*)\]")
_LAYOUT_RE = re.compile(r"\{[^{}]*\}")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def shape_bytes(text: str, hbm_only: bool = False) -> int:
  """Bytes of every array shape in `text` (a tuple's elements add up). `hbm_only` skips
  buffers XLA:TPU placed in on-chip memory: a layout marked S(1) (memory space 1, VMEM)."""
  total = 0
  for found in _SHAPE_RE.finditer(text):
    if hbm_only and _LAYOUT_RE.match(text, found.end()) and "S(1)" in _LAYOUT_RE.match(
        text, found.end()).group(0):
      continue
    dtype, dims = found.groups()
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += int(n * _BYTES.get(dtype, 1))
  return total


def shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE_RE.findall(text)]


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  result: str      # the result type text, e.g. "bf16[8,512]{1,0}" or a tuple
  args: str        # everything after the opening parenthesis: operands, then attributes


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list
  types: dict = dataclasses.field(default_factory=dict)   # instruction name -> result type
  root: str | None = None


def parse_computations(hlo_text: str) -> tuple[dict, str]:
  """({name: Computation}, entry name) of an HLO module's text."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER_RE.match(line)
    if header:
      current = Computation(header.group(2), [])
      comps[current.name] = current
      if header.group(1):
        entry = current.name
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    found = _INSTR_RE.match(line)
    if found:
      instr = Instruction(found.group(1), found.group(3), found.group(2), found.group(4))
      current.instructions.append(instr)
      if line.lstrip().startswith("ROOT "):
        current.root = instr.name
      current.types[instr.name] = instr.result
  if entry is None:
    raise ValueError("HLO text has no ENTRY computation")
  return comps, entry


def replica_groups(args: str, num_devices: int) -> np.ndarray | None:
  """A collective's groups as a [groups, size] array of logical device ids, from any spelling:
  {{0,1},{2,3}}; the iota form [2,2]<=[4] / [2,2]<=[2,2]T(1,0); the mesh form
  mesh['data'=2,'fsdp'=4] {'fsdp'}; source_target_pairs (a permute's pairs). An empty
  replica_groups={} is all devices in one group."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", args)
  if mesh:
    axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(2))]
    rest = [i for i in range(len(names)) if i not in grouped]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + grouped)
    return ids.reshape(-1, math.prod(sizes[i] for i in grouped))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", args)
  if iota:
    shape = [int(x) for x in iota.group(1).split(",")]
    dims = [int(x) for x in iota.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
      ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1)
  listed = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)?\}", args)
  if listed and listed.group(1):
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", listed.group(1))]
    return np.array(groups)
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", args)
  if pairs:
    return np.array([[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(0))])
  return np.arange(num_devices)[None, :] if num_devices else None


def operand_text(args: str) -> str:
  """The operand list at the start of `args` (up to its closing parenthesis; layouts such as
  {1,0:T(8,128)(2,1)} hold balanced parentheses of their own)."""
  depth = 0
  for i, ch in enumerate(args):
    if ch == "(":
      depth += 1
    elif ch == ")":
      if depth == 0:
        return args[:i]
      depth -= 1
  return args


def operand_names(args: str) -> list[str]:
  return re.findall(r"%([\w.\-]+)", operand_text(args))


def operand_sizes(instr: Instruction, comp: Computation, hbm_only: bool = False) -> list[int]:
  """Bytes of each operand: from the shapes printed with the operands where the text has them
  (older XLA), else from the defining instructions' result types in `comp`."""
  text = operand_text(instr.args)
  if _SHAPE_RE.search(text):
    return [shape_bytes(o, hbm_only) for o in re.split(r",\s*(?=[a-z]\w*\[|\()", text)]
  return [shape_bytes(comp.types.get(n, ""), hbm_only) for n in operand_names(instr.args)]
