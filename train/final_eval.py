"""The end-of-run evaluation of a fine-tuning run: test predictions -> every configured
evaluator (overall and per slice) and the baselines beside them -> metrics.jsonl, a
predictions file the evaluators can re-read alone (`python -m eval.<name> --records=...`) and
one Markdown report per run.

Classifiers are scored from their class probabilities; summarizers from KV-cache decoding
capped at `eval.decode_len` tokens (greedy, or as `eval.decode` says: beam search, no-repeat
n-grams, repetition penalty, a minimum and a per-document length), next to lead-k baselines
computed by the same ROUGE evaluator.
"""
import json
import os
import time

from absl import logging

from configs import common as configs_common
from eval import classification, factual, report, rouge, slices, tfidf_baseline
from infer import loading
from model import checkpoint as checkpoint_lib
from model.progress import CountProgress
from model.task_kind import task_kind
from train import build
from train import metrics as metrics_lib
from train.data import corpus as corpus_lib

EVALUATORS = {m.NAME: m for m in (classification, rouge, factual)}
# What a scored run leaves beside report.md: one record per test example.
PREDICTIONS = "test_predictions.jsonl"


def _subset(examples, n):
  """All examples, or a fixed random `n` of them (by id hash: test files are often sorted by
  label, so the first n would be one class)."""
  if n < 0 or n >= len(examples):
    return examples
  keep = set(sorted(range(len(examples)),
                    key=lambda i: corpus_lib.hash_unit(examples[i].id, "eval"))[:n])
  return [e for i, e in enumerate(examples) if i in keep]


# Train pairs (a fixed subset, chosen by id hash) that eval.decode.length_ratio="train" learns
# the summary / document length ratio from: a median, stable long before all of IN-Abs.
LENGTH_RATIO_PAIRS = 2000


# eval.decode's keys and their "off" values (configs/common.py): LoadedModel.summarize keywords.
# config.eval.decode's keys in the order the report names them; their defaults (all off: greedy)
# are base_config()'s.
DECODE_DEFAULTS = {key: configs_common.base_config().eval.decode[key] for key in (
    "beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty", "min_new",
    "length_ratio", "samples", "temperature", "top_p", "source_weight")}


def decode_options(config, loaded: loading.LoadedModel, train_examples) -> tuple[dict, dict]:
  """(LoadedModel.summarize's decoding keywords from config.eval.decode, what the report says
  about them). length_ratio "train" is learned here on (a fixed subset of) the train pairs."""
  options = {key: config.eval.decode[key] for key in DECODE_DEFAULTS}
  learned = options["length_ratio"] == "train"
  if learned:
    pairs = _subset(list(train_examples), LENGTH_RATIO_PAIRS)
    if not pairs:
      raise ValueError('config.eval.decode.length_ratio="train" needs train examples')
    options["length_ratio"] = loaded.fit_length_ratio([e.text for e in pairs],
                                                      [e.target for e in pairs])
    logging.info("summary length ratio learned on %d train pairs: %.4f", len(pairs),
                 options["length_ratio"])
  options["length_ratio"] = float(options["length_ratio"])
  # MBR's sampling settings are spelled out in its description below, not listed again.
  described = ("samples", "temperature", "top_p", "source_weight") if options["samples"] else ()
  changed = [f"{k}={round(v, 4) if isinstance(v, float) else v}"
             for k, v in options.items() if v != DECODE_DEFAULTS[k] and k not in described]
  how = ("beam search" if options["beam"] > 1 else "greedy") + (
      " (length_ratio learned on the train split)" if learned else "")
  if options["samples"]:
    how = (f"MBR over {options['samples']} samples (temperature {options['temperature']}, "
           f"top_p {options['top_p']}) and the {how} summary" +
           (f", source support weighted {options['source_weight']}"
            if options["source_weight"] else ""))
  return options, {"decoding": f"{how}: {', '.join(changed)}" if changed else how}


def _records(loaded: loading.LoadedModel, params, examples, batch_size: int,
             decoding: dict | None = None, window_stride: int = 0) -> list[dict]:
  """One record per example for the evaluators: class probabilities (long texts also read in
  windows `window_stride` ids apart when > 0) or a summary decoded with `decoding`
  (decode_options), predicted through the inference API (batched, sharded over the run's
  mesh)."""
  texts = [e.text for e in examples]
  # Whole batches at a time, so that the batches (and MBR's per-batch seeds) are the same as
  # in one call; a progress line with ETA for the minutes a large test split takes.
  step = batch_size * PROGRESS_BATCHES
  progress = CountProgress(len(texts), "texts")
  predictions = []
  for start in range(0, len(texts), step):
    chunk = texts[start:start + step]
    if loaded.kind == "classify":
      predictions += list(loaded.classify(chunk, params, batch_size=batch_size,
                                          window_stride=window_stride))
    else:
      predictions += loaded.summarize(chunk, params=params, batch_size=batch_size,
                                      **(decoding or {}))
    progress.update(len(predictions))
  if loaded.kind == "classify":
    return [{"id": e.id, "label": int(e.target), "probs": p.tolist(), "text": e.text,
             "dataset": e.source} for e, p in zip(examples, predictions)]
  return [{"id": e.id, "prediction": s, "reference": e.target, "source": e.text,
           "dataset": e.source} for e, s in zip(examples, predictions)]


