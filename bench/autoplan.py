r"""A sharding planner: the fastest plan that fits, by compiling candidates for a TPU slice.

  python -m bench.autoplan --preset=llama3_8b --topology=v5e-256 --budget_s=1800

Searches the mesh (every axis of model/sharding.MESH_AXES within a slice, and which axis spans
the slices of a multi-slice topology over DCN), the remat policy (none / dots / full) and the
micro-batches (config.optim.grad_accum_steps). Each candidate is compiled by libtpu in its own
process with a timeout (bench/tpu_table.run_point); what does not fit is dropped, and the plans
that fit are ranked by predicted step time (train/step_model.py), with the train.main command
for the best.

Pruning, so the search spends a time budget on the plans most likely to win:
- divisibility: the batch over data x fsdp x micro-batches, heads / kv heads / MLP over tensor;
- a memory floor: f32 params + AdamW moments + gradients (16 bytes a parameter) over the axes
  that shard them, plus the saved activations at 80% of the per-token bytes measured in
  docs/results/tpu_compile.md; a candidate whose floor passes HBM is never compiled;
- order: candidates are compiled best analytic estimate first (compute with the remat's
  recompute, plus FSDP / tensor-parallel bytes over ICI), within a mesh the cheapest remat
  first and more micro-batches only when none fits; the search stops at --budget_s.
"""
import dataclasses
import itertools
import json
import math
import os
import time

from absl import app, flags

from bench import tpu_table
from model import errors
from model import log_setup

_PRESET = flags.DEFINE_string("preset", "llama3_8b", "configs/legal_pretrain.py preset")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-256", "TPU slice name (2xv5p-128: 2 slices)")
_BUDGET = flags.DEFINE_integer("budget_s", 1800, "Compile candidates for at most this many "
                               "seconds in all (the last one gets the time left).")
_TIMEOUT = flags.DEFINE_integer("candidate_timeout", 600, "Seconds per candidate compile.")
_MAX_TENSOR = flags.DEFINE_integer("max_tensor", 8, "Largest tensor-parallel axis tried.")
_LADDER = flags.DEFINE_integer("ladder", 3, "Plans tried per mesh at most (fastest estimate "
                               "first).")
_ACCUM = flags.DEFINE_list("grad_accum", ["1", "2", "4"], "Micro-batch counts tried.")
_SEQ, _BATCH = tpu_table._SEQ, tpu_table._BATCH   # --seq_len, --batch_size: shared flags
_OUT = flags.DEFINE_string("plan_out", "autoplan", "Appends compiled candidates to "
                           "<plan_out>.jsonl.")

REMATS = ("none", "dots", "full")        # least recompute first
RECOMPUTE = {"none": 1.0, "dots": 1.05, "full": 4 / 3}   # executed / model FLOPs (matmuls)
# Saved activation bytes per token per layer per d_model: 80% of what the compiles measured
# (llama3_8b on v5e-256, fsdp 256, seq 4096: temporaries / (32 layers x 4096 tokens x 4096) =
# none 84, dots 31, full 4), so a plan is dropped only when it misses HBM by 20%+.
ACTIVATION_BYTES = {"none": 67, "dots": 25, "full": 3}
STATE_BYTES = 16   # f32 param + AdamW mu, nu + f32 gradient, per parameter


def axis_divides(config, model_cfg) -> dict:
  """{axis: number its size must divide} for axes with a model-side constraint. An axis of
  model/sharding.MESH_AXES that is not here (and not data / fsdp) stays 1 until given a rule."""
  return {"tensor": math.gcd(model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.mlp_dim),
          "context": config.data.seq_len}


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh: tuple          # ((axis, in-slice size), ..., ("dcn_<axis>", slices), ...)
  remat: str
  grad_accum_steps: int

  @property
  def mesh_dict(self) -> dict:
    return dict(self.mesh)

  def command(self, preset: str, topology: str, data: dict) -> str:
    keys = [f"--config.mesh.{k}={v}" for k, v in self.mesh] + [
        f"--config.model.remat={self.remat}",
        f"--config.optim.grad_accum_steps={self.grad_accum_steps}"] + [
        f"--config.data.{k}={v}" for k, v in data.items() if v]
    return (f"python -m train.main --config=configs/legal_pretrain.py:{preset} "
            + " ".join(keys) + f"  # on {topology}; add --aot_only --aot_topology={topology} "
            "to re-check")


