r"""The classic text-classification baseline: TF-IDF word 1-2-grams + logistic regression.

  python -m eval.tfidf_baseline --train=train.jsonl.gz --test=test.jsonl.gz [--max_train=N]

Why: a fine-tuned transformer has to beat this to be worth its cost; on IMDB it reaches about
90% accuracy in well under a minute of CPU. It is scored by eval/classification.py, so its
accuracy, F1, calibration and per-class numbers sit in the same tables as the model's.

Settings are the usual strong defaults, not tuned on the test set: sublinear TF (1 + log tf),
word uni- and bigrams seen in >= 2 training documents, the 200k most frequent, and an L2
logistic regression with C = 8 (weak regularisation suits many sparse features).
"""
import random
import time

from absl import app, flags
import numpy as np

from eval import classification, common
from model import errors

NAME = "tfidf_baseline"
MAX_FEATURES = 200_000
C = 8.0


def _texts_and_labels(records: list[dict], text_field: str, label_field: str, what: str):
  common.check_fields(records, {text_field: str, label_field: int}, what)
  for i, r in enumerate(records):
    if r[label_field] < 0:
      raise common.EvalError(f"{what}: record {i} {label_field} is {r[label_field]}; expected a "
                             f"class id >= 0")
  return [r[text_field] for r in records], np.asarray([r[label_field] for r in records])


def predict(train_records: list[dict], test_records: list[dict], text_field: str = "text",
            label_field: str = "label", seed: int = 0) -> tuple[list[dict], dict]:
  """Fits on `train_records`; returns (one {"label", "probs"[, "id"]} record per test record,
  in order - what eval/classification.py scores - and {"train_seconds" (vectorising +
  fitting), "num_features", "train_examples"})."""
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.linear_model import LogisticRegression
  train_x, train_y = _texts_and_labels(train_records, text_field, label_field, "tfidf train")
  test_x, test_y = _texts_and_labels(test_records, text_field, label_field, "tfidf test")
  if len(set(train_y.tolist())) < 2:
    raise common.EvalError(f"tfidf train: every record has label {train_y[0]}; expected >= 2 "
                           f"classes")
  start = time.perf_counter()
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2,
                               max_features=MAX_FEATURES)
  model = LogisticRegression(C=C, max_iter=1000, random_state=seed)
  model.fit(vectorizer.fit_transform(train_x), train_y)
  train_seconds = time.perf_counter() - start

  # Columns of predict_proba are model.classes_; a class missing from training keeps p = 0.
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  probs = np.zeros((len(test_x), num_classes))
  probs[:, model.classes_] = model.predict_proba(vectorizer.transform(test_x))
  records = [{"label": int(y), "probs": p.tolist()} for y, p in zip(test_y, probs)]
  for record, test in zip(records, test_records):
    if "id" in test:   # lets a paired comparison check it holds the model's examples
      record["id"] = test["id"]
  return records, {"train_seconds": round(train_seconds, 2),
                   "num_features": len(vectorizer.vocabulary_), "train_examples": len(train_x)}


def run(train_records: list[dict], test_records: list[dict], text_field: str = "text",
        label_field: str = "label", seed: int = 0, cfg=None) -> dict:
  """predict's fit, scored: classification metrics on `test_records` plus its facts."""
  records, facts = predict(train_records, test_records, text_field, label_field, seed)
  metrics = classification.evaluate(records, cfg if cfg is not None else common.eval_config())
  metrics.update(facts)
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  train = common.read_jsonl(fl.train)
  if 0 <= fl.max_train < len(train):
    train = random.Random(fl.seed).sample(train, fl.max_train)
  metrics = run(train, common.read_jsonl(fl.test), fl.text_field, fl.label_field, fl.seed)
  common.print_and_save(metrics, f"TF-IDF + logistic regression: {fl.test}", fl.out)


if __name__ == "__main__":
  flags.DEFINE_string("train", None, "Training records, .jsonl or .jsonl.gz.")
  flags.DEFINE_string("test", None, "Test records, .jsonl or .jsonl.gz.")
  flags.DEFINE_integer("max_train", -1, "Train on a seeded sample of this many; -1 = all.")
  flags.DEFINE_string("text_field", "text", "Field holding the text.")
  flags.DEFINE_string("label_field", "label", "Field holding the integer class id.")
  flags.DEFINE_integer("seed", 0, "Seed of the --max_train sample and the classifier.")
  flags.DEFINE_string("out", None, "Also write the metrics here as JSON.")
  flags.mark_flags_as_required(["train", "test"])
  app.run(errors.exit_on_user_error(main))
