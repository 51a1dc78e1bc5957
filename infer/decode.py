"""Autoregressive decoding with a KV cache: one prefill over the prompts, then one jit'd step
per new token (a `lax.scan`, so the whole generation is a single compiled call). Greedy,
temperature / top-k / top-p sampling, and beam search, all under the same decoding `Controls`
(no-repeat n-grams, repetition penalty, a minimum length) and an optional per-row length limit.

Prompts are right-padded into a fixed buffer of `prompt_len.max() + max_new` positions (the
caller picks bucket sizes, so shapes - and compilations - stay few). Row b's prompt occupies
positions [0, prompt_len[b]) and is attended bidirectionally (prefix-LM, as the summarizer is
trained); token s of its answer goes to position prompt_len[b] + s, overwriting padding whose
cached keys causality kept hidden until then.
"""
import dataclasses
import functools
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


def _controls(controls: "Controls | None", options: dict) -> Controls:
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


# --- the cached decoder -----------------------------------------------------------------------
def _first_token_logits(model, params, tokens, prompt_len, prefix_lm: bool):
  """Prefill: (cache, logits [B, vocab] for the first new token)."""
  mask = (jnp.arange(tokens.shape[1])[None] < prompt_len[:, None]).astype(jnp.int32)
  hidden, variables = model.apply(
      {"params": params}, tokens, segment_ids=mask, prefix_len=prompt_len if prefix_lm else None,
      return_hidden=True, cache_mode="prefill", mutable=["cache"])
  last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)
  logits = model.apply({"params": params}, last, method=type(model).head)[:, 0]
  return variables["cache"], logits


def _step(model, params, cache, token, position):
  """Feeds one token per row at `position` [B]: (next-token logits [B, vocab], new cache)."""
  logits, variables = model.apply(
      {"params": params, "cache": cache}, token[:, None], positions=position[:, None],
      cache_mode="step", mutable=["cache"])
  return logits[:, 0], variables["cache"]


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


def _choose(logits, key, history, count, limit, *, controls: Controls, eos_id: int):
  """Generated token number `count` of every row: the controls, then the pick."""
  return pick_token(apply_controls(logits, controls, history, count, eos_id, limit), key,
                    controls)


def _decode_step(model, params, prompt_len, limit, *, controls: Controls, eos_id: int):
  """The scan body of `generate` and `decode_chunk`: at answer position s it emits the token
  chosen last (eos once the row ended), feeds it, records it in the history buffer (when the
  controls read one) and chooses token s + 1. Carry: (cache, token, done, history)."""
  def step(carry, xs):
    s, key = xs
    cache, token, done, history = carry
    out = jnp.where(done, eos_id, token)
    done = done | (token == eos_id)
    if history is not None:
      history = history.at[:, s].set(token)
    logits, cache = _step(model, params, cache, token, prompt_len + s)
    token = _choose(logits, key, history, s + 1, limit, controls=controls, eos_id=eos_id)
    return (cache, token, done, history), out
  return step


def _history(controls: Controls, rows: int, max_new: int):
  """The buffer of generated tokens the controls read ([rows, max_new]), or None."""
  return jnp.zeros((rows, max_new), jnp.int32) if controls.uses_history else None


def _limit(limit):
  return None if limit is None else jnp.asarray(limit, jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new", "eos_id", "controls",
                                             "prefix_lm"))
def _generate(model, params, tokens, prompt_len, rng, limit, *, max_new: int, eos_id: int,
              controls: Controls, prefix_lm: bool):
  rng = jax.random.PRNGKey(0) if rng is None else rng
  cache, logits = _first_token_logits(model, params, tokens, prompt_len, prefix_lm)
  keys = jax.random.split(rng, max_new + 1)
  history = _history(controls, tokens.shape[0], max_new)
  first = _choose(logits, keys[0], history, 0, limit, controls=controls, eos_id=eos_id)
  step = _decode_step(model, params, prompt_len, limit, controls=controls, eos_id=eos_id)
  done = jnp.zeros(first.shape, bool)
  _, generated = jax.lax.scan(step, (cache, first, done, history),
                              (jnp.arange(max_new), keys[1:]))
  return generated.T


def generate(model, params, tokens, prompt_len, rng=None, *, max_new: int, eos_id: int,
             controls: Controls | None = None, limit=None, prefix_lm: bool = True, **options):
  """tokens [B, L] (prompts right-padded, L >= max(prompt_len) + max_new), prompt_len [B] ->
  generated ids [B, max_new]; after a row's eos the rest of that row is eos.
  controls: how tokens are chosen (`Controls`; default all off: greedy); `options` are its
  fields by name (temperature=0.8, no_repeat_ngram_size=3, ...), replacing those of `controls`.
  temperature 0: greedy; otherwise sampling, optionally restricted to top-k / top-p.
  limit [B] (ints, or None): row b emits eos as its token number limit[b] - exactly limit[b]
  tokens before eos unless it ends sooner; a traced array, so new limits do not recompile.
  prefix_lm: the prompt is attended bidirectionally (the summarizer); False: a plain causal LM
  continuation (the only mode `local` attention supports; its cache is window-sized)."""
  return _generate(model, params, tokens, prompt_len, rng, _limit(limit), max_new=max_new,
                   eos_id=eos_id, controls=_controls(controls, options), prefix_lm=prefix_lm)


