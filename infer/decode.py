"""Autoregressive decoding with a KV cache: one prefill over the prompts, then one jit'd step
per new token (a `lax.scan`, so the whole generation is a single compiled call). Greedy,
temperature / top-k / top-p sampling, and beam search.

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


@functools.partial(jax.jit, static_argnames=("model", "max_new", "eos_id", "temperature",
                                             "top_k", "top_p", "prefix_lm"))
def generate(model, params, tokens, prompt_len, rng=None, *, max_new: int, eos_id: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             prefix_lm: bool = True):
  """tokens [B, L] (prompts right-padded, L >= max(prompt_len) + max_new), prompt_len [B] ->
  generated ids [B, max_new]; after a row's eos the rest of that row is eos.
  temperature 0: greedy; otherwise sampling, optionally restricted to top-k / top-p.
  prefix_lm: the prompt is attended bidirectionally (the summarizer); False: a plain causal LM
  continuation (the only mode `local` attention supports; its cache is window-sized)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def pick(logits, key):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)
                                  ).astype(jnp.int32)

  cache, logits = _first_token_logits(model, params, tokens, prompt_len, prefix_lm)
  keys = jax.random.split(rng, max_new + 1)
  first = pick(logits, keys[0])

  def step(carry, xs):
    s, key = xs
    cache, token, done = carry
    out = jnp.where(done, eos_id, token)
    done = done | (token == eos_id)
    logits, cache = _step(model, params, cache, token, prompt_len + s)
    return (cache, pick(logits, key), done), out

  done = jnp.zeros(first.shape, bool)
  _, generated = jax.lax.scan(step, (cache, first, done), (jnp.arange(max_new), keys[1:]))
  return generated.T


# --- chunked decoding (streaming) ------------------------------------------------------------
# `generate` runs the whole answer in one compiled call: nothing is seen before the end, and a
# row that stopped early still costs max_new steps. Streaming runs the same computation in
# chunks of n steps (`prefill`, then `decode_chunk` from the carried cache, token and done
# flags, with generate's own per-step keys), so the caller sees tokens every n steps and can
# stop once every row hit eos or a stop string. The trade-off is n: 1 shows each token as soon
# as it exists but pays one dispatch (and a host round trip) per token; a larger n amortises
# that and shows tokens in bursts, and may compute up to n - 1 steps past the end. The tokens
# are those of `generate` with the same arguments, chunk size aside.
@functools.partial(jax.jit, static_argnames=("model", "prefix_lm"))
def prefill(model, params, tokens, prompt_len, *, prefix_lm: bool = False):
  """(cache, first-token logits [B, vocab]) for right-padded prompts in a buffer `tokens`."""
  return _first_token_logits(model, params, tokens, prompt_len, prefix_lm)


def pick_token(logits, key, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """generate's choice of the next token: argmax at temperature 0, else a filtered sample."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)
                                ).astype(jnp.int32)


pick_first = jax.jit(pick_token, static_argnames=("temperature", "top_k", "top_p"))


@functools.partial(jax.jit, static_argnames=("model", "eos_id", "temperature", "top_k",
                                             "top_p"), donate_argnames=("cache",))
def decode_chunk(model, params, cache, token, done, steps, prompt_len, keys, *, eos_id: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """len(steps) more steps of `generate`'s scan: steps [n] are the answer positions s, keys
  [n] their sampling keys (generate's keys[1 + s]). Returns (cache, token, done, ids [B, n])."""
  def step(carry, xs):
    s, key = xs
    cache, token, done = carry
    out = jnp.where(done, eos_id, token)
    done = done | (token == eos_id)
    logits, cache = _step(model, params, cache, token, prompt_len + s)
    return (cache, pick_token(logits, key, temperature, top_k, top_p), done), out

  (cache, token, done), ids = jax.lax.scan(step, (cache, token, done), (steps, keys))
  return cache, token, done, ids.T


def generate_chunks(model, params, tokens, prompt_len, rng=None, *, max_new: int, eos_id: int,
                    chunk: int = 8, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, prefix_lm: bool = False):
  """Yields the generated ids [B, <= chunk] numpy arrays, chunk by chunk, of what `generate`
  returns for the same arguments; stop consuming it to stop decoding."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  keys = jax.random.split(rng, max_new + 1)
  cache, logits = prefill(model, params, tokens, prompt_len, prefix_lm=prefix_lm)
  token = pick_first(logits, keys[0], temperature, top_k, top_p)
  done = jnp.zeros(token.shape, bool)
  for start in range(0, max_new, chunk):
    steps = jnp.arange(start, min(start + chunk, max_new))
    step_keys = keys[1 + start:1 + start + len(steps)]
    cache, token, done, ids = decode_chunk(
        model, params, cache, token, done, steps, prompt_len, step_keys, eos_id=eos_id,
        temperature=temperature, top_k=top_k, top_p=top_p)
    yield np.asarray(ids)


def greedy(model, params, tokens, prompt_len, *, max_new: int, eos_id: int,
           prefix_lm: bool = True):
  return generate(model, params, tokens, prompt_len, max_new=max_new, eos_id=eos_id,
                  prefix_lm=prefix_lm)


@functools.partial(jax.jit, static_argnames=("model", "beam", "max_new", "eos_id",
                                             "length_penalty", "prefix_lm"))
def beam_search(model, params, tokens, prompt_len, *, beam: int, max_new: int, eos_id: int,
                length_penalty: float = 1.0, prefix_lm: bool = True):
  """The highest-scoring of `beam` hypotheses per row: sum of log-probabilities divided by
  length ** length_penalty (length up to and including eos). Returns ids [B, max_new], eos-
  padded like `generate`. Every beam keeps its own cache rows, reordered as beams are."""
  b = tokens.shape[0]
  cache, logits = _first_token_logits(model, params, tokens, prompt_len, prefix_lm)
  scores, first = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), beam)
  vocab = logits.shape[-1]
  cache = jax.tree.map(lambda c: jnp.repeat(c, beam, axis=0), cache)
  positions = jnp.repeat(prompt_len, beam)
  seqs = jnp.full((b, beam, max_new), eos_id, jnp.int32).at[:, :, 0].set(first)
  done = first == eos_id
  lengths = jnp.ones((b, beam), jnp.int32)
  # A finished beam may only "emit" eos again, at no cost, so its score stays fixed.
  eos_only = jnp.full((vocab,), -jnp.inf).at[eos_id].set(0.0)

  def step(carry, s):
    cache, seqs, scores, done, lengths = carry
    token = seqs[:, :, s - 1].reshape(-1)
    logits, cache = _step(model, params, cache, token, positions + s - 1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, beam, vocab)
    logp = jnp.where(done[..., None], eos_only, logp)
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
