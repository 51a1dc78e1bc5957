r"""Structured pruning: remove whole attention heads and MLP channels from a trained run, with
real shape changes, and write the smaller model as a run of its own.

  python -m infer.prune --workdir=runs/imdb_ft --sparsity=0.5 --out=runs/imdb_ft_p50
  python -m infer.serve --workdir=runs/imdb_ft_p50          # a pruned run serves like any run
  # a short fine-tune: init_from adopts the pruned architecture (num_heads, mlp_dim, ...)
  python -m train.main --config=configs/sentiment_finetune.py:imdb10k --workdir=runs/p50_ft \
      --config.train.init_from=runs/imdb_ft_p50 --config.train.num_epochs=0.25

What is removed. The model needs the same shapes in every layer, so every layer loses the same
number of units, and each layer chooses its own by importance:
  heads  with grouped-query attention (num_kv_heads > 1) the unit is a KV group: one key/value
         head and the num_heads / num_kv_heads query heads that read it, so the grouping stays
         valid (MHA is groups of one). With multi-query attention (num_kv_heads == 1) the unit
         is a query head and the single key/value head stays. Kept: round(units * (1 -
         sparsity)), at least one.
  mlp    channels of the hidden layer: a column of wi (and wg for SwiGLU) and a row of wo.
Kept units stay in their original order. Nothing else in the forward pass depends on the head
count or the MLP width, so with sparsity 0 the pruned model is the original bit for bit.

Importance (`--criterion`):
  magnitude  weights only, no data: a query head scores ||W_o[h]|| * ||W_v[kv(h)]|| (the
             path its values take to the residual stream), an MLP channel ||wi[:, j]|| *
             ||wg[:, j]|| * ||wo[j]|| (SwiGLU; GELU has no wg); a group sums its query heads.
  taylor     gradient-based (first-order Taylor, Molchanov et al. 2019): the loss change of
             scaling a unit's output by a gate, dL/dgate = sum(W ⊙ dL/dW) over the unit's
             output-projection slice (W_o[h] for a head, wo[j] for a channel), squared and
             averaged over calibration batches. The loss is the run's own task loss on
             `--calibration_file` (JSONL with the run's text and, for a classifier, label
             fields; default: the run's data.train_file, never its test file).
  random     seeded random scores: the baseline importance has to beat.

The written run is `<out>/checkpoints/<step>/` (params and the run's record, written by
model/checkpoint.py's Checkpointer like the training loop's) with the source record's config
changed to the new num_heads / num_kv_heads / mlp_dim, the same tokenizer, and `pruned` (source,
step, sparsity, criterion, kept units per layer). infer.main, infer.serve, infer.quantize,
bench.latency / bench.inference_report and `LoadedModel.from_workdir` load it like any run, and
`train.init_from=<out>` fine-tunes it.
"""
import copy
import dataclasses
import json
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from eval import common as eval_common
from infer import loading
from model import checkpoint as checkpoint_lib
from model import errors
from model import log_setup
from model.config import ModelConfig

CRITERIA = ("magnitude", "taylor", "random")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a pruning keeps, per layer: KV groups (GQA/MHA) or query heads (MQA), and MLP
  channels; indices into the original model's units, ascending."""
  heads: tuple[tuple[int, ...], ...]
  mlp: tuple[tuple[int, ...], ...]
  head_unit: str          # "kv_group" or "query_head"

  def model_config(self, cfg: ModelConfig) -> ModelConfig:
    kept = len(self.heads[0])
    if self.head_unit == "kv_group":
      group = cfg.num_heads // cfg.num_kv_heads
      heads, kv_heads = kept * group, kept
    else:
      heads, kv_heads = kept, cfg.num_kv_heads
    return dataclasses.replace(cfg, num_heads=heads, num_kv_heads=kv_heads,
                               mlp_dim=len(self.mlp[0]))


def head_unit(cfg: ModelConfig) -> str:
  return "query_head" if cfg.num_kv_heads == 1 and cfg.num_heads > 1 else "kv_group"


def num_units(cfg: ModelConfig) -> tuple[int, int]:
  """(attention units, MLP channels) per layer."""
  return (cfg.num_heads if head_unit(cfg) == "query_head" else cfg.num_kv_heads), cfg.mlp_dim