# --- chunked decoding (streaming) ------------------------------------------------------------
# `generate` runs the whole answer in one compiled call: nothing is seen before the end, and a
# row that stopped early still costs max_new steps. Streaming runs the same computation in
# chunks of n steps (`prefill`, then `decode_chunk` from the carried cache, token, done flags
# and history, with generate's own per-step keys and step function), so the caller sees tokens
# every n steps and can stop once every row hit eos or a stop string. The trade-off is n: 1
# shows each token as soon as it exists but pays one dispatch (and a host round trip) per
# token; a larger n amortises that and shows tokens in bursts, and may compute up to n - 1
# steps past the end. The tokens are those of `generate` with the same arguments, chunk size
# aside.
@functools.partial(jax.jit, static_argnames=("model", "prefix_lm"))
def prefill(model, params, tokens, prompt_len, *, prefix_lm: bool = False):
  """(cache, first-token logits [B, vocab]) for right-padded prompts in a buffer `tokens`."""
  return _first_token_logits(model, params, tokens, prompt_len, prefix_lm)


pick_first = jax.jit(functools.partial(_choose, count=0), static_argnames=("controls", "eos_id"))
pick_first.__doc__ = "generate's choice of the first token: (logits, key, history, limit)."


@functools.partial(jax.jit, static_argnames=("model", "eos_id", "controls"),
                   donate_argnames=("cache",))
def decode_chunk(model, params, cache, token, done, history, steps, prompt_len, keys,
                 limit=None, *, eos_id: int, controls: Controls = Controls()):
  """len(steps) more steps of `generate`'s scan: steps [n] are the answer positions s, keys
  [n] their sampling keys (generate's keys[1 + s]). Returns (cache, token, done, history,
  ids [B, n])."""
  step = _decode_step(model, params, prompt_len, limit, controls=controls, eos_id=eos_id)
  (cache, token, done, history), ids = jax.lax.scan(step, (cache, token, done, history),
                                                    (steps, keys))
  return cache, token, done, history, ids.T


def generate_chunks(model, params, tokens, prompt_len, rng=None, *, max_new: int, eos_id: int,
                    chunk: int = 8, controls: Controls | None = None, limit=None,
                    prefix_lm: bool = False, **options):
  """Yields the generated ids [B, <= chunk] numpy arrays, chunk by chunk, of what `generate`
  returns for the same arguments; stop consuming it to stop decoding."""
  controls = _controls(controls, options)
  limit = _limit(limit)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  keys = jax.random.split(rng, max_new + 1)
  cache, logits = prefill(model, params, tokens, prompt_len, prefix_lm=prefix_lm)
  history = _history(controls, tokens.shape[0], max_new)
  token = pick_first(logits, keys[0], history, limit=limit, controls=controls, eos_id=eos_id)
  done = jnp.zeros(token.shape, bool)
  for start in range(0, max_new, chunk):
    steps = jnp.arange(start, min(start + chunk, max_new))
    step_keys = keys[1 + start:1 + start + len(steps)]
    cache, token, done, history, ids = decode_chunk(
        model, params, cache, token, done, history, steps, prompt_len, step_keys, limit,
        eos_id=eos_id, controls=controls)
    yield np.asarray(ids)


def greedy(model, params, tokens, prompt_len, *, max_new: int, eos_id: int,
           prefix_lm: bool = True, controls: Controls | None = None, limit=None, **options):
  """`generate` at temperature 0 (the controls other than sampling apply)."""
  controls = _controls(controls, options)
  if controls.samples:
    raise ValueError(f"greedy decoding takes no temperature (got {controls.temperature})")
  return generate(model, params, tokens, prompt_len, max_new=max_new, eos_id=eos_id,
                  controls=controls, limit=limit, prefix_lm=prefix_lm)


# --- beam search -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "beam", "max_new", "eos_id",
                                             "length_penalty", "controls", "prefix_lm"))
