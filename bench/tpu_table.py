r"""The TPU memory table: presets x slices x remat x sharding, compiled by libtpu on this host.

  pip install -r requirements-tpu.txt
  python -m bench.tpu_table --presets=base,llama3_8b --topologies=v5p-128,v5e-256 \
      --remat=none,dots,full --shardings=fsdp,fsdp_tensor4 --out=tpu_table

Each point is `train.main --aot_only --aot_topology=...` (train/aot.py: the real train step
with its real shardings, compiled for the slice) in its own process with a timeout, so one
slow or failing compile costs its row, not the table. Rows go to `<out>.jsonl` as they finish
(a re-run skips points already there) and the Markdown table to `<out>.md`.

By default each point compiles the preset's full depth: the pod presets set
`model.scan_layers` (one scanned block), so a 32-layer compile costs about what one layer costs.
`--layers=1,2` instead compiles depths 1 and 2 and extrapolates per-chip memory linearly to the
preset's depth (per-layer parameters, optimizer state, gradients and saved activations grow with
depth; embedding, head and logits do not): for `--scan=false`, where XLA unrolls every layer
and full-depth compiles take too long on a small host. The rows say which they are.
"""
import json
import os
import re
import subprocess
import sys

from absl import app, flags

from model import errors
from model import log_setup

GiB = 2 ** 30
SHARDINGS = {  # mesh axes: fsdp over what the tensor axis leaves; on a multi-slice topology
    # (2xv5p-128) data spans the slices over DCN unless the layout says otherwise
    "fsdp": dict(data=1, fsdp=-1, tensor=1),
    "fsdp_tensor4": dict(data=1, fsdp=-1, tensor=4),
    "fsdp_tensor8": dict(data=1, fsdp=-1, tensor=8),
    "fsdp_over_dcn": dict(data=1, fsdp=-1, tensor=1, dcn_fsdp="slices"),
}

_PRESETS = flags.DEFINE_list("presets", ["base", "llama3_8b"],
                             "configs/legal_pretrain.py presets")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5p-128", "v5e-256"], "TPU slice names")
_REMAT = flags.DEFINE_list("remat", ["none", "dots", "full"], "config.model.remat values")
_SHARDINGS = flags.DEFINE_list("shardings", ["fsdp", "fsdp_tensor4"],
                               f"mesh layouts: {', '.join(SHARDINGS)}")
_LAYERS = flags.DEFINE_list("layers", [], "Compile these depths and extrapolate (two values), "
                            "or empty: the preset's full depth.")
_SCAN = flags.DEFINE_bool("scan", True, "config.model.scan_layers (one scanned block).")
_OUT = flags.DEFINE_string("out", "tpu_table", "Writes <out>.jsonl and <out>.md.")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds per compile.")
_SEQ = flags.DEFINE_integer("seq_len", 0, "config.data.seq_len; 0: the preset's.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "config.data.batch_size (global rows); 0: the "
                              "preset's.")
_ONE = flags.DEFINE_string("one", None, "Internal: compile one point (JSON) and print its row.")


def compile_point(point: dict) -> dict:
  """train/aot.report for one point, in this process (needs libtpu)."""
  from configs import legal_pretrain
  from train import aot, topologies
  config = legal_pretrain.get_config(point["preset"])
  config.model.remat = point["remat"]
  config.model.scan_layers = point.get("scan", True)
  slices = topologies.parse(point["topology"]).num_slices
  layout = point.get("mesh") or SHARDINGS[point["sharding"]]   # an explicit mesh: the planner's
  layout = {k: slices if v == "slices" else v for k, v in layout.items()}
  layout.setdefault("dcn_data", 1 if "dcn_fsdp" in layout else slices)
  config.mesh.update(layout)
  for key in ("seq_len", "batch_size"):
    if point.get(key):
      config.data[key] = point[key]
  config.optim.grad_accum_steps = point.get("grad_accum_steps") or 1
  if point.get("num_layers"):
    config.model.num_layers = point["num_layers"]
  return aot.report(config, topology=point["topology"])


def run_point(point: dict, timeout: float) -> dict:
  """compile_point in a child process (a hang or crash costs this point only): its row, or the
  point with an error."""
  cmd = [sys.executable, "-m", "bench.tpu_table", f"--one={json.dumps(point)}"]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**point, "error": f"compile did not finish in {timeout:.0f} s"}
  rows = [line for line in res.stdout.splitlines() if line.startswith("ROW ")]
  if res.returncode or not rows:
    lines = res.stderr.strip().splitlines() or ["no output"]
    # The exception's own line, not JAX's note about filtered frames printed after it.
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return {**point, "error": (errors or lines)[-1][:300]}
  return {**point, **json.loads(rows[-1][4:])}


def _full_depth(preset: str) -> int:
  from configs import legal_pretrain
  return legal_pretrain.get_config(preset).model.num_layers


def extrapolate(at1: dict, at2: dict, depth: int) -> dict:
  """Per-chip bytes at `depth` from the 1- and 2-layer compiles (linear in depth)."""
  out = {}
  for key in ("argument_size_in_bytes", "temp_size_in_bytes", "total_bytes"):
    if key in at1 and key in at2:
      out[key] = at1[key] + (at2[key] - at1[key]) * (depth - 1)
  # A point the compiler refused (temporaries > HBM) has only its temporaries.
  out["fits"] = (at1.get("fits", False) and at2.get("fits", False) and
                 out.get("total_bytes", float("inf")) <= at1["hbm_per_device_bytes"])
  return out


