"""The end-of-run evaluation of a fine-tuning run: test predictions -> every configured
evaluator (overall and per slice) and the baselines beside them -> metrics.jsonl, a
predictions file the evaluators can re-read alone (`python -m eval.<name> --records=...`) and
one Markdown report per run.

Classifiers are scored from their class probabilities; summarizers from greedy KV-cache
decoding capped at `eval.decode_len` tokens, next to lead-k baselines computed by the same
ROUGE evaluator.
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from eval import classification, factual, report, rouge, slices, tfidf_baseline
from infer import decode
from model import sharding as sharding_lib
from train import loop as loop_lib
from train.data import corpus as corpus_lib
from train.data import examples as examples_lib

EVALUATORS = {m.NAME: m for m in (classification, rouge, factual)}
# Higher is better for these metrics; the worst slice is the one with the lowest value.
_HIGHER_IS_BETTER = ("accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "rougeLsum",
                     "entity_precision", "number_precision", "date_precision")


def task_kind(config) -> str:
  """classify or summarize: what the evaluated model does (a distilled student: its task)."""
  return config.distill.task if config.task == "distill" else config.task


def _subset(examples, n):
  """All examples, or a fixed random `n` of them (by id hash: test files are often sorted by
  label, so the first n would be one class)."""
  if n < 0 or n >= len(examples):
    return examples
  keep = set(sorted(range(len(examples)),
                    key=lambda i: corpus_lib.hash_unit(examples[i].id, "eval"))[:n])
  return [e for i, e in enumerate(examples) if i in keep]


def predict_classes(task, params, rows, batch_size: int, mesh) -> np.ndarray:
  """Class probabilities [N, C] for `rows`, batched and sharded like the eval step."""
  sharding = sharding_lib.batch_sharding(mesh)
  predict = jax.jit(task.predict)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = examples_lib.pad_batch(chunk, batch_size)
    probs = predict(params, loop_lib.to_global(batch, sharding))
    out.append(np.asarray(jax.device_get(probs))[:len(chunk)])
  return np.concatenate(out)


def generate_summaries(model, params, examples, tokenizer, data_cfg, eval_cfg) -> list[str]:
  """Greedy summaries of `examples`' documents, `eval.batch_size` at a time."""
  out = []
  for start in range(0, len(examples), eval_cfg.batch_size):
    chunk = examples[start:start + eval_cfg.batch_size]
    tokens, prompt_len = decode.encode_prompts(tokenizer, [e.text for e in chunk],
                                               data_cfg.seq_len, eval_cfg.decode_len,
                                               data_cfg.truncation)
    ids = decode.greedy(model, params, tokens, prompt_len, max_new=eval_cfg.decode_len,
                        eos_id=tokenizer.eos_id)
    out += [tokenizer.decode(decode.strip(row, tokenizer.eos_id)) for row in np.asarray(ids)]
  return out


def _records(config, task, model, params, tokenizer, test, test_rows, mesh):
  if task_kind(config) == "classify":
    probs = predict_classes(task, params, test_rows, config.eval.batch_size, mesh)
    return [{"id": e.id, "label": int(e.target), "probs": p.tolist(), "text": e.text,
             "dataset": e.source} for e, p in zip(test, probs)]
  summaries = generate_summaries(model, params, test, tokenizer, config.data, config.eval)
  return [{"id": e.id, "prediction": s, "reference": e.target, "source": e.text,
           "dataset": e.source} for e, s in zip(test, summaries)]


# Summaries decoded at each validation: enough for a ROUGE trend, cheap next to training.
VALIDATION_DECODES = 32


def validation_hooks(config, *, task, model, tokenizer, splits, rows, mesh,
                     select_params=lambda p: p) -> dict:
  """{evaluator name: fn(params) -> scalar metrics} on the validation split, for the loop;
  `select_params` picks the evaluated model's parameters from the train state's."""
  valid = splits["validation"]
  if task_kind(config) == "summarize":
    valid = valid[:VALIDATION_DECODES]

  def hook(name):
    def run_on(params):
      records = _records(config, task, model, select_params(params), tokenizer, valid,
                         rows["validation"][:len(valid)], mesh)
      metrics = EVALUATORS[name].evaluate(records, config.eval)
      return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return run_on
  return {name: hook(name) for name in config.eval.evaluators if name in EVALUATORS}


def _evaluate(name, records, cfg):
  module = EVALUATORS[name]
  text_field = "text" if name == "classification" else "source"
  result = module.evaluate(records, cfg)
  result["slices"] = slices.evaluate_slices(module.evaluate, records, cfg, text_field=text_field,
                                            higher_is_better=_HIGHER_IS_BETTER)
  return result


def run(config, workdir: str, *, task, model, params, tokenizer, splits, rows, mesh, writer,
        step: int, facts: dict) -> dict:
  """Evaluates `params` on the test split; returns {section: metrics} as in the report."""
  if "test" not in splits:
    logging.warning("no config.data.test_file: skipping the final test evaluation")
    return {}
  t0 = time.perf_counter()
  chosen = set(e.id for e in _subset(splits["test"], config.eval.num_examples))
  picked = [(e, r) for e, r in zip(splits["test"], rows["test"]) if e.id in chosen]
  test, test_rows = [e for e, _ in picked], [r for _, r in picked]
  records = _records(config, task, model, params, tokenizer, test, test_rows, mesh)
  with open(os.path.join(workdir, "test_predictions.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  predict_seconds = time.perf_counter() - t0

  sections = {}
  for name in config.eval.evaluators:
    if name not in EVALUATORS:
      raise ValueError(f"config.eval.evaluators: unknown {name!r}; expected some of "
                       f"{sorted(EVALUATORS)}")
    sections[f"model: {name}"] = _evaluate(name, records, config.eval)
  if task_kind(config) == "classify":
    train = [{"text": e.text, "label": int(e.target)} for e in splits["train"]]
    sections["baseline: tf-idf + logistic regression"] = tfidf_baseline.run(
        train, [{"text": r["text"], "label": r["label"]} for r in records])
  if task_kind(config) == "summarize" and "rouge" in config.eval.evaluators:
    for base_name, base_records in rouge.lead_baselines(records).items():
      sections[f"baseline: {base_name}: rouge"] = _evaluate("rouge", base_records, config.eval)
  if task_kind(config) == "summarize" and config.eval.rubric_examples > 0:
    from eval import rubric
    sheet = rubric.export(records, os.path.join(workdir, "rubric_sheet.csv"),
                          config.eval.rubric_examples, config.seed)
    facts["human-evaluation sheet"] = sheet

  for section, metrics in sections.items():
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    writer.write(step, "test/" + section.replace(": ", "/").replace(" ", "_"), scalars)
  facts.update({"test examples": len(records), "prediction seconds": round(predict_seconds, 1)})
  path = report.write_report(os.path.join(workdir, "report.md"),
                             f"{config.task} run: {os.path.basename(workdir)}", sections,
                             notes=[f"{k}: {v}" for k, v in facts.items()])
  logging.info("test evaluation (%d examples) written to %s", len(records), path)
  return sections
