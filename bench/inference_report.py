r"""The production-inference report: teacher vs distilled student vs quantized student vs
pruned runs.

  python -m bench.inference_report --config=configs/inference_report.py:imdb \
      --config.teacher=runs/imdb_ft --config.student=runs/imdb_student \
      --config.pruned="('runs/imdb_ft_p50','runs/imdb_ft_p50_ft')"

For each variant (teacher f32; student f32, bf16, int8 weight-only, w8a8 — quantized by
infer/ptq.py from the student's checkpoint) one row: parameters, bytes in memory and on
disk, accuracy and macro F1 on the test file (eval/classification.py), latency p50/p99 at
batch 1 and throughput at batch 32 (bench/latency.py, all variants timed in this one run on this
machine), and XLA's peak memory. Each run in `pruned` (written by infer/prune.py, or fine-tuned
from one) adds a row per `pruned_modes` entry (f32 and w8a8 by default: pruned + int8); the
student is optional when pruned runs are given. With `summarizer` set, a second table: greedy
decoding tokens/s with the KV cache against full recomputation (infer/decode.py) in f32 and bf16 compute, and how
many outputs agree. Either table may be left out (leave teacher/student or summarizer unset).
Writes `<out_dir>/inference_report.md`, `.json` and `latency_vs_accuracy.png`.
"""
import dataclasses
import functools
import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from bench import latency
from eval import classification, common, report
from infer import decode, ptq
from infer.loading import LoadedModel, classify_probs
from model import errors
from model import log_setup

_CONFIG = None   # defined by _define_flags when run as a command (train.main has --config too)


def _define_flags():
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file("config", None,
                                            "configs/inference_report.py:<preset>")


def _test_records(cfg):
  records = common.read_jsonl(os.path.expanduser(cfg.test_file))
  rng = np.random.default_rng(cfg.seed)
  if 0 < cfg.num_examples < len(records):   # a fixed random subset (files sort by label)
    records = [records[i] for i in sorted(rng.choice(len(records), cfg.num_examples, False))]
  return records


def _in_mode(name, loaded, mode, sample):
  """(name, loaded, model, params, disk bytes) of `loaded` quantized (or cast) to `mode`."""
  model, params = ptq.quantize(loaded.model, loaded.params, mode, sample)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "q")
    ptq.save(path, params, {"mode": mode,
                                 "model_config": dataclasses.asdict(loaded.model.cfg)})
    disk = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)
  return name, loaded, model, params, disk


def _pruned_name(workdir: str) -> str:
  """'pruned 50% magnitude (+ft)': from the run's record (a fine-tuned pruned run records the
  pruned run it started from)."""
  from infer import loading
  run = loading.open_run(workdir, prefer_best=True)
  info, tuned = run.meta.get("pruned"), False
  if info is None and run.meta["config"]["train"].get("init_from"):
    origin = loading.open_run(run.meta["config"]["train"]["init_from"])
    info, tuned = origin.meta.get("pruned"), True
  if info is None:
    return f"pruned? {os.path.basename(workdir.rstrip('/'))}"
  return (f"pruned {100 * info['sparsity']:.0f}% {info['criterion']}"
          + (" + fine-tune" if tuned else ""))


def _variants(cfg):
  """[(name, loaded, model, params, disk bytes)] for the teacher, each student mode and each
  pruned run's modes."""
  teacher = LoadedModel.from_workdir(cfg.teacher)
  sample = teacher.encode_for_classify(["a"])["tokens"]
  # The teacher as trained may compute in bf16; the reference row is its f32 forward.
  out = [("teacher f32", teacher, *ptq.quantize(teacher.model, teacher.params, "f32",
                                                     sample), None)]
  if cfg.student:
    student = LoadedModel.from_workdir(cfg.student)
    out += [_in_mode(f"student {mode}", student, mode, sample) for mode in cfg.student_modes]
  for workdir in cfg.pruned:
    pruned = LoadedModel.from_workdir(workdir)
    out += [_in_mode(f"{_pruned_name(workdir)} {mode}", pruned, mode, sample)
            for mode in cfg.pruned_modes]
  return out


def _encoded(cfg, loaded, texts, cache: dict):
  """The test set as classifier batches; encoded once per tokenizer (the students share their
  teacher's) rather than once per variant."""
  key = (loaded.tokenizer.fingerprint, loaded.config.data.truncation)
  if key not in cache:
    cache[key] = [loaded.encode_for_classify(texts[start:start + cfg.batch_size], cfg.seq_len)
                  for start in range(0, len(texts), cfg.batch_size)]
  return cache[key]


