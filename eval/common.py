r"""What every prediction evaluator (classification, rouge, factual, ...) shares.

Each evaluator is `eval/<name>.py` with `NAME` and `evaluate(records, cfg) -> dict`, where
`records` are dicts (one per test example, as written to a predictions .jsonl) and `cfg` is the
`config.eval` ConfigDict of configs/common.py. This module holds the pieces they would
otherwise copy: reading JSONL, bootstrap confidence intervals, a sentence splitter, and the
absl boilerplate that makes each evaluator runnable alone:

  python -m eval.<name> --records=preds.jsonl [--out=metrics.json] [--bootstrap=1000]

Convention for confidence intervals: metric `m` has its 95% interval, when computed, in
`m + report.CI_SUFFIX` ("m_ci") as `[low, high]`; eval/report.py renders the pair as
`0.912 [0.905, 0.919]`.
"""
import gzip
import json
import math
import os
import re

from absl import app, flags
import numpy as np

from configs import common as configs_common
from eval import report
from model import errors


class EvalError(errors.UserError):
  """Bad evaluator input; the message names the file, row or key at fault and what was expected."""


def eval_config(**overrides):
  """The default `config.eval` (configs/common.py), for callers without a run config."""
  cfg = configs_common.base_config().eval
  cfg.update(overrides)
  return cfg


def read_jsonl(path: str) -> list[dict]:
  """One JSON object per non-blank line of a .jsonl or .jsonl.gz file."""
  if not os.path.isfile(path):
    raise EvalError(f"{path}: no such file (expected one JSON record per line)")
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise EvalError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
      records.append(record)
  return records


def check_fields(records: list[dict], fields: dict, what: str) -> None:
  """Raises EvalError unless every record has each field with the given type(s)."""
  if not records:
    raise EvalError(f"{what}: no records to evaluate")
  for i, record in enumerate(records):
    for field, types in fields.items():
      if field not in record:
        raise EvalError(f"{what}: record {i} has no {field!r} field (has {sorted(record)})")
      if not isinstance(record[field], types) or isinstance(record[field], bool):
        raise EvalError(f"{what}: record {i} field {field!r} is {record[field]!r}; expected "
                        f"{getattr(types, '__name__', types)}")


def bootstrap_ci(values, n_resamples: int, seed: int = 0) -> list[float] | None:
  """Percentile 95% interval of the mean of `values` over seeded resamples (None if 0)."""
  values = np.asarray(values, np.float64)
  if n_resamples <= 0 or values.size == 0:
    return None
  rng = np.random.default_rng(seed)
  # Resample in chunks so a 25k-example test set x 1000 resamples stays a few MB at a time.
  chunk = max(1, 2_000_000 // values.size)
  means = []
  for start in range(0, n_resamples, chunk):
    idx = rng.integers(0, values.size, size=(min(chunk, n_resamples - start), values.size))
    means.append(values[idx].mean(axis=1))
  low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
  return [float(low), float(high)]


def add_mean(out: dict, name: str, values, cfg, seed: int = 0) -> None:
  """out[name] = mean of per-example `values`, plus out[name_ci] when cfg.bootstrap > 0."""
  values = np.asarray(values, np.float64)
  out[name] = float(values.mean()) if values.size else None
  ci = bootstrap_ci(values, int(cfg.bootstrap), seed)
  if ci is not None:
    out[name + report.CI_SUFFIX] = ci


def is_scalar(value) -> bool:
  """A number a table, TensorBoard or the worst-slice search can use (bools excluded)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and not (isinstance(value, float) and math.isnan(value)))


# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by whitespace
# and a capital letter, digit or opening quote; line breaks always end one. Simple on purpose:
# it splits after abbreviations such as "Mr." or "Sec." when a capital follows; good enough for
# lead-k baselines and ROUGE-Lsum, whose sentence boundaries only need to be roughly right.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
  return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def run_cli(evaluate, title: str, paired: bool = False) -> None:
  """`python -m eval.<name> --records=... [--out=...] [--bootstrap=N]` for one evaluator,
  `evaluate(records, cfg)`; with `paired`, also --baseline=... for `evaluate(records, baseline,
  cfg)` (two systems on the same examples)."""
  flags.DEFINE_string("records", None, "Predictions: one JSON record per line (.jsonl[.gz]).")
  if paired:
    flags.DEFINE_string("baseline", None, "The other system's predictions on the same examples.")
    flags.mark_flag_as_required("baseline")
  flags.DEFINE_string("out", None, "Also write the metrics here as JSON.")
  flags.DEFINE_integer("bootstrap", None, "Resamples for 95% CIs (default: config.eval's).")
  flags.mark_flag_as_required("records")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    cfg = eval_config()
    if fl.bootstrap is not None:
      cfg.bootstrap = fl.bootstrap
    records = read_jsonl(fl.records)
    if paired:
      metrics = evaluate(records, read_jsonl(fl.baseline), cfg)
      print_and_save(metrics, f"{title}: {fl.records} minus {fl.baseline}", fl.out)
    else:
      print_and_save(evaluate(records, cfg), f"{title}: {fl.records}", fl.out)

  app.run(errors.exit_on_user_error(main))


def print_and_save(metrics: dict, title: str, out: str | None) -> None:
  print(f"## {title}\n\n{report.render_section(metrics)}")
  if out:
    with open(out, "w", encoding="utf-8") as f:
      json.dump(metrics, f, indent=2)
    print(f"wrote {out}")
