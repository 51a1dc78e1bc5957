"""Autoregressive decoding with a KV cache: one prefill over the prompts, then one jit'd step
per new token (a `lax.scan`, so the whole generation is a single compiled call).

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


def _first_token_logits(model, params, tokens, prompt_len):
  """Prefill: (cache, logits [B, vocab] for the first new token)."""
  mask = (jnp.arange(tokens.shape[1])[None] < prompt_len[:, None]).astype(jnp.int32)
  hidden, variables = model.apply(
      {"params": params}, tokens, segment_ids=mask, prefix_len=prompt_len, return_hidden=True,
      cache_mode="prefill", mutable=["cache"])
  last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)
  logits = model.apply({"params": params}, last, method=type(model).head)[:, 0]
  return variables["cache"], logits


@functools.partial(jax.jit, static_argnames=("model", "max_new", "eos_id"))
def greedy(model, params, tokens, prompt_len, *, max_new: int, eos_id: int):
  """tokens [B, L] (prompts right-padded, L >= max(prompt_len) + max_new), prompt_len [B] ->
  generated ids [B, max_new]; after a row's eos the rest of that row is eos."""
  cache, logits = _first_token_logits(model, params, tokens, prompt_len)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def step(carry, s):
    cache, token, done = carry
    out = jnp.where(done, eos_id, token)
    done = done | (token == eos_id)
    logits, variables = model.apply(
        {"params": params, "cache": cache}, token[:, None], positions=(prompt_len + s)[:, None],
        cache_mode="step", mutable=["cache"])
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return (variables["cache"], nxt, done), out

  done = jnp.zeros(first.shape, bool)
  _, generated = jax.lax.scan(step, (cache, first, done), jnp.arange(max_new))
  return generated.T


@functools.partial(jax.jit, static_argnames=("model", "max_new", "eos_id"))
def greedy_recompute(model, params, tokens, prompt_len, *, max_new: int, eos_id: int):
  """The same greedy decoding without a cache: a full forward pass per new token. The
  yardstick the cached decoder is tested and benchmarked against."""
  rows = jnp.arange(tokens.shape[0])

  def step(carry, s):
    tokens, done = carry
    length = prompt_len + s
    mask = (jnp.arange(tokens.shape[1])[None] < length[:, None]).astype(jnp.int32)
    logits = model.apply({"params": params}, tokens, segment_ids=mask, prefix_len=prompt_len)
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


def strip(ids, eos_id: int) -> list[int]:
  """Generated ids up to (not including) the first eos."""
  ids = list(np.asarray(ids))
  return ids[:ids.index(eos_id)] if eos_id in ids else ids
