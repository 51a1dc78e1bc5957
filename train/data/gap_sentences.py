"""Gap-sentence pseudo-summaries: summarization pairs made from unlabelled documents.

PEGASUS (Zhang et al., 2020) pre-trains a summarizer by removing a document's most "central"
sentences and generating them from the rest, and reports that such a start fine-tunes well
from as few as 1,000 real pairs. Our plain-English summarizers, fine-tuned from an LM on 345
pairs, ignore the document and write one generic sentence (docs/results/summarization.md);
a start that has learnt to read its document before writing is the remedy tried here.
Measured (docs/results/summarization.md, "A wider, longer-trained LM and a gap-sentence
start"): lower validation loss for both seeds, but test ROUGE level with the plain LM start's
(the paired differences go both ways between seeds).

With `data.gap_sentences.ratio` > 0 a summarize run reads `data.train_file` as unlabelled texts
(field data.text_field; no summaries needed) and trains on pseudo-pairs instead:
- each document is cut into passages of whole consecutive sentences, up to `passage_words`
  words each (a single longer sentence is a passage of its own and is dropped: it leaves
  nothing to read);
- in a passage of n >= 2 sentences, the max(1, round(ratio * n)) sentences (at most n - 1) with
  the highest ROUGE-1 F1 against the rest of the passage are the summary, in document order
  (PEGASUS's "Ind-Orig" choice);
- the passage with each chosen sentence replaced by `mask` ("" removes it) is the document;
- `lowercase` lowercases both (the plain-English pairs are lowercase).
The validation/test split is made by document before the cut, so a document's passages stay in
one split; data.max_examples / max_validation_examples then count passages.
"""
import collections
import dataclasses
import re

from absl import logging

from eval import common as eval_common

_WORD = re.compile(r"\w+")


def enabled(data_cfg) -> bool:
  return data_cfg.gap_sentences.ratio > 0


def passages(text: str, max_words: int) -> list[list[str]]:
  """Consecutive sentences of `text`, grouped greedily into passages of <= max_words words."""
  out, current, words = [], [], 0
  for sentence in eval_common.split_sentences(text):
    n = len(sentence.split())
    if current and words + n > max_words:
      out.append(current)
      current, words = [], 0
    current.append(sentence)
    words += n
  if current:
    out.append(current)
  return out


def centrality(sentences: list[str]) -> list[float]:
  """ROUGE-1 F1 (lowercased word unigrams, clipped counts) of each sentence against the rest."""
  counts = [collections.Counter(_WORD.findall(s.lower())) for s in sentences]
  total = sum(counts, collections.Counter())
  total_len = total.total()
  scores = []
  for own in counts:
    overlap = sum(min(c, total[w] - c) for w, c in own.items())
    # F1 = 2PR / (P + R) = 2 overlap / (own words + rest words) = 2 overlap / passage words
    scores.append(2 * overlap / total_len if overlap else 0.0)
  return scores


def make_pair(sentences: list[str], cfg) -> tuple[str, str] | None:
  """(document with the gaps, summary) of one passage, or None when it has one sentence."""
  n = len(sentences)
  if n < 2:
    return None
  m = min(n - 1, max(1, round(cfg.ratio * n)))
  scores = centrality(sentences)
  chosen = set(sorted(range(n), key=lambda i: (-scores[i], i))[:m])
  document = " ".join(cfg.mask if i in chosen else s for i, s in enumerate(sentences)
                      if cfg.mask or i not in chosen)
  summary = " ".join(sentences[i] for i in sorted(chosen))
  if cfg.lowercase:
    document, summary = document.lower(), summary.lower()
  return document, summary


def pseudo_pairs(documents: list, cfg) -> list:
  """The pseudo-pairs of `documents` (examples.Example; ids '<document id>#<passage index>')."""
  pairs = []
  for doc in documents:
    for k, sentences in enumerate(passages(doc.text, cfg.passage_words)):
      pair = make_pair(sentences, cfg)
      if pair:
        pairs.append(dataclasses.replace(doc, id=f"{doc.id}#{k}", text=pair[0], target=pair[1]))
  logging.info("gap sentences: %d pseudo-pairs from %d documents", len(pairs), len(documents))
  return pairs