def _gib(mem: dict, key: str) -> str:
  return f"{mem[key] / GiB:.2f}" if key in mem else "-"


def table(rows: list[dict], layers: list[int]) -> str:
  lines = ["| preset | slice | remat | sharding | mesh | depth | arguments GiB | temp GiB "
           "| total GiB | HBM GiB | fits | compile s | predicted step ms (overlap / none) "
           "| bound | tokens/s/chip | MFU bound |", "|" + " --- |" * 16]
  groups = {}
  for r in rows:
    key = (r["preset"], r["topology"], r["remat"], r["sharding"], r.get("seq_len"),
           r.get("batch_size"))
    groups.setdefault(key, {})[r.get("num_layers") or 0] = r
  for (preset, topo, remat, sharding, seq, batch), by_depth in groups.items():
    label = f"{preset} (seq {seq or '-'}, batch {batch or '-'})" if seq or batch else preset
    errors = [r["error"] for r in by_depth.values() if "error" in r]
    if errors:
      lines.append(f"| {label} | {topo} | {remat} | {sharding} | | | | | | | error: "
                   f"{errors[0][:80]} | | | | | |")
      continue
    if len(layers) == 2:
      if not all(d in by_depth for d in layers):
        continue
      a, b = by_depth[layers[0]], by_depth[layers[1]]
      mem = extrapolate(a, b, _full_depth(preset))
      first, note, secs = a, " (extrapolated)", a["compile_s"] + b["compile_s"]
      depth = f"{layers[0]},{layers[1]} -> {_full_depth(preset)}"
    else:
      first = mem = by_depth[0]
      note, secs = "", first["compile_s"]
      depth = f"{_full_depth(preset)}{' (scanned)' if first.get('scan') else ''}"
    mesh = "x".join(f"{k}{v}" for k, v in first["mesh"].items() if v > 1)
    over = mem.get("total_bytes", mem["temp_size_in_bytes"]) - first["hbm_per_device_bytes"]
    fits = "yes" if mem["fits"] else f"no, by {max(over, 0) / GiB:.1f}+ GiB"
    lines.append(
        f"| {label} | {topo} | {remat} | {sharding} | {mesh} | {depth} | "
        f"{_gib(mem, 'argument_size_in_bytes')} | {_gib(mem, 'temp_size_in_bytes')}{note} | "
        f"{_gib(mem, 'total_bytes')} | {first['hbm_per_device_bytes'] / GiB:.0f} | "
        f"{fits} | {secs:.0f} | {_prediction(first)} |")
  return "\n".join(lines) + "\n"


def _prediction(row: dict) -> str:
  """The step-time columns (train/step_model.py), blank where the compile gave none."""
  if "predicted_step_s" not in row:
    return " | | |"
  per_chip = row["tokens_per_step"] / row.get("chips", row["devices"])
  return (f"{1e3 * row['predicted_step_s']:.0f} / {1e3 * row['predicted_step_no_overlap_s']:.0f}"
          f" | {row['bound']} | {per_chip / row['predicted_step_s']:,.0f} | "
          f"{100 * row['mfu_bound']:.0f}%")


def main(argv):
  log_setup.quiet_libraries()
  del argv
  if _ONE.value:
    row = compile_point(json.loads(_ONE.value))
    print("ROW " + json.dumps(row, default=str), flush=True)
    return
  layers = [int(x) for x in _LAYERS.value if x]
  if len(layers) not in (0, 2):
    raise app.UsageError("--layers: two depths to extrapolate from, or empty for full depth")
  for name in _SHARDINGS.value:
    if name not in SHARDINGS:
      raise app.UsageError(f"--shardings={name}: expected one of {sorted(SHARDINGS)}")
  path = _OUT.value + ".jsonl"
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  done = {json.dumps({k: r.get(k) for k in ("preset", "topology", "remat", "sharding",
                                            "num_layers", "scan", "seq_len", "batch_size")},
                     sort_keys=True) for r in rows}
  for preset in _PRESETS.value:
    for topology in _TOPOLOGIES.value:
      for sharding in _SHARDINGS.value:
        for remat in _REMAT.value:
          for depth in layers or [None]:
            point = dict(preset=preset, topology=topology, remat=remat, sharding=sharding,
                         num_layers=depth, scan=_SCAN.value, seq_len=_SEQ.value or None,
                         batch_size=_BATCH.value or None)
            if json.dumps(point, sort_keys=True) in done:
              continue
            row = run_point(point, _TIMEOUT.value)
            rows.append(row)
            with open(path, "a") as f:
              f.write(json.dumps(row, default=str) + "\n")
            status = row.get("error") or (
                f"{row['total_bytes'] / GiB:.2f} GiB/chip" if row["fits"] else
                f"does not fit ({row['temp_size_in_bytes'] / GiB:.2f} GiB temporaries)")
            print(f"{preset} {topology} {sharding} remat={remat} layers={depth}: "
                  f"{status} ({row.get('compile_s', 0):.0f} s)", flush=True)
            with open(_OUT.value + ".md", "w") as f:
              f.write(table(rows, layers))
  print(table(rows, layers))


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