def _factorizations(n: int, k: int):
  """Every k-tuple of positive integers whose product is n."""
  if k == 1:
    yield (n,)
    return
  for d in range(1, n + 1):
    if n % d == 0:
      for rest in _factorizations(n // d, k - 1):
        yield (d,) + rest


def meshes(axes: tuple, slice_devices: int, num_slices: int, limits: dict, batch: int,
           max_tensor: int) -> list[tuple]:
  """In-slice axis sizes (and the DCN axis for several slices) that divide the model and the
  batch. Data and fsdp split the batch; other axes only with a rule in `limits`."""
  dcn_axes = ("data", "fsdp") if num_slices > 1 else ("data",)
  out = []
  for sizes in _factorizations(slice_devices, len(axes)):
    mesh = dict(zip(axes, sizes))
    if any(n > 1 and (a not in limits and a not in ("data", "fsdp") or
                      a in limits and limits[a] % n) for a, n in mesh.items()):
      continue
    if mesh.get("tensor", 1) > max_tensor:
      continue
    for dcn_axis in dcn_axes:
      rows = mesh["data"] * mesh["fsdp"] * num_slices
      if batch % rows == 0:
        dcn = {f"dcn_{a}": (num_slices if a == dcn_axis else 1) for a in ("data", "fsdp")}
        out.append(tuple(mesh.items()) + tuple(dcn.items()))
  return out


def param_count(model_cfg, vocab: int) -> float:
  from train import metrics
  embed = model_cfg.d_model * vocab * (1 if model_cfg.tie_embeddings else 2)
  return metrics.block_params(model_cfg) + embed


def memory_floor(plan: Plan, model_cfg, params: float, tokens: int, devices: int) -> float:
  """Bytes per device no compile can go below (state over its shards + saved activations)."""
  m = plan.mesh_dict
  tensor = m.get("tensor", 1)
  shards = m["fsdp"] * m.get("dcn_fsdp", 1) * tensor
  rows = m["data"] * m["fsdp"] * m.get("dcn_data", 1) * m.get("dcn_fsdp", 1)
  # Tensor parallelism splits a layer's MLP / heads activations, not the residual: / tensor
  # keeps this a floor.
  tokens_here = tokens / plan.grad_accum_steps / rows / tensor
  act = model_cfg.num_layers * tokens_here * model_cfg.d_model * ACTIVATION_BYTES[plan.remat]
  return STATE_BYTES * params / shards + act


def estimate_s(plan: Plan, chip, model_flops: float, params: float, tokens: int,
               devices: int, model_cfg) -> float:
  """Analytic seconds per step for ordering the compiles: compute with recompute, plus bytes
  over ICI: FSDP weight gathers (bf16; forward, remat forward, backward: 3 per micro-batch),
  the f32 gradient reduction over data x fsdp, tensor-parallel activation all-reduces (4 per
  layer); the share of those that crosses slices over DCN."""
  m = plan.mesh_dict
  fsdp, tensor = m["fsdp"] * m.get("dcn_fsdp", 1), m.get("tensor", 1)
  replicas = m["data"] * m.get("dcn_data", 1)
  compute = model_flops * RECOMPUTE[plan.remat] / devices / chip.peak_bf16_flops
  shard = params / tensor
  gathers = 3 * plan.grad_accum_steps * 2 * shard * (fsdp - 1) / fsdp
  grads = 2 * 4 * shard / fsdp * (replicas * fsdp - 1) / (replicas * fsdp)
  tp = (4 * model_cfg.num_layers * 2 * tokens / (devices / tensor) * model_cfg.d_model
        * 2 * (tensor - 1) / tensor)
  dcn = grads / fsdp if m.get("dcn_data", 1) > 1 else (
      gathers + grads if m.get("dcn_fsdp", 1) > 1 else 0.0)
  return compute + (gathers + grads + tp) / chip.ici_bw + dcn / chip.dcn_bw


def search_order(plans: list, estimate) -> list:
  """[(mesh, its plans fastest estimate first)], meshes by their best estimate. The search
  stops a mesh at its first plan that fits: the rest of its ladder is estimated slower."""
  by_mesh = {}
  for p in plans:
    by_mesh.setdefault(p.mesh, []).append(p)
  ladders = [(mesh, sorted(ps, key=lambda p: (estimate(p), p.grad_accum_steps)))
             for mesh, ps in by_mesh.items()]
  return sorted(ladders, key=lambda item: estimate(item[1][0]))


def rank(rows: list) -> list:
  """Compiled rows that fit, fastest predicted step first; at equal steps (to the millisecond)
  the one with more HBM left, which is the safer to run."""
  return sorted((r for r in rows if r.get("fits") and "predicted_step_s" in r),
                key=lambda r: (round(r["predicted_step_s"], 3), r.get("total_bytes", 0)))


def _setup(preset: str, topology: str):
  from configs import legal_pretrain
  from model.config import ModelConfig
  from train import metrics, topologies
  config = legal_pretrain.get_config(preset)
  if _SEQ.value:
    config.data.seq_len = _SEQ.value
  if _BATCH.value:
    config.data.batch_size = _BATCH.value
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  tpu_slice = topologies.parse(topology)
  tokens = config.data.batch_size * config.data.seq_len
  flops = metrics.train_flops_per_token(model_cfg, config.data.seq_len) * tokens
  return config, model_cfg, tpu_slice, tokens, flops


def candidates(config, model_cfg, tpu_slice, tokens: int, flops: float) -> tuple[list, int]:
  """(ordered [(mesh, ladder)], how many plans the memory floor dropped)."""
  from model import sharding
  params = param_count(model_cfg, config.data.vocab_size)
  devices = tpu_slice.num_chips
  limits = axis_divides(config, model_cfg)
  accum = [int(a) for a in _ACCUM.value]
  plans, dropped = [], 0
  for mesh in meshes(sharding.MESH_AXES, tpu_slice.slice_chips, tpu_slice.num_slices, limits,
                     config.data.batch_size, _MAX_TENSOR.value):
    rows = dict(mesh)["data"] * dict(mesh)["fsdp"] * tpu_slice.num_slices
    for remat, k in itertools.product(REMATS, accum):
      if (config.data.batch_size // k) % rows or config.data.batch_size % k:
        continue
      plan = Plan(mesh, remat, k)
      if memory_floor(plan, model_cfg, params, tokens, devices) > tpu_slice.chip.hbm_bytes:
        dropped += 1
        continue
      plans.append(plan)
  estimate = lambda p: estimate_s(p, tpu_slice.chip, flops, params, tokens, devices, model_cfg)
  return search_order(plans, estimate), dropped


def main(argv):
  del argv
  log_setup.quiet_libraries()
  config, model_cfg, tpu_slice, tokens, flops = _setup(_PRESET.value, _TOPOLOGY.value)
  order, dropped = candidates(config, model_cfg, tpu_slice, tokens, flops)
  total = sum(len(ladder) for _, ladder in order)
  print(f"{_PRESET.value} on {_TOPOLOGY.value}: {len(order)} meshes, {total} plans to try "
        f"({dropped} dropped by the memory floor); budget {_BUDGET.value} s", flush=True)
  data = {"seq_len": _SEQ.value, "batch_size": _BATCH.value}
  rows, start, done = [], time.time(), _earlier(_OUT.value + ".jsonl")
  for mesh, ladder in order:
    for plan in ladder[:_LADDER.value]:
      # The budget is a wall: the last candidate gets only the time left, so the whole search
      # (default 1800 s) ends within it, not a candidate timeout later.
      left = _BUDGET.value - (time.time() - start)
      if left < min(_TIMEOUT.value, 60):
        break
      if _key(plan.mesh_dict, plan.remat, plan.grad_accum_steps) in done:   # a re-run resumes
        row = done[_key(plan.mesh_dict, plan.remat, plan.grad_accum_steps)]
        rows.append(row)
        if row.get("fits"):
          break
        continue
      point = dict(preset=_PRESET.value, topology=_TOPOLOGY.value, remat=plan.remat,
                   sharding="plan", mesh=plan.mesh_dict, plan_mesh=plan.mesh_dict,
                   grad_accum_steps=plan.grad_accum_steps, scan=True,
                   seq_len=_SEQ.value or None, batch_size=_BATCH.value or None)
      row = tpu_table.run_point(point, min(_TIMEOUT.value, left))
      rows.append(row)
      with open(_OUT.value + ".jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
      status = row.get("error") or (
          f"fits, predicted {1e3 * row['predicted_step_s']:.0f} ms" if row.get("fits")
          else "does not fit")
      print(f"  {plan.mesh_dict} remat={plan.remat} accum={plan.grad_accum_steps}: {status} "
            f"({time.time() - start:.0f} s)", flush=True)
      if row.get("fits"):
        break   # the rest of this mesh's ladder is estimated slower
  print(report(rank(rows), _PRESET.value, _TOPOLOGY.value, data, len(rows)))


def _key(mesh: dict, remat: str, accum: int) -> str:
  return json.dumps([sorted(mesh.items()), remat, accum])


def _earlier(path: str) -> dict:
  """Rows an earlier run of the same --plan_out compiled, by plan."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {_key(r["plan_mesh"], r["remat"], r.get("grad_accum_steps") or 1): r for r in rows}


def report(ranked: list, preset: str, topology: str, data: dict, tried: int) -> str:
  lines = [f"{len(ranked)} of {tried} compiled plans fit; by predicted step (perfect overlap):",
           "| mesh | remat | micro-batches | GiB/chip | step ms (overlap / none) | bound "
           "| MFU bound |", "|" + " --- |" * 7]
  for r in ranked:
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1"
    lines.append(f"| {mesh} | {r['remat']} | {r.get('grad_accum_steps', 1)} | "
                 f"{r['total_bytes'] / 2**30:.2f} | {1e3 * r['predicted_step_s']:.0f} / "
                 f"{1e3 * r['predicted_step_no_overlap_s']:.0f} | {r['bound']} | "
                 f"{100 * r['mfu_bound']:.0f}% |")
  if ranked:
    best = ranked[0]
    plan = Plan(tuple(best["plan_mesh"].items()), best["remat"], best["grad_accum_steps"])
    lines.append("best: " + plan.command(preset, topology, data))
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