def kept_count(units: int, sparsity: float) -> int:
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity={sparsity}: expected a fraction in [0, 1)")
  return max(1, min(units, round(units * (1.0 - sparsity))))


def _norm(x, axes) -> np.ndarray:
  return np.sqrt(np.sum(np.square(np.asarray(x, np.float64)), axis=axes))


def _query_to_units(cfg: ModelConfig, per_query: np.ndarray) -> np.ndarray:
  """[num_heads] query-head scores -> [units] (KV groups sum their query heads)."""
  if head_unit(cfg) == "query_head":
    return per_query
  return per_query.reshape(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads).sum(axis=1)


def magnitude_scores(cfg: ModelConfig, params) -> tuple[np.ndarray, np.ndarray]:
  """([layers, head units], [layers, mlp_dim]) weight-magnitude importance."""
  group = cfg.num_heads // cfg.num_kv_heads
  heads, mlp = [], []
  for i in range(cfg.num_layers):
    block = params[f"block_{i}"]
    out = _norm(block["attn"]["out"]["kernel"], (1, 2))                 # [heads]
    value = np.repeat(_norm(block["attn"]["value"]["kernel"], (0, 2)), group)   # [heads]
    heads.append(_query_to_units(cfg, out * value))
    m = block["mlp"]
    score = _norm(m["wi"]["kernel"], 0) * _norm(m["wo"]["kernel"], 1)
    if "wg" in m:
      score = score * _norm(m["wg"]["kernel"], 0)
    mlp.append(score)
  return np.stack(heads), np.stack(mlp)


