r"""Two systems on the same test examples: per-example score differences with bootstrap CIs.

  python -m eval.paired --records=runs/curve_w254/test_predictions.jsonl \
      --baseline=runs/curve/test_predictions.jsonl [--bootstrap=1000] [--out=paired.json]

Why: two systems' own 95% CIs overlapping does not say they are level. Both read the same
examples, so most of each one's sampling noise is shared; the CI of the mean per-example
difference (each resample drawing the same examples for both) cancels it and is the test.
Classifier predictions (records with "probs") give the accuracy and NLL differences and the
discordant pairs (eval/classification.py); summaries (records with "prediction") the ROUGE
differences (eval/rouge.py). Both files must hold the same examples in the same order (checked
by id, and by label for classifiers): e.g. one run re-scored with other inference settings
(train.redecode), or two fine-tunes of one test set.
"""
from eval import classification, common, rouge


def paired_difference(records: list[dict], baseline: list[dict], cfg) -> dict:
  """Per-example `records` minus `baseline`, the evaluator chosen by the records' fields."""
  if not records or not baseline:
    raise common.EvalError("paired: both files need records")
  if "probs" in records[0]:
    return classification.paired_difference(records, baseline, cfg)
  if "prediction" in records[0]:
    return rouge.paired_difference(records, baseline, cfg)
  raise common.EvalError(f"paired: record 0 has neither 'probs' (a classifier's) nor "
                         f"'prediction' (a summarizer's); has {sorted(records[0])}")


if __name__ == "__main__":
  common.run_cli(paired_difference, "paired", paired=True)
