"""Token-level generation for the HTTP server (infer/serve.py): prompts as token ids in; the
generated ids, text, finish reason and, when asked, each token's log-probability out.

`Generator.submit` is the one call every generating endpoint (/generate, /v1/completions,
/v1/chat/completions) makes. This Generator queues requests on a Batcher and runs what is queued
together, one model call per group of requests that share max_new and options; an engine with
the same `submit` (one that batches in flight, say) can take its place without the endpoints
changing.

Prompts are framed as the run's language model was trained: its tokenizer's leading special
tokens (`leading_specials`: [bos] for the project's own LMs) go first unless the prompt already
starts with them, as the harness (infer/harness.py) frames every scored context - so a client
that sends bare token ids scores what the harness scores.
"""
import collections
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infer import batching, decode, decode_controls, stream_text

MAX_LOGPROBS = 5          # alternatives per token, as OpenAI's legacy completions allow
STREAM_CHUNK = 8          # tokens per compiled call while streaming (decode.generate_chunks)


@dataclasses.dataclass(frozen=True)
class Request:
  """One text to generate. `options`: sorted (name, value) pairs of LoadedModel.generate's
  keywords (temperature, top_k, top_p, seed, stop, beam, ...; absent ones are off)."""
  ids: tuple            # the prompt as the model reads it, framing included
  max_new: int          # 0: nothing generated (scoring the prompt only)
  options: tuple = ()
  logprobs: int | None = None   # None: no log-probabilities; k: also the k likeliest tokens
  # Streaming: called from the generating thread with each newly settled piece of text.
  sink: Callable | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class Result:
  ids: list             # the generated tokens that count: up to eos, the stop string, max_new
  text: str             # their text, cut before the first stop string
  finish_reason: str    # "stop" (eos or a stop string) or "length"
  # With Request.logprobs: for every token of request.ids + ids, log p(token | those before)
  # (None for a first token nothing precedes) and the top (id, log p) alternatives there.
  logprobs: list | None = None
  top: list | None = None


def leading_specials(tok) -> list[int]:
  """The ids a run's tokenizer puts before every text: [bos] for the project's sentencepiece
  tokenizer (its LMs are trained so); for an HF tokenizer, what its post-processor prepends."""
  if not hasattr(tok, "encode_with_specials"):
    return [tok.bos_id]
  plain = tok.encode("a")
  framed = tok.encode_with_specials("a")
  for start in range(len(framed) - len(plain) + 1):
    if framed[start:start + len(plain)] == plain:
      return framed[:start]
  return []


def framed(lead: list[int], ids: list[int]) -> list[int]:
  """`ids` after the leading specials, unless they already start with them."""
  return list(ids) if list(ids[:len(lead)]) == lead else lead + list(ids)


@functools.partial(jax.jit, static_argnames=("model",))
def token_logprobs(model, params, tokens, length):
  """tokens [B, L] right-padded to `length` [B] -> (log p(tokens[:, t + 1] | tokens[:, :t + 1])
  [B, L - 1], the MAX_LOGPROBS likeliest (log p [B, L - 1, k], ids [B, L - 1, k])): the
  forward pass the harness scores with (infer/harness.py score_tokens)."""
  segment = (jnp.arange(tokens.shape[1])[None] < length[:, None]).astype(jnp.int32)
  logits = model.apply({"params": params}, tokens, segment_ids=segment)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  values, ids = jax.lax.top_k(logp, MAX_LOGPROBS)
  return picked, values, ids