def _row(cfg, name, loaded, model, params, disk, records, cache):
  fn = functools.partial(classify_probs, model)
  texts = [r[cfg.text_field] for r in records]
  probs = np.concatenate([np.asarray(fn(params, b["tokens"], b["mask"]))
                          for b in _encoded(cfg, loaded, texts, cache)])
  quality = classification.evaluate(
      [{"label": int(r[cfg.label_field]), "probs": p.tolist()} for r, p in zip(records, probs)],
      common.eval_config(bootstrap=cfg.bootstrap))
  example = loaded.encode_for_classify(texts[:max(cfg.latency_batches)], cfg.seq_len)

  def args_for(b):
    reps = -(-b // len(example["tokens"]))
    tile = lambda x: np.tile(x, (reps, 1))[:b]
    return params, tile(example["tokens"]), tile(example["mask"])
  timing = latency.measure(fn, args_for,
                           batch_sizes=tuple(cfg.latency_batches), warmup=cfg.warmup,
                           iters=cfg.iters, seq_len=cfg.seq_len)
  b1, bn = timing[min(cfg.latency_batches)], timing[max(cfg.latency_batches)]
  return {"variant": name, "params": latency.model_size(params)["params"],
          "memory MiB": ptq.param_bytes(params) / 2**20,
          "disk MiB": None if disk is None else disk / 2**20,
          "accuracy": quality["accuracy"], "macro F1": quality["macro_f1"],
          "p50 ms (b=1)": b1["p50_ms"], "p99 ms (b=1)": b1["p99_ms"],
          f"examples/s (b={max(cfg.latency_batches)})": bn["examples_per_s"],
          "XLA peak MiB": bn["xla_bytes"]["total"] / 2**20}


def _decode_rows(cfg):
  """Greedy decoding with the KV cache against full recomputation, in f32 and in bf16 compute:
  rows of speed, and per dtype how many outputs are identical. f32 must agree exactly; in bf16
  the cached and recomputed attention round differently, so a near-tie may flip a token."""
  loaded = LoadedModel.from_workdir(cfg.summarizer)
  records = common.read_jsonl(os.path.expanduser(cfg.summarizer_file))[:cfg.decode_examples]
  tok = loaded.tokenizer
  tokens, prompt_len = decode.encode_prompts(
      tok, [r[cfg.text_field] for r in records], loaded.config.data.seq_len, cfg.decode_len,
      loaded.config.data.truncation)
  rows, agree = [], {}
  for mode in ("f32", "bf16"):
    model = ptq.build_model(loaded.model.cfg, mode)
    outputs = {}
    for name, fn in (("KV cache", decode.greedy), ("recompute", decode.greedy_recompute)):
      run = lambda: jax.block_until_ready(fn(model, loaded.params, tokens, prompt_len,
                                             max_new=cfg.decode_len, eos_id=tok.eos_id))
      run()   # compile
      t0 = time.perf_counter()
      outputs[name] = np.asarray(run())
      seconds = time.perf_counter() - t0
      rows.append({"decoder": f"{name} ({mode})", "batch": len(records),
                   "new tokens": cfg.decode_len, "seconds": seconds,
                   "tokens/s": len(records) * cfg.decode_len / seconds})
    same = (outputs["KV cache"] == outputs["recompute"]).all(axis=1)
    agree[mode] = {"identical rows": int(same.sum()), "rows": len(same)}
  return rows, agree


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["p99 ms (b=1)"], 100 * r["accuracy"])
    ax.annotate(r["variant"], (r["p99 ms (b=1)"], 100 * r["accuracy"]), fontsize=8)
  ax.set_xlabel("p99 latency at batch 1 (ms)")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(cfg) -> dict:
  """The classification table (teacher and student set) and the decoding table (summarizer
  set); at least one of them."""
  if not (cfg.teacher and (cfg.student or cfg.pruned)) and not cfg.summarizer:
    raise ValueError("set config.teacher and config.student and/or config.pruned "
                     "(classification table) and/or config.summarizer (decoding table)")
  os.makedirs(cfg.out_dir, exist_ok=True)
  text = [f"# Inference report ({jax.devices()[0].device_kind})", ""]
  result = {}
  if cfg.teacher and (cfg.student or cfg.pruned):
    records = _test_records(cfg)
    rows, cache = [], {}
    for variant in _variants(cfg):
      logging.info("measuring %s", variant[0])
      rows.append(_row(cfg, *variant, records, cache))
    result["classification"] = rows
    text += [f"## Classification ({len(records)} test examples, seq {cfg.seq_len})", "",
             report.comparison_table({r["variant"]: r for r in rows}, list(rows[0])[1:]), ""]
    _plot(rows, os.path.join(cfg.out_dir, "latency_vs_accuracy.png"))
  if cfg.summarizer:
    decode_rows, agree = _decode_rows(cfg)
    result.update(decoding=decode_rows, decoders_agree=agree)
    text += ["## Decoding", "", report.comparison_table(
        {r["decoder"]: r for r in decode_rows}, list(decode_rows[0])[1:]), ""]
    text += [f"KV-cache and recomputed greedy outputs identical ({mode} compute): "
             f"{a['identical rows']} of {a['rows']} rows" for mode, a in agree.items()] + [""]
  with open(os.path.join(cfg.out_dir, "inference_report.md"), "w") as f:
    f.write("\n".join(text))
  with open(os.path.join(cfg.out_dir, "inference_report.json"), "w") as f:
    json.dump(result, f, indent=2)
  print("\n".join(text))
  return result


def main(argv):
  log_setup.quiet_libraries()
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/inference_report.py:<preset> is required")
  run(_CONFIG.value)


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main))