# Batches per progress update of the final evaluation's predictions.
PROGRESS_BATCHES = 8


# Summaries decoded at each validation: enough for a ROUGE trend, cheap next to training.
VALIDATION_DECODES = 32


def validation_hooks(config, loaded: loading.LoadedModel, splits, select_params,
                     decoding: dict | None = None) -> dict:
  """{evaluator name: fn(params) -> scalar metrics} on the validation split, for the loop;
  `select_params` picks the evaluated model's parameters from the train state's; summaries
  are decoded as the test's are (`decoding`)."""
  valid = splits["validation"]
  if loaded.kind == "summarize":
    valid = valid[:VALIDATION_DECODES]
  # The evaluators of one validation score the same predictions: decode (or classify) once
  # per params, not once per evaluator (ROUGE + factual decoded every summary twice).
  last = {"params": None, "records": None}

  def records_for(params):
    if last["params"] is not params:
      last.update(params=params, records=_records(
          loaded, select_params(params), valid, config.eval.batch_size, decoding,
          config.eval.window_stride))
    return last["records"]

  def hook(name):
    def run_on(params):
      records = records_for(params)
      metrics = EVALUATORS[name].evaluate(records, config.eval)
      return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return run_on
  return {name: hook(name) for name in config.eval.evaluators if name in EVALUATORS}


def _evaluate(name, records, cfg):
  module = EVALUATORS[name]
  text_field = "text" if name == "classification" else "source"
  result = module.evaluate(records, cfg)
  result["slices"] = slices.evaluate_slices(module.evaluate, records, cfg, text_field=text_field,
                                            higher_is_better=metrics_lib.HIGHER_IS_BETTER)
  return result


def run(config, workdir: str, *, loaded: loading.LoadedModel, params, splits, writer,
        step: int, facts: dict, decoding: dict | None = None) -> dict:
  """Evaluates `params` on the test split (summaries decoded with `decoding`, see
  decode_options); returns {section: metrics} as in the report."""
  if "test" not in splits:
    logging.warning("no config.data.test_file: skipping the final test evaluation")
    return {}
  t0 = time.perf_counter()
  chosen = set(e.id for e in _subset(splits["test"], config.eval.num_examples))
  test = [e for e in splits["test"] if e.id in chosen]
  records = _records(loaded, params, test, config.eval.batch_size, decoding,
                     config.eval.window_stride)
  facts["prediction seconds"] = round(time.perf_counter() - t0, 1)
  if loaded.kind == "classify" and config.eval.window_stride:
    facts["long texts"] = (f"also read whole in windows {config.eval.window_stride} ids apart, "
                           "rows' log-probabilities averaged (eval.window_stride)")
  harness = (harness_sections(config, loaded, params)
             if config.eval.harness_tasks and loaded.kind != "classify" else {})
  return score(config, workdir, records, kind=loaded.kind, train_examples=splits.get("train", []),
               writer=writer, step=step, facts=facts, extra_sections=harness)


