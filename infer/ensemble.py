"""Several classifier runs as one predictor: the mean of their class probabilities.

  python -m infer.main --workdir=runs/a,runs/b,runs/c --input=reviews.jsonl --output=preds.jsonl
  python -m infer.serve --workdir=runs/a,runs/b,runs/c --port=8000     # POST /classify

The rule train/ensemble.py scores from finished runs' test predictions (and eval.classification
.mean_probabilities computes), here at inference: each member predicts the batch through its own
LoadedModel (its tokenizer, window stride, quantization), then the probabilities are averaged.
Costs one forward pass per member; on IMDB four fine-tunes averaged were the first model above
TF-IDF (README, "IMDB self-pre-training").
"""
import numpy as np

from infer import loading


class ClassifierEnsemble:
  """What batch inference and the server use of a LoadedModel, for averaged classifiers."""
  kind = "classify"

  def __init__(self, members: list[loading.LoadedModel], workdirs: list[str]):
    if len(members) < 2 or len(workdirs) != len(members):
      raise ValueError(f"an ensemble needs >= 2 members, one workdir each; got {len(members)}")
    for member, workdir in zip(members, workdirs):
      if member.kind != "classify":
        raise ValueError(f"{workdir} holds a {member.kind!r} run; an ensemble averages "
                         "classifiers")
      if member.config.model.num_classes != members[0].config.model.num_classes:
        raise ValueError(f"{workdir} has {member.config.model.num_classes} classes; "
                         f"{workdirs[0]} has {members[0].config.model.num_classes}")
    self.members, self.workdirs = members, workdirs
    # What the server's /health shows: the newest member's step, the first member's config
    # (sequence length, classes), every member's parameters.
    self.step = max(m.step for m in members)
    self.config = members[0].config
    self.params = [m.params for m in members]

  def check_max_new(self, max_new: int | None) -> None:
    return self.members[0].check_max_new(max_new)   # classifiers: None, or a clear error

  def warm_up(self, sizes: list[int], max_new: int | None) -> int:
    """Compiles every member for every batch size; returns how many shapes."""
    return sum(m.warm_up(sizes, max_new) for m in self.members)

  def classify(self, texts: list[str], **options) -> np.ndarray:
    """[len(texts), num_classes]: the members' class probabilities, averaged."""
    return np.mean([np.asarray(m.classify(texts, **options)) for m in self.members], axis=0)

  def predict(self, texts: list[str], *, max_new: int | None = None,
              pad_to: int | None = None, **decoding) -> list[dict]:
    """LoadedModel.predict's {"probs", "label"} per text (each member's, padded to `pad_to`
    rows as it pads), from the members' averaged probabilities."""
    if max_new or decoding:
      raise ValueError("an ensemble of classifiers does not decode")
    probs = np.mean([[r["probs"] for r in m.predict(texts, pad_to=pad_to)]
                     for m in self.members], axis=0)
    return [{"probs": p.tolist(), "label": int(p.argmax())} for p in probs]