def _beam_search(model, params, tokens, prompt_len, limit, *, beam: int, max_new: int,
                 eos_id: int, length_penalty: float, controls: Controls, prefix_lm: bool):
  b = tokens.shape[0]
  cache, logits = _first_token_logits(model, params, tokens, prompt_len, prefix_lm)
  logp = apply_controls(jax.nn.log_softmax(logits.astype(jnp.float32)), controls,
                        _history(controls, b, max_new), 0, eos_id, limit)
  scores, first = jax.lax.top_k(logp, beam)
  vocab = logits.shape[-1]
  cache = jax.tree.map(lambda c: jnp.repeat(c, beam, axis=0), cache)
  positions = jnp.repeat(prompt_len, beam)
  beam_limit = None if limit is None else jnp.repeat(limit, beam)
  seqs = jnp.full((b, beam, max_new), eos_id, jnp.int32).at[:, :, 0].set(first)
  done = first == eos_id
  lengths = jnp.ones((b, beam), jnp.int32)
  # A finished beam may only "emit" eos again, at no cost, so its score stays fixed.
  eos_only = jnp.full((vocab,), -jnp.inf).at[eos_id].set(0.0)

  def step(carry, s):
    cache, seqs, scores, done, lengths = carry
    token = seqs[:, :, s - 1].reshape(-1)
    logits, cache = _step(model, params, cache, token, positions + s - 1)
    # Each beam's own tokens so far are its history (seqs[:, :, :s]; the rest is ignored).
    logp = apply_controls(jax.nn.log_softmax(logits.astype(jnp.float32)), controls,
                          seqs.reshape(b * beam, max_new), s, eos_id, beam_limit)
    logp = jnp.where(done[..., None], eos_only, logp.reshape(b, beam, vocab))
    flat = (scores[..., None] + logp).reshape(b, beam * vocab)
    scores, index = jax.lax.top_k(flat, beam)
    origin, token = index // vocab, (index % vocab).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, origin, axis=1)
    seqs = jnp.take_along_axis(seqs, origin[..., None], axis=1).at[:, :, s].set(token)
    lengths = take(lengths) + (~take(done)).astype(jnp.int32)
    done = take(done) | (token == eos_id)
    rows = (jnp.arange(b)[:, None] * beam + origin).reshape(-1)
    cache = jax.tree.map(lambda c: c[rows], cache)
    return (cache, seqs, scores, done, lengths), None

  carry = (cache, seqs, scores, done, lengths)
  (_, seqs, scores, _, lengths), _ = jax.lax.scan(step, carry, jnp.arange(1, max_new))
  best = jnp.argmax(scores / lengths.astype(jnp.float32) ** length_penalty, axis=1)
  return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]


def beam_search(model, params, tokens, prompt_len, *, beam: int, max_new: int, eos_id: int,
                length_penalty: float = 1.0, controls: Controls | None = None, limit=None,
                prefix_lm: bool = True, **options):
  """The highest-scoring of `beam` hypotheses per row: sum of log-probabilities divided by
  length ** length_penalty (length up to and including eos). Returns ids [B, max_new], eos-
  padded like `generate`. Every beam keeps its own cache rows, reordered as beams are.
  `controls` (or its fields as `options`) and `limit` act as in `generate`, on each beam's
  log-probabilities and its own history; sampling fields are refused (beam search is
  deterministic)."""
  controls = _controls(controls, options)
  if controls.samples or controls.top_k or controls.top_p != 1.0:
    raise ValueError("beam search is deterministic: it takes no temperature / top_k / top_p")
  return _beam_search(model, params, tokens, prompt_len, _limit(limit), beam=beam,
                      max_new=max_new, eos_id=eos_id, length_penalty=float(length_penalty),
                      controls=controls, prefix_lm=prefix_lm)


@functools.partial(jax.jit, static_argnames=("model", "max_new", "eos_id", "prefix_lm"))
def greedy_recompute(model, params, tokens, prompt_len, *, max_new: int, eos_id: int,
                     prefix_lm: bool = True):
  """The same greedy decoding without a cache: a full forward pass per new token. The
  yardstick the cached decoder is tested and benchmarked against."""
  rows = jnp.arange(tokens.shape[0])

  def step(carry, s):
    tokens, done = carry
    length = prompt_len + s
    mask = (jnp.arange(tokens.shape[1])[None] < length[:, None]).astype(jnp.int32)
    logits = model.apply({"params": params}, tokens, segment_ids=mask,
                         prefix_len=prompt_len if prefix_lm else None)
    nxt = jnp.argmax(logits[rows, length - 1], axis=-1).astype(jnp.int32)
    out = jnp.where(done, eos_id, nxt)
    return (tokens.at[rows, length].set(nxt), done | (nxt == eos_id)), out

  done = jnp.zeros(tokens.shape[:1], bool)
  _, generated = jax.lax.scan(step, (tokens, done), jnp.arange(max_new))
  return generated.T


def pack_prompts(prompts: list[list[int]], max_new: int, bucket: int = 64):
  """(tokens [B, L], prompt_len [B]) numpy, L rounded up to a multiple of `bucket`."""
  longest = max(len(p) for p in prompts)
  length = -(-(longest + max_new) // bucket) * bucket
  tokens = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, np.array([len(p) for p in prompts], np.int32)


def encode_prompts(tokenizer, texts: list[str], seq_len: int, max_new: int, how: str):
  """pack_prompts of `[bos] text [eos]` prompts, each text cut (`how`) to leave max_new of the
  model's seq_len for the summary: how training framed documents, so how every caller decodes."""
  prompts = [tokenizer.encode_framed(t, seq_len - max_new, how) for t in texts]
  return pack_prompts(prompts, max_new)


def strip(ids, eos_id: int) -> list[int]:
  """Generated ids up to (not including) the first eos."""
  ids = list(np.asarray(ids))
  return ids[:ids.index(eos_id)] if eos_id in ids else ids
