"""Sampling with re-ranking: minimum Bayes risk (MBR) decoding for summaries.

Greedy and beam search return the summary the model finds most probable, and a small model's
most probable summary is often short and generic. MBR decoding draws `samples` summaries per
document, adds the deterministic one (greedy or beam), and keeps the candidate that agrees
most with all the others: the consensus, a reference-free estimate of the candidate with the
highest expected ROUGE (Kumar & Byrne, 2004; Freitag et al., 2022; Suzgun et al., 2022).

The agreement ("utility") is ROUGE's own: the mean of unigram and bigram F1, counted over
token ids (or words assembled from pieces, so "The" and " the" are one word), on the host in
numpy after one batched, compiled sampling call - the re-ranking itself is N^2 small set
overlaps per document, microseconds next to decoding.

`source_weight` > 0 adds the candidate's support in its document: the mean of its unigram and
bigram precision against the document's words, times the weight. A small model's samples agree
most on the generic summaries it falls back on ("you are responsible for your account"), which
the document may not support at all; support favours the samples that say what this document
says (the faithfulness re-ranking of e.g. Falke et al., 2019, with a lexical proxy).
"""
import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from infer import decode, decode_controls
from infer import word_ngrams


def _ngrams(ids, n: int) -> collections.Counter:
  return collections.Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))


def _f1(ca: collections.Counter, cb: collections.Counter) -> float:
  if not ca or not cb:
    return 0.0
  return 2.0 * sum((ca & cb).values()) / (ca.total() + cb.total())


def ngram_f1(a, b, n: int) -> float:
  """F1 of the n-gram multisets of id sequences a and b (ROUGE-n F without a reference's
  priority: symmetric). 0 when either has no n-gram."""
  return _f1(_ngrams(a, n), _ngrams(b, n))


def _profile(ids) -> tuple:
  return _ngrams(ids, 1), _ngrams(ids, 2)


def _agreement(pa: tuple, pb: tuple) -> float:
  return 0.5 * (_f1(pa[0], pb[0]) + _f1(pa[1], pb[1]))


def agreement(a, b) -> float:
  """The utility MBR maximises: (unigram F1 + bigram F1) / 2, as ROUGE-1/2 would score a
  against b."""
  return _agreement(_profile(a), _profile(b))


def _support(profile: tuple, source_profile: tuple) -> float:
  precision = lambda ours, theirs: sum((ours & theirs).values()) / ours.total() if ours else 0.0
  return 0.5 * sum(precision(o, t) for o, t in zip(profile, source_profile))


def support(candidate, source) -> float:
  """How much of `candidate` its document `source` says: the mean of the candidate's unigram
  and bigram precision against the source (0 for an empty candidate)."""
  return _support(_profile(candidate), _profile(source))


def mbr_index(candidates: list, source=None, source_weight: float = 0.0) -> int:
  """The candidate with the highest mean agreement with the others, plus source_weight times
  its `support` in `source` (ties: the first, so the deterministic candidate, placed first,
  wins a tie). Each candidate's n-grams are counted once, not once per pair."""
  if len(candidates) == 1:
    return 0
  profiles = [_profile(c) for c in candidates]
  scores = np.zeros((len(candidates), len(candidates)))
  for i in range(len(candidates)):
    for j in range(i + 1, len(candidates)):
      scores[i, j] = scores[j, i] = _agreement(profiles[i], profiles[j])
  utility = scores.sum(axis=1)
  if source_weight:   # the document's n-grams counted once; agreement as a mean, in [0, 1]
    source_profile = _profile(source)
    utility = utility / (len(candidates) - 1) + source_weight * np.array(
        [_support(p, source_profile) for p in profiles])
  return int(np.argmax(utility))


def sample(model, params, tokens, prompt_len, rng, *, samples: int, max_new: int, eos_id: int,
           controls: decode_controls.Controls, limit=None) -> np.ndarray:
  """[B, samples, max_new] sampled continuations of each of the B prompts (one compiled call
  over B * samples rows; `controls` must sample, i.e. temperature > 0)."""
  if not controls.samples:
    raise ValueError("sampling needs controls.temperature > 0")
  repeat = lambda x: None if x is None else jnp.repeat(jnp.asarray(x), samples, axis=0)
  ids = decode.generate(model, params, repeat(tokens), repeat(prompt_len), rng,
                        max_new=max_new, eos_id=eos_id, controls=controls,
                        limit=repeat(limit))
  return np.asarray(ids).reshape(tokens.shape[0], samples, max_new)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """MBR decoding's settings: `samples` drawn summaries per document (0: off) at
  `temperature`, restricted to the nucleus `top_p`, from PRNG `seed`; `source_weight`: the
  weight of a candidate's support in its document (0: agreement alone)."""
  samples: int = 0
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  source_weight: float = 0.0

  def __post_init__(self):
    number = lambda v: (isinstance(v, (int, float, np.integer, np.floating))
                        and not isinstance(v, bool) and math.isfinite(v))
    problems = [(number(self.samples) and self.samples >= 0,
                 f"samples={self.samples}: expected >= 0 (0: off)"),
                (number(self.temperature) and self.temperature > 0,
                 f"temperature={self.temperature}: expected > 0"),
                (number(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p={self.top_p}: expected (0, 1]"),
                (number(self.source_weight) and self.source_weight >= 0,
                 f"source_weight={self.source_weight}: expected >= 0 (0: off)")]
    for ok, message in problems:
      if not ok:
        raise ValueError(message)


def choose(deterministic, drawn, eos_id: int, words: word_ngrams.WordPieces | None = None,
           sources=None, source_weight: float = 0.0):
  """Per document, the MBR choice among its deterministic ids (deterministic[b], first) and
  its samples (drawn[b, s]); each candidate's tokens up to eos, compared as the words `words`
  assembles (punctuation is no word, as in ROUGE's tokenizer) when given, else as token ids;
  with source_weight > 0 also against sources[b], the document's ids (`mbr_index`).
  Returns (the chosen token lists, the chosen candidate's index per document: 0 = the
  deterministic one)."""
  word = (lambda ids: list(ids)) if words is None else words.words
  chosen, picks = [], []
  for b in range(len(deterministic)):
    rows = [decode.strip(deterministic[b], eos_id)] + [decode.strip(r, eos_id) for r in drawn[b]]
    source = word(sources[b]) if source_weight else None
    pick = mbr_index([word(r) for r in rows], source, source_weight)
    chosen.append(list(rows[pick]))
    picks.append(pick)
  return chosen, picks


def mbr_decode(model, params, tokens, prompt_len, deterministic, sampling: Sampling, *,
               max_new: int, eos_id: int, controls: decode_controls.Controls, limit=None,
               words: word_ngrams.WordPieces | None = None, sources=None):
  """`choose` over `deterministic` ([B, max_new] ids) and `sampling.samples` summaries drawn
  per document under `controls` (its no-repeat, repetition and length settings kept);
  `sources`: each document's ids, needed when sampling.source_weight > 0."""
  drawn = sample(model, params, tokens, prompt_len, jax.random.PRNGKey(sampling.seed),
                 samples=sampling.samples, max_new=max_new, eos_id=eos_id, limit=limit,
                 controls=dataclasses.replace(controls, temperature=sampling.temperature,
                                              top_p=sampling.top_p))
  return choose(np.asarray(deterministic), drawn, eos_id, words, sources, sampling.source_weight)