def random_scores(cfg: ModelConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  units, channels = num_units(cfg)
  return rng.random((cfg.num_layers, units)), rng.random((cfg.num_layers, channels))


def _loss_fn(model, kind: str):
  def loss(params, tokens, mask, labels):
    if kind == "classify":
      logits = model.apply({"params": params}, tokens, pool_mask=mask > 0)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    # Language models (and summarizers, approximately): next-token loss on the text.
    logits = model.apply({"params": params}, tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=2)[..., 0]
    valid = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return loss


def taylor_scores(loaded: loading.LoadedModel, records: list[dict], *, text_field: str,
                  label_field: str, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """First-order Taylor importance (module docstring) from the run's loss on `records`."""
  cfg = loaded.model.cfg
  grad = jax.jit(jax.grad(_loss_fn(loaded.model, loaded.kind)))
  heads = np.zeros((cfg.num_layers, num_units(cfg)[0]))
  mlp = np.zeros((cfg.num_layers, cfg.mlp_dim))
  batches = 0
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    chunk = chunk + chunk[:1] * (batch_size - len(chunk))   # one compiled shape
    batch = loaded.encode_for_classify([r[text_field] for r in chunk])
    labels = np.asarray([int(r.get(label_field, 0)) for r in chunk], np.int32)
    g = jax.device_get(grad(loaded.params, batch["tokens"], batch["mask"], labels))
    for i in range(cfg.num_layers):
      p, d = loaded.params[f"block_{i}"], g[f"block_{i}"]
      w_o = np.asarray(p["attn"]["out"]["kernel"], np.float64)
      per_query = np.sum(w_o * np.asarray(d["attn"]["out"]["kernel"]), axis=(1, 2))
      heads[i] += np.square(_query_to_units(cfg, per_query))
      w_mlp = np.asarray(p["mlp"]["wo"]["kernel"], np.float64)
      mlp[i] += np.square(np.sum(w_mlp * np.asarray(d["mlp"]["wo"]["kernel"]), axis=1))
    batches += 1
  if not batches:
    raise ValueError("taylor importance needs calibration records; none given")
  return heads / batches, mlp / batches


def make_plan(cfg: ModelConfig, head_scores: np.ndarray, mlp_scores: np.ndarray, *,
              head_sparsity: float, mlp_sparsity: float) -> Plan:
  """Keeps the highest-scoring units of every layer (ties: the lower index)."""
  units, channels = num_units(cfg)
  if head_scores.shape != (cfg.num_layers, units) or mlp_scores.shape != (cfg.num_layers,
                                                                          channels):
    raise ValueError(f"scores of shape {head_scores.shape} / {mlp_scores.shape} do not fit "
                     f"{cfg.num_layers} layers of {units} head units and {channels} channels")
  keep_heads, keep_mlp = kept_count(units, head_sparsity), kept_count(channels, mlp_sparsity)
  top = lambda s, k: tuple(sorted(int(i) for i in np.argsort(-s, kind="stable")[:k]))
  return Plan(heads=tuple(top(s, keep_heads) for s in head_scores),
              mlp=tuple(top(s, keep_mlp) for s in mlp_scores), head_unit=head_unit(cfg))


def apply_plan(cfg: ModelConfig, params, plan: Plan):
  """(smaller ModelConfig, its params): the kept slices of every attention and MLP kernel;
  everything else (embedding, norms, heads) is shared unchanged."""
  group = cfg.num_heads // cfg.num_kv_heads
  new = dict(params)
  for i in range(cfg.num_layers):
    units = np.asarray(plan.heads[i], np.int64)
    if plan.head_unit == "kv_group":
      q_idx = (units[:, None] * group + np.arange(group)[None]).reshape(-1)
      kv_idx = units
    else:
      q_idx, kv_idx = units, np.arange(cfg.num_kv_heads)
    ch = np.asarray(plan.mlp[i], np.int64)
    block = params[f"block_{i}"]
    attn, mlp = block["attn"], block["mlp"]
    take = lambda x, idx, axis: jnp.take(jnp.asarray(x), idx, axis=axis)
    new_attn = {"query": {"kernel": take(attn["query"]["kernel"], q_idx, 1)},
                "key": {"kernel": take(attn["key"]["kernel"], kv_idx, 1)},
                "value": {"kernel": take(attn["value"]["kernel"], kv_idx, 1)},
                "out": {"kernel": take(attn["out"]["kernel"], q_idx, 0)}}
    new_mlp = {name: {"kernel": take(mlp[name]["kernel"], ch, 0 if name == "wo" else 1)}
               for name in mlp}
    new[f"block_{i}"] = {**block, "attn": new_attn, "mlp": new_mlp}
  new_cfg = plan.model_config(cfg)
  new_cfg.validate()
  return new_cfg, new


def prune(cfg: ModelConfig, params, sparsity: float, *, criterion: str = "magnitude",
          mlp_sparsity: float | None = None, scores=None, seed: int = 0):
  """(new ModelConfig, new params, Plan). `scores` = (head, mlp) importance overrides the
  criterion (taylor needs them: see taylor_scores)."""
  if scores is None:
    if criterion == "magnitude":
      scores = magnitude_scores(cfg, params)
    elif criterion == "random":
      scores = random_scores(cfg, seed)
    else:
      raise ValueError(f"criterion={criterion!r} needs scores (taylor: taylor_scores()); "
                       f"expected one of {CRITERIA}")
  plan = make_plan(cfg, *scores, head_sparsity=sparsity,
                   mlp_sparsity=sparsity if mlp_sparsity is None else mlp_sparsity)
  new_cfg, new_params = apply_plan(cfg, params, plan)
  return new_cfg, new_params, plan


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def write_run(out: str, run: loading.Run, cfg: ModelConfig, params, info: dict) -> str:
  """Writes the pruned model as a finished run in `out` (see the module docstring)."""
  meta = copy.deepcopy(run.meta)
  config = meta["config"]
  if config["task"] == "distill":     # a distilled student becomes a plain run of its task
    config["task"] = run.kind
  config["model"].update(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                         mlp_dim=cfg.mlp_dim)
  meta["params"] = param_count(params)
  meta["pruned"] = {**info, "source_workdir": run.workdir, "source_step": run.step,
                    "source_params": run.meta.get("params")}
  checkpointer = checkpoint_lib.Checkpointer(out, every=1, keep=1, async_save=False)
  try:
    checkpointer.save(run.step, {"params": params, "step": np.asarray(run.step, np.int32)}, None,
                      meta, force=True)
  finally:
    checkpointer.close()
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return out


def prune_run(workdir: str, out: str, sparsity: float, *, criterion: str = "magnitude",
              mlp_sparsity: float | None = None, calibration_file: str = "",
              calibration_examples: int = 256, seed: int = 0) -> dict:
  """Prunes the run at `workdir` (its best state if kept) into a new run at `out`; returns a
  summary (parameters before / after, the new shapes)."""
  out = loading.resolve_path(out)
  if os.path.exists(out):
    raise loading.LoadError(f"--out={out} exists; give a new folder")
  run = loading.open_run(workdir, prefer_best=True)
  if run.quantization != "none":
    raise loading.LoadError(f"--workdir={workdir} is quantized ({run.quantization}); prune the "
                            "float run it came from (and quantize the pruned run)")
  loaded = loading.LoadedModel.from_run(run)
  cfg = loaded.model.cfg
  params = jax.device_get(loaded.params)
  scores, info = None, {"sparsity": sparsity, "criterion": criterion,
                        "mlp_sparsity": sparsity if mlp_sparsity is None else mlp_sparsity}
  if criterion == "taylor":
    path = calibration_file or run.meta["config"]["data"]["train_file"]
    if not path or path.startswith("tfds:"):
      raise loading.LoadError("--criterion=taylor needs --calibration_file (a JSONL file with "
                              "the run's text and label fields)")
    records = eval_common.read_jsonl(os.path.expanduser(path))
    rng = np.random.default_rng(seed)
    if 0 < calibration_examples < len(records):
      records = [records[i] for i in sorted(rng.choice(len(records), calibration_examples,
                                                       replace=False))]
    data = run.meta["config"]["data"]
    scores = taylor_scores(loaded, records, text_field=data["text_field"],
                           label_field=data["label_field"])
    info.update(calibration_file=os.path.abspath(os.path.expanduser(path)),
                calibration_examples=len(records))
  new_cfg, new_params, plan = prune(cfg, params, sparsity, criterion=criterion,
                                    mlp_sparsity=mlp_sparsity, scores=scores, seed=seed)
  info.update(head_unit=plan.head_unit, kept_heads=[list(h) for h in plan.heads],
              kept_mlp=[list(m) for m in plan.mlp])
  write_run(out, run, new_cfg, new_params, info)
  return {"source": run.workdir, "out": out, "params_before": param_count(params),
          "params_after": param_count(new_params),
          "num_heads": (cfg.num_heads, new_cfg.num_heads),
          "num_kv_heads": (cfg.num_kv_heads, new_cfg.num_kv_heads),
          "mlp_dim": (cfg.mlp_dim, new_cfg.mlp_dim)}


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    s = prune_run(f.workdir, f.out, f.sparsity, criterion=f.criterion,
                  mlp_sparsity=f.mlp_sparsity, calibration_file=f.calibration_file,
                  calibration_examples=f.calibration_examples, seed=f.seed)
  except (loading.LoadError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{s['source']} -> {s['out']} [{f.criterion}, sparsity {f.sparsity}]")
  print(f"params: {s['params_before']:,} -> {s['params_after']:,} "
        f"({s['params_after'] / s['params_before']:.3f}x); num_heads {s['num_heads'][0]} -> "
        f"{s['num_heads'][1]}, num_kv_heads {s['num_kv_heads'][0]} -> {s['num_kv_heads'][1]}, "
        f"mlp_dim {s['mlp_dim'][0]} -> {s['mlp_dim'][1]}")
  print(f"serve it like any run: python -m infer.serve --workdir={f.out}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A trained run's workdir (its best state if kept).",
                      required=True)
  flags.DEFINE_float("sparsity", None, "Fraction of head units and MLP channels removed per "
                     "layer, in [0, 1).", required=True)
  flags.DEFINE_string("out", None, "New folder for the pruned run.", required=True)
  flags.DEFINE_enum("criterion", "magnitude", list(CRITERIA), "Unit importance.")
  flags.DEFINE_float("mlp_sparsity", None, "MLP channels removed (default: --sparsity).")
  flags.DEFINE_string("calibration_file", "", "taylor: JSONL of examples (default: the run's "
                      "data.train_file).")
  flags.DEFINE_integer("calibration_examples", 256, "taylor: examples sampled from it.")
  flags.DEFINE_integer("seed", 0, "Calibration sample and random-criterion seed.")
  app.run(errors.exit_on_user_error(main))
