"""Autoregressive decoding with a KV cache: one prefill over the prompts, then one jit'd step
per new token (a `lax.scan`, so the whole generation is a single compiled call). Greedy,
temperature / top-k / top-p sampling, and beam search, all under the same decoding `Controls`
(infer/decode_controls.py: no-repeat n-grams, repetition penalty, a minimum length) and an
optional per-row length limit.

Prompts are right-padded into a fixed buffer of `prompt_len.max() + max_new` positions (the
caller picks bucket sizes, so shapes - and compilations - stay few). Row b's prompt occupies
positions [0, prompt_len[b]) and is attended bidirectionally (prefix-LM, as the summarizer is
trained); token s of its answer goes to position prompt_len[b] + s, overwriting padding whose
cached keys causality kept hidden until then.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from infer.decode_controls import Controls, apply_controls, pick_token, with_options


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
                   eos_id=eos_id, controls=with_options(controls, options), prefix_lm=prefix_lm)


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
  controls = with_options(controls, options)
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
  controls = with_options(controls, options)
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
  controls = with_options(controls, options)
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


def prompt_lengths(budget: int, max_new: int, shortest: int = 1) -> list[int]:
  """Every buffer length `pack_prompts` gives prompts of `shortest` .. `budget` tokens: the
  shapes to compile ahead of traffic."""
  return sorted({pack_prompts([[0] * n], max_new)[0].shape[1]
                 for n in range(shortest, budget + 1)})


def encode_prompts(tokenizer, texts: list[str], seq_len: int, max_new: int, how: str):
  """pack_prompts of `[bos] text [eos]` prompts, each text cut (`how`) to leave max_new of the
  model's seq_len for the summary: how training framed documents, so how every caller decodes."""
  prompts = [tokenizer.encode_framed(t, seq_len - max_new, how) for t in texts]
  return pack_prompts(prompts, max_new)


def strip(ids, eos_id: int) -> list[int]:
  """Generated ids up to (not including) the first eos."""
  ids = list(np.asarray(ids))
  return ids[:ids.index(eos_id)] if eos_id in ids else ids
