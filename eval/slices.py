r"""Any evaluator, per slice of the test set: input-length buckets and record-field values.

Why: an overall score hides where a model fails - long judgments truncated to the context
window, one source dataset, one class of review. `evaluate_slices` reruns an evaluator's
`evaluate(records, cfg)` on each slice and names the worst slice per headline metric, so a
report can say "ROUGE-L drops to 0.21 on documents of >= 4096 words" without new code.

Slices (each record may be in one length slice and in one slice per field; empty slices are
left out):
- length: words (whitespace-separated) of `record[text_field]` ("text" when that field is
  absent) against the edges `cfg.length_buckets`, e.g. (256, 1024, 4096) gives "words<256",
  "words 256-1024" (256 <= words < 1024), "words 1024-4096" and "words>=4096".
- `field=value` for every value of each field named in `cfg.slice_fields`.
"""
import bisect

from eval import common

# Top-level metrics of the evaluators here for which a higher value is better.
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "rougeLsum",
                    "number_precision", "date_precision", "entity_precision")


def bucket_names(edges) -> list[str]:
  """The length-slice names for these edges, shortest first."""
  edges = sorted(edges)
  return ([f"words<{edges[0]}"] + [f"words {lo}-{hi}" for lo, hi in zip(edges, edges[1:])] +
          [f"words>={edges[-1]}"])


def length_bucket(num_words: int, edges) -> str:
  return bucket_names(edges)[bisect.bisect_right(sorted(edges), num_words)]


def _text(record: dict, text_field: str, index: int) -> str:
  for field in (text_field, "text"):
    if isinstance(record.get(field), str):
      return record[field]
  raise common.EvalError(f"slices: record {index} has no text in {text_field!r} or 'text' to "
                         f"bucket by length (fields: {sorted(record)})")


def slice_records(records: list[dict], cfg, text_field: str = "source") -> dict[str, list[dict]]:
  """{slice name: records}, length buckets in edge order, then fields and values sorted."""
  slices = {}
  edges = tuple(cfg.length_buckets)
  if edges:
    by_bucket = {}
    for i, r in enumerate(records):
      name = length_bucket(len(_text(r, text_field, i).split()), edges)
      by_bucket.setdefault(name, []).append(r)
    slices.update((name, by_bucket[name]) for name in bucket_names(edges) if name in by_bucket)
  for field in cfg.slice_fields:
    by_value = {}
    for i, r in enumerate(records):
      if field not in r:
        raise common.EvalError(f"slices: record {i} has no field {field!r} named in "
                               f"config.eval.slice_fields (fields: {sorted(r)})")
      by_value.setdefault(str(r[field]), []).append(r)
    slices.update((f"{field}={value}", by_value[value]) for value in sorted(by_value))
  return slices


def evaluate_slices(evaluate_fn, records: list[dict], cfg, text_field: str = "source",
                    higher_is_better=HIGHER_IS_BETTER) -> dict:
  """{"slices": {name: metrics}, "worst": {metric: {"slice": name, "value": v}}}.

  "worst" covers each metric in `higher_is_better` that some slice reports as a number: the
  slice with the lowest value (the first such slice on ties).
  """
  results = {name: evaluate_fn(subset, cfg)
             for name, subset in slice_records(records, cfg, text_field).items()}
  worst = {}
  for metric in higher_is_better:
    for name, metrics in results.items():
      value = metrics.get(metric)
      if common.is_scalar(value) and (metric not in worst or value < worst[metric]["value"]):
        worst[metric] = {"slice": name, "value": value}
  return {"slices": results, "worst": worst}
