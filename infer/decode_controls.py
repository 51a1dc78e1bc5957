"""Decoding controls: how each next token is chosen from a step's logits, shared by greedy,
sampling and beam search (infer/decode.py) and by re-ranking (infer/rerank.py). `Controls` names
them (temperature / top-k / top-p sampling, no-repeat n-grams, repetition penalty, a minimum
length), `apply_controls` bans and penalises, `pick_token` picks; `length_limit` and
`fit_length_ratio` give each document its own length cap from a ratio learned on train pairs.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from infer import word_ngrams


@dataclasses.dataclass(frozen=True)
class Controls:
  """How each next token is chosen; every default is "off", and all off is plain greedy
  decoding. Frozen and hashable: a static argument of the jit'd decoders (one compilation per
  distinct value; the per-row `limit` array is a traced argument instead).

  temperature, top_k, top_p: sampling (temperature 0: argmax; beam search takes none of them).
  no_repeat_ngram_size n > 0: never emit a token that would complete an n-gram the row has
    already generated. Only the generated tokens count, not the prompt: a summarizer stays free
    to copy a phrase of its source, just not to repeat one of its own.
  repetition_penalty p != 1 (CTRL; Hugging Face semantics): the logit of every token the row
    has already generated (again not the prompt) becomes logit / p if positive, else logit * p;
    p > 1 discourages repeats. Beam search applies it to the log-probabilities (HF does too).
  min_new: eos is banned until the row has generated this many tokens.
  ngram_words (word_ngrams.WordPieces or None): compare n-grams over words assembled from
    pieces instead of token ids, so "The court held" after "the court held" is a repeat too,
    however "held" is spelled; LoadedModel sets it from its tokenizer whenever
    no_repeat_ngram_size is on.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  no_repeat_ngram_size: int = 0
  repetition_penalty: float = 1.0
  min_new: int = 0
  ngram_words: word_ngrams.WordPieces | None = None

  def __post_init__(self):
    # One type per field, so Controls(temperature=1) and Controls(temperature=1.0) are equal -
    # and one entry of jit's cache.
    if not (self.ngram_words is None or isinstance(self.ngram_words, word_ngrams.WordPieces)):
      raise TypeError(f"Controls.ngram_words: expected word_ngrams.WordPieces or None, got "
                      f"{type(self.ngram_words).__name__}")
    for field in dataclasses.fields(self):
      if field.name == "ngram_words":
        continue
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"Controls.{field.name}={value!r}: expected a number")
      if field.type is int and value != int(value):
        raise ValueError(f"Controls.{field.name}={value!r}: expected an integer")
      object.__setattr__(self, field.name, int(value) if field.type is int else float(value))
    problems = [
        (self.temperature >= 0, f"temperature={self.temperature}: expected >= 0 (0: greedy)"),
        (self.top_k >= 0, f"top_k={self.top_k}: expected >= 0 (0: off)"),
        (0 < self.top_p <= 1, f"top_p={self.top_p}: expected (0, 1]"),
        (self.no_repeat_ngram_size >= 0,
         f"no_repeat_ngram_size={self.no_repeat_ngram_size}: expected >= 0 (0: off)"),
        (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
         f"repetition_penalty={self.repetition_penalty}: expected > 0 (1: off)"),
        (self.min_new >= 0, f"min_new={self.min_new}: expected >= 0"),
    ]
    for ok, message in problems:
      if not ok:
        raise ValueError(message)

  @property
  def samples(self) -> bool:
    return self.temperature > 0

  @property
  def uses_history(self) -> bool:
    """Whether the controls read the row's generated tokens (a [B, max_new] buffer)."""
    return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0


def with_options(controls: "Controls | None", options: dict) -> Controls:
  """`controls` (default: all off) with the fields named in `options` replaced."""
  return dataclasses.replace(controls or Controls(), **options)


def _generated_mask(history, count, vocab: int):
  """[R, vocab] bool: the tokens among each row's first `count` generated ones."""
  rows = jnp.arange(history.shape[0])[:, None]
  ids = jnp.where(jnp.arange(history.shape[1]) < count, history, vocab)
  return jnp.zeros((history.shape[0], vocab), bool).at[rows, ids].set(True, mode="drop")


def apply_controls(logits, controls: Controls, history, count, eos_id: int, limit=None):
  """A step's logits (or log-probabilities) [R, vocab] for choosing each row's generated token
  number `count` (0-based), with `controls` applied: repetition penalty and no-repeat n-grams
  over history[:, :count] (each row's generated tokens, [R, max_new]; None when the controls do
  not read it), eos banned while count < min_new, and only eos allowed (at 0) once count >=
  limit[r] (limit [R] or None: a row's length cap, which wins over min_new). Banned tokens are
  -inf. The same function serves generate, the chunked path and beam search; with everything
  off it returns `logits` untouched."""
  if not (controls.uses_history or controls.min_new or limit is not None):
    return logits
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if controls.repetition_penalty != 1.0:
    p = controls.repetition_penalty
    logits = jnp.where(_generated_mask(history, count, vocab),
                       jnp.where(logits > 0, logits / p, logits * p), logits)
  if controls.no_repeat_ngram_size:
    logits = jnp.where(word_ngrams.bans(history, count, controls.no_repeat_ngram_size, vocab,
                                        controls.ngram_words), -jnp.inf, logits)
  is_eos = jnp.arange(vocab) == eos_id
  if controls.min_new:
    logits = jnp.where(is_eos & (count < controls.min_new), -jnp.inf, logits)
  if limit is not None:
    logits = jnp.where((count >= limit)[:, None], jnp.where(is_eos, 0.0, -jnp.inf), logits)
  return logits


def length_limit(source_tokens, ratio: float, min_new: int, max_new: int) -> np.ndarray:
  """Per-row length limits [B] int32 for documents of `source_tokens` tokens:
  clip(ceil(ratio * source_tokens), max(min_new, 1), max_new)."""
  # The epsilon keeps an exact product (0.1 * 30 = 3.0000000000000004) from rounding up.
  target = np.ceil(ratio * np.asarray(source_tokens, np.float64) - 1e-9)
  return np.clip(target, max(min_new, 1), max_new).astype(np.int32)


def fit_length_ratio(source_tokens, summary_tokens) -> float:
  """The median summary / source length ratio over (document, summary) pairs - what
  `length_limit` multiplies a new document's length by. Pairs with an empty source are
  skipped."""
  source = np.asarray(source_tokens, np.float64)
  summary = np.asarray(summary_tokens, np.float64)
  keep = source > 0
  if not keep.any():
    raise ValueError("fit_length_ratio: no pair with a non-empty source")
  return float(np.median(summary[keep] / source[keep]))


def filter_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Logits scaled by 1/temperature with everything outside the top-k / nucleus (smallest set
  of tokens whose probability reaches top_p) set to -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the probability mass before it is below top_p (the first always).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def pick_token(logits, key, controls: Controls):
  """The next token from (controlled) logits: argmax at temperature 0, else a filtered sample."""
  if not controls.samples:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, controls.temperature, controls.top_k,
                                                   controls.top_p)).astype(jnp.int32)