def score(config, workdir: str, records: list[dict], *, kind: str, train_examples, writer,
          step: int, facts: dict, extra_sections: dict | None = None) -> dict:
  """Test records (as _records makes them: a classifier's class probabilities or summaries)
  -> workdir/PREDICTIONS (re-readable by every `python -m eval.<name>`), every configured
  evaluator, the baselines fitted on `train_examples` and the paired comparisons -> `writer`
  (None: a new one on `workdir`) under test/ and report.md; returns {section: metrics}. Also
  the way in for predictions made elsewhere (train/ensemble.py)."""
  with open(os.path.join(workdir, PREDICTIONS), "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  sections = {}
  for name in config.eval.evaluators:
    if name not in EVALUATORS:
      raise ValueError(f"config.eval.evaluators: unknown {name!r}; expected some of "
                       f"{sorted(EVALUATORS)}")
    sections[f"model: {name}"] = _evaluate(name, records, config.eval)
  if kind == "classify":
    train = [{"text": e.text, "label": int(e.target)} for e in train_examples]
    base_records, base_facts = tfidf_baseline.predict(
        train, [{"id": r["id"], "text": r["text"], "label": r["label"]} for r in records])
    sections["baseline: tf-idf + logistic regression"] = dict(
        classification.evaluate(base_records, config.eval), **base_facts)
    if "classification" in config.eval.evaluators:
      sections["paired: model minus tf-idf + logistic regression: classification"] = (
          classification.paired_difference(records, base_records, config.eval))
  if kind == "summarize" and "rouge" in config.eval.evaluators:
    baselines = rouge.lead_baselines(records)
    for base_name, base_records in baselines.items():
      sections[f"baseline: {base_name}: rouge"] = _evaluate("rouge", base_records, config.eval)
    for base_name in ("lead-3", "lead-K"):   # lead-N knows the reference's length: no rival
      sections[f"paired: model minus {base_name}: rouge"] = rouge.paired_difference(
          records, baselines[base_name], config.eval)
  if kind == "summarize" and config.eval.rubric_examples > 0:
    from eval import rubric
    sheet = rubric.export(records, os.path.join(workdir, "rubric_sheet.csv"),
                          config.eval.rubric_examples, config.seed)
    facts["human-evaluation sheet"] = sheet
  sections.update(extra_sections or {})

  opened = writer is None   # a re-scoring command's: metrics.jsonl and TensorBoard in workdir
  writer = metrics_lib.MetricWriter(workdir) if opened else writer
  try:
    for section, metrics in sections.items():
      scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
      writer.write(step, "test/" + section.replace(": ", "/").replace(" ", "_"), scalars)
  finally:
    if opened:
      writer.close()
  facts["test examples"] = len(records)
  path = report.write_report(os.path.join(workdir, "report.md"),
                             f"{config.task} run: {os.path.basename(workdir)}", sections,
                             notes=[f"{k}: {v}" for k, v in facts.items()])
  logging.info("test evaluation (%d examples) written to %s", len(records), path)
  return sections


def log_sections(sections: dict, out: str) -> None:
  """What a re-scoring command (train.redecode, train.ensemble) shows when done: each
  section's float metrics, rounded, and where the report is."""
  for name, metrics in sections.items():
    logging.info("%s: %s", name, {k: round(v, 4) for k, v in metrics.items()
                                  if isinstance(v, float)})
  print(f"report: {os.path.join(out, 'report.md')}")


def harness_sections(config, loaded: loading.LoadedModel, params) -> dict:
  """{"harness: <task>": {metric: value}} of lm-evaluation-harness on `params`
  (config.eval.harness_tasks; infer/harness.py, the optional lm-eval package)."""
  try:
    from infer import harness
  except ImportError as e:
    raise ValueError(f"config.eval.harness_tasks={tuple(config.eval.harness_tasks)} needs "
                     f"lm-eval ({e}): pip install -r requirements-harness.txt") from None
  t0 = time.perf_counter()
  scores = harness.run_on_params(
      config, loaded, params, list(config.eval.harness_tasks),
      include_path=config.eval.harness_include_path,
      limit=config.eval.harness_limit if config.eval.harness_limit > 0 else None,
      batch_size=config.eval.batch_size)
  logging.info("lm-evaluation-harness (%s) in %.1fs: %s", ",".join(config.eval.harness_tasks),
               time.perf_counter() - t0, scores)
  return {f"harness: {task}": metrics for task, metrics in scores.items()}


def pretrain_report(config, workdir: str, *, loaded: loading.LoadedModel, params, writer,
                    step: int, facts: dict) -> dict:
  """A pre-training run with config.eval.harness_tasks: the harness scores of its final state
  in metrics.jsonl (test/harness/<task>) and report.md."""
  sections = harness_sections(config, loaded, params)
  for section, metrics in sections.items():
    writer.write(step, "test/" + section.replace(": ", "/").replace(" ", "_"), metrics)
  path = report.write_report(os.path.join(workdir, "report.md"),
                             f"{config.task} run: {os.path.basename(workdir)}", sections,
                             notes=[f"{k}: {v}" for k, v in facts.items()])
  logging.info("harness scores written to %s", path)
  return sections


class FinetuneEvaluation:
  """What a fine-tuning (or task-distillation) run adds to the loop: the evaluators at every
  validation, the best-validation state kept in <workdir>/best/, and the final test evaluation
  of that state, all predicting through the inference API."""

  def __init__(self, config, workdir: str, parts: build.Parts, inputs):
    self.config, self.workdir, self.parts, self.splits = config, workdir, parts, inputs.splits
    self.loaded = loading.LoadedModel(config, task_kind(config), parts.model, None,
                                      inputs.tokenizer, 0, mesh=parts.mesh)
    self.best_checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"),
                                                         every=1, keep=1)
    latest = self.best_checkpointer.latest_step()
    self.best = (None if latest is None else
                 self.best_checkpointer.restore_meta(latest).get("best"))
    self.decoding, self.decode_facts = (
        decode_options(config, self.loaded, self.splits["train"])
        if self.loaded.kind == "summarize" else ({}, {}))

  def hooks(self, process_count: int) -> dict:
    if process_count > 1:   # the evaluators predict on whole splits from one process
      return {}
    return validation_hooks(self.config, self.loaded, self.splits, self.parts.eval_params,
                            self.decoding)

  def final(self, result: dict, writer, facts: dict) -> dict:
    """The test evaluation of the best validation state (else the last one) -> report.md."""
    params = result["state"].params
    if result["best"]:
      restored, _ = self.best_checkpointer.restore(result["best"]["step"],
                                                   self.parts.abstract_target())
      params = restored.params
      logging.info("test evaluation with the best validation state (step %d)",
                   result["best"]["step"])
    return run(self.config, self.workdir, loaded=self.loaded,
               params=self.parts.eval_params(params), splits=self.splits, writer=writer,
               step=result["step"], decoding=self.decoding,
               facts={**facts, **self.decode_facts, "best validation": result["best"],
                      "train examples": len(self.splits["train"])})

  def close(self):
    self.best_checkpointer.close()

