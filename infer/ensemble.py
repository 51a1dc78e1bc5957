"""Several runs as one predictor: classifiers by the mean of their class probabilities,
summarizers by the consensus of their summaries.

  python -m infer.main --workdir=runs/a,runs/b,runs/c --input=reviews.jsonl --output=preds.jsonl
  python -m infer.serve --workdir=runs/a,runs/b,runs/c --port=8000     # POST /classify

The rules train/ensemble.py scores from finished runs' test predictions, here at inference: each
member predicts the batch through its own LoadedModel (its tokenizer, window stride,
quantization, decoding), then the probabilities are averaged, or, for summaries, the member's
summary that agrees most with the others' is kept (`consensus`). Costs one forward pass (or one
decode) per member; on IMDB four fine-tunes averaged are the first model above TF-IDF
(docs/results/imdb.md).
"""
import re

import numpy as np

from infer import loading
from infer import rerank


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


# rouge_score's default tokenizer: lowercase, runs of [a-z0-9] (punctuation is no word).
_ROUGE_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
  return _ROUGE_WORD.findall(text.lower())


def consensus(summaries: list[str], source: str = "", source_weight: float = 0.0) -> int:
  """The index of the summary with the highest mean agreement (infer/rerank.py: the mean of
  unigram and bigram F1 over ROUGE's words) with the others, plus source_weight times its
  support in the document `source` (rerank.support): post-ensemble selection (Kobayashi,
  2018), MBR with the members' outputs as the candidates. It needs no weights and no shared
  vocabulary, and keeps a summary one model wrote, so it stays fluent where averaging token
  distributions across differently-trained members would not. Ties: the first."""
  return rerank.mbr_index([_words(s) for s in summaries], _words(source), source_weight)


class SummarizerEnsemble:
  """What batch inference and the server use of a LoadedModel, for summarizers combined by
  `consensus`: each member summarizes with the same decoding options, one summary is kept."""
  kind = "summarize"

  def __init__(self, members: list[loading.LoadedModel], workdirs: list[str]):
    # Two summaries agree with each other equally: consensus needs a third to break the tie.
    if len(members) < 3 or len(workdirs) != len(members):
      raise ValueError(f"an ensemble of summarizers needs >= 3 members, one workdir each (two "
                       f"agree with each other equally); got {len(members)}")
    for member, workdir in zip(members, workdirs):
      if member.kind != "summarize":
        raise ValueError(f"{workdir} holds a {member.kind!r} run; an ensemble of summarizers "
                         "needs summarizers only")
    self.members, self.workdirs = members, workdirs
    self.step = max(m.step for m in members)
    self.config = members[0].config
    self.params = [m.params for m in members]

  def check_max_new(self, max_new: int | None) -> int:
    """The first member's summary length (its default when None), checked against every
    member's sequence length."""
    max_new = self.members[0].check_max_new(max_new)
    for member in self.members[1:]:
      member.check_max_new(max_new)
    return max_new

  def warm_up(self, sizes: list[int], max_new: int | None) -> int:
    return sum(m.warm_up(sizes, max_new) for m in self.members)

  def predict(self, texts: list[str], *, max_new: int | None = None,
              pad_to: int | None = None, **decoding) -> list[dict]:
    """LoadedModel.predict's {"summary"} per text: every member's (each padding the batch to
    `pad_to` rows as it pads, decoding with the same options), then per text the consensus,
    weighing support in the text by decoding["source_weight"] as each member's MBR does."""
    per_member = [[r["summary"] for r in m.predict(texts, max_new=max_new, pad_to=pad_to,
                                                   **decoding)] for m in self.members]
    weight = decoding.get("source_weight", 0.0)
    return [{"summary": row[consensus(list(row), text, weight)]}
            for text, row in zip(texts, zip(*per_member))]