def _decode(loaded, requests: list[Request], rows: int) -> np.ndarray:
  """Generated ids [len(requests), max_new] of requests sharing max_new and options, run as a
  batch of `rows` rows (padded with copies of the first); streams to the requests' sinks."""
  options = dict(requests[0].options)
  max_new, tok = requests[0].max_new, loaded.tokenizer
  prompts = [list(r.ids) for r in requests]
  tokens, prompt_len = decode.pack_prompts(prompts + prompts[:1] * (rows - len(prompts)),
                                           max_new)
  ngrams = options.get("no_repeat_ngram_size", 0)
  controls = decode_controls.Controls(
      temperature=options.get("temperature", 0.0), top_k=options.get("top_k", 0),
      top_p=options.get("top_p", 1.0), no_repeat_ngram_size=ngrams,
      repetition_penalty=options.get("repetition_penalty", 1.0),
      min_new=options.get("min_new", 0), ngram_words=loaded.ngram_words(ngrams))
  common = dict(max_new=max_new, eos_id=tok.eos_id, controls=controls, prefix_lm=False)
  if options.get("beam", 0) > 1:
    return np.asarray(decode.beam_search(
        loaded.model, loaded.params, tokens, prompt_len, beam=options["beam"],
        length_penalty=options.get("length_penalty", 1.0), **common))[:len(requests)]
  rng = jax.random.PRNGKey(options.get("seed", 0))
  if not any(r.sink for r in requests):
    return np.asarray(decode.generate(loaded.model, loaded.params, tokens, prompt_len, rng,
                                      **common))[:len(requests)]
  shown = stream_text.StreamedRows(len(requests), tok, max_new, options.get("stop", ()))
  blocks = []
  for block in decode.generate_chunks(loaded.model, loaded.params, tokens, prompt_len, rng,
                                      chunk=STREAM_CHUNK, **common):
    blocks.append(block[:len(requests)])
    for request, piece in zip(requests, shown.add(blocks[-1])):
      if piece and request.sink:
        request.sink(piece)
    if shown.all_finished:
      break
  ids = np.concatenate(blocks, axis=1)
  return np.pad(ids, ((0, 0), (0, max_new - ids.shape[1])), constant_values=tok.eos_id)


def finish(tok, row, stop: tuple) -> tuple[list[int], str, str]:
  """(the generated ids that count, their text, finish reason) of one generated row."""
  ids = decode.strip(row, tok.eos_id)
  text, stopped = stream_text.cut_at_stop(tok.decode(ids), stop)
  if stopped:      # count the tokens up to the one that completed the stop string
    ids = next(ids[:k] for k in range(1, len(ids) + 1)
               if stream_text.cut_at_stop(tok.decode(ids[:k]), stop)[1])
  eos = len(decode.strip(row, tok.eos_id)) < len(row)
  return [int(i) for i in ids], text, "stop" if stopped or eos else "length"


def _score(loaded, results: list[Result], requests: list[Request], rows: int):
  """Fills in each result's log-probabilities over its prompt and generated tokens."""
  seqs = [list(r.ids) + res.ids for r, res in zip(requests, results)]
  width = -(-max(len(s) for s in seqs) // 64) * 64
  tokens = np.zeros((rows, width), np.int32)
  length = np.ones(rows, np.int32)
  for i, seq in enumerate(seqs):
    tokens[i, :len(seq)], length[i] = seq, len(seq)
  picked, values, ids = jax.device_get(token_logprobs(loaded.model, loaded.params, tokens,
                                                      length))
  for i, (request, result) in enumerate(zip(requests, results)):
    n, k = len(seqs[i]), request.logprobs
    result.logprobs = [None] + [float(x) for x in picked[i, :n - 1]]
    result.top = [None] + [[(int(t), float(v)) for t, v in zip(ids[i, j, :k], values[i, j, :k])]
                           for j in range(n - 1)]


def run_batch(loaded, requests: list[Request], rows: int) -> list[Result]:
  """Results of requests sharing max_new and options, as one batch of `rows` rows."""
  tok, max_new = loaded.tokenizer, requests[0].max_new
  stop = dict(requests[0].options).get("stop", ())
  if max_new:
    results = [Result(*finish(tok, row, stop)) for row in _decode(loaded, requests, rows)]
  else:
    results = [Result([], "", "length") for _ in requests]
  if any(r.logprobs is not None for r in requests):
    _score(loaded, results, requests, rows)
  return results


class Generator:
  """The server's generation engine: `submit(requests)` blocks until they are generated."""

  def __init__(self, loaded, sizes: list[int], max_wait_s: float, on_batch=None):
    self.loaded, self.sizes = loaded, sizes
    self._batcher = batching.Batcher(self._run, max(sizes), max_wait_s, on_batch=on_batch)

  def submit(self, requests: list[Request], timeout: float | None = None) -> list[Result]:
    return self._batcher.submit(list(requests), timeout)

  def _run(self, requests: list[Request]) -> list[Result]:
    results = [None] * len(requests)
    groups = collections.defaultdict(list)
    for i, r in enumerate(requests):
      groups[(r.max_new, r.options)].append(i)
    for rows in groups.values():
      pad_to = min(s for s in self.sizes if s >= len(rows))
      for i, result in zip(rows, run_batch(self.loaded, [requests[i] for i in rows], pad_to)):
        results[i] = result
    return results

  def counts(self) -> dict:
    return self._batcher.counts()

  def depth(self) -> int:
    return self._batcher.depth()

  def close(self):
    self._batcher.close()
