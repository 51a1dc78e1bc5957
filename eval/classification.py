r"""Classification metrics from predicted class probabilities.

  python -m eval.classification --records=test_predictions.jsonl [--out=metrics.json]

Records: `{"label": int, "probs": [p_0, ..., p_{C-1}], ...}` (other fields are ignored here and
used by eval/slices.py). The prediction is the arg-max class. Why more than accuracy: macro F1
and the per-class table expose a model that ignores a minority class, the confusion matrix
says which classes it confuses, and ECE / NLL say whether its probabilities can be trusted
(a fine-tuned transformer is often accurate but over-confident).

Definitions (the first three computed by sklearn.metrics):
- per class c: precision = TP / predicted c, recall = TP / true c, F1 their harmonic mean; 0
  where the denominator is 0 (zero_division=0).
- macro_f1: mean F1 over the classes that occur as a label or a prediction (sklearn's default
  label set), so a class absent from both does not count as a zero.
- confusion_matrix[i][j]: examples of true class i predicted as j.
- ece: top-label expected calibration error, 15 equal-width confidence bins (lo, hi]:
  sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.
- nll: mean -log p(true label), with p clipped at 1e-12 so one zero cannot make it infinite.
"""
import numpy as np

from eval import common

NAME = "classification"
ECE_BINS = 15
# Probabilities must sum to 1 within this; softmax outputs in float32 are far closer.
_SUM_TOLERANCE = 1e-3


def _arrays(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(labels [N], probs [N, C]) after checking every record."""
  common.check_fields(records, {"label": int, "probs": list}, NAME)
  num_classes = len(records[0]["probs"])
  if num_classes < 2:
    raise common.EvalError(f"{NAME}: record 0 has {num_classes} probabilities; expected >= 2")
  for i, r in enumerate(records):
    if len(r["probs"]) != num_classes:
      raise common.EvalError(f"{NAME}: record {i} has {len(r['probs'])} probabilities; expected "
                             f"{num_classes} like record 0")
    if not 0 <= r["label"] < num_classes:
      raise common.EvalError(f"{NAME}: record {i} label {r['label']} is outside "
                             f"[0, {num_classes})")
  probs = np.asarray([r["probs"] for r in records], np.float64)
  with np.errstate(invalid="ignore"):
    bad = (~np.isfinite(probs).all(1) | (probs < 0).any(1) |
           (np.abs(probs.sum(1) - 1) > _SUM_TOLERANCE))
  if bad.any():
    i = int(np.argmax(bad))
    raise common.EvalError(f"{NAME}: record {i} probs {records[i]['probs']} are not a "
                           f"probability distribution (finite, >= 0, summing to 1); logits?")
  return np.asarray([r["label"] for r in records]), probs


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  # Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; a confidence of 0 joins bin 0.
  bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    in_bin = bins == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return float(ece)


def evaluate(records: list[dict], cfg) -> dict:
  # Imported here, as in the other evaluators: importing this module (the training run's final
  # evaluation does) stays cheap.
  from sklearn import metrics
  labels, probs = _arrays(records)
  num_classes = probs.shape[1]
  classes = np.arange(num_classes)
  predicted = probs.argmax(1)
  correct = (predicted == labels).astype(np.float64)

  out = {"count": len(records), "num_classes": num_classes}
  # accuracy_score(labels, predicted) is this mean; add_mean also needs the per-example values
  # for its bootstrap CI.
  common.add_mean(out, "accuracy", correct, cfg)
  precision, recall, f1, support = metrics.precision_recall_fscore_support(
      labels, predicted, labels=classes, zero_division=0)
  out["macro_f1"] = float(metrics.f1_score(labels, predicted, average="macro", zero_division=0))
  out["ece"] = expected_calibration_error(probs.max(1), correct)
  # Not sklearn's log_loss: it clips at float64 eps (not 1e-12) and warns on float32 softmax
  # outputs whose sums are off by 1e-7, which the check in _arrays accepts.
  out["nll"] = float(_correct_and_nll(labels, probs)[1].mean())
  out["per_class"] = [
      {"class": c, "precision": float(precision[c]), "recall": float(recall[c]),
       "f1": float(f1[c]), "support": int(support[c])} for c in range(num_classes)]
  out["confusion_matrix"] = metrics.confusion_matrix(labels, predicted, labels=classes).tolist()
  return out


def _correct_and_nll(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p_true = probs[np.arange(len(labels)), labels]
  return probs.argmax(1) == labels, -np.log(np.maximum(p_true, 1e-12))


def _check_same_examples(records: list[dict], other: list[dict], what: str) -> None:
  """Raises EvalError (starting with `what`) unless both lists hold the same examples in the
  same order: same labels, and same ids where both have them (a baseline scored elsewhere may
  carry none)."""
  ids, other_ids = [r.get("id") for r in records], [r.get("id") for r in other]
  if len(records) != len(other) or any(r["label"] != o["label"] for r, o in zip(records, other)) \
      or (None not in ids and None not in other_ids and ids != other_ids):
    raise common.EvalError(f"{what} are not the same examples in the same order (ids or labels "
                           "differ)")


def mean_probabilities(members: list[list[dict]], names: list[str]) -> list[dict]:
  """An ensemble's records: member 0's records with "probs" replaced by the mean of every
  member's class probabilities for that example. Why the probabilities' mean: it is the
  usual rule for ensembles of fine-tunes, needs no weights to choose, and stays calibrated
  when the members are. `names` (e.g. the files) are for the errors."""
  if len(members) < 2 or len(names) != len(members):
    raise common.EvalError(f"ensemble: {len(members)} members; expected >= 2, one name each")
  probs = [_arrays(members[0])[1]]
  for name, records in zip(names[1:], members[1:]):
    probs.append(_arrays(records)[1])
    _check_same_examples(records, members[0], f"ensemble: {name}'s {len(records)} records and "
                         f"{names[0]}'s {len(members[0])}")
    if probs[-1].shape != probs[0].shape:
      raise common.EvalError(f"ensemble: {name} has {probs[-1].shape[1]} classes; "
                             f"{names[0]} has {probs[0].shape[1]}")
  mean = np.mean(probs, axis=0)
  return [dict(r, probs=p.tolist()) for r, p in zip(members[0], mean)]


def paired_difference(records: list[dict], baseline: list[dict], cfg) -> dict:
  """The model's per-example correctness and log-loss minus the baseline's on the same
  examples, averaged, with bootstrap CIs over examples: an accuracy interval above zero says
  the model beats the baseline on this test set (two overlapping per-system CIs cannot say
  either way). Also the discordant pairs (McNemar's table): examples only the model gets right
  and only the baseline does."""
  labels, probs = _arrays(records)
  base_labels, base_probs = _arrays(baseline)
  _check_same_examples(records, baseline, f"{NAME} paired difference: the {len(records)} "
                       f"records and the {len(baseline)} baseline records")
  correct, nll = _correct_and_nll(labels, probs)
  base_correct, base_nll = _correct_and_nll(base_labels, base_probs)
  out = {"count": len(records)}
  common.add_mean(out, "accuracy", correct.astype(np.float64) - base_correct, cfg)
  common.add_mean(out, "nll", nll - base_nll, cfg)
  out["model_only_correct"] = int((correct & ~base_correct).sum())
  out["baseline_only_correct"] = int((base_correct & ~correct).sum())
  return out


if __name__ == "__main__":
  common.run_cli(evaluate, "classification")
