"""The server's in-flight generation engine (`--batching=inflight`, infer/serve.py): the same
`submit(requests, timeout) -> [completions.Result]` as completions.Generator, with each request
that the engine can run sent to an InflightEngine (infer/inflight.py), where it joins the
running decode batch at a chunk boundary and leaves it as soon as it ends. A short request no
longer waits for the longest one in its batch, and a new one no longer waits for a batch to end.

The other requests take the static path (completions.Generator), unchanged:
  - beam search, no_repeat_ngram_size, repetition_penalty: the engine does not implement them;
  - sampling (temperature > 0): a seeded sample stays LoadedModel.generate's for that seed (the
    engine seeds each row on its own, so its samples differ, and n copies of one request in a
    call would repeat one sample);
  - logprobs / echo scoring (Request.logprobs, max_new 0): scored where they are today;
  - streaming (a Request.sink): the engine hands out a request's tokens when it ends;
  - a prompt and max_new that do not fit the engine's slots (data.seq_len).
Greedy text is the same on both paths (tests/test_serve_inflight.py).
"""
import concurrent.futures
import threading
import time

from absl import logging

from infer import batching
from infer import completions
from infer import inflight
from infer.decode_controls import Controls

CHUNK = 8     # decode steps between admissions: one host sync each (infer/inflight.py)


def engine_can_run(request: completions.Request) -> bool:
  """Whether `request` goes to the in-flight engine (see the module docstring)."""
  options = dict(request.options)
  return (request.max_new >= 1 and request.logprobs is None and request.sink is None
          and options.get("temperature", 0.0) == 0.0 and options.get("beam", 0) <= 1
          and options.get("no_repeat_ngram_size", 0) == 0
          and options.get("repetition_penalty", 1.0) == 1.0)


class InflightGenerator:
  """Generation for the server: an InflightEngine with `slots` slots, and a static Generator
  for the requests the engine does not run."""

  def __init__(self, loaded, sizes: list[int], max_wait_s: float, on_batch=None, *,
               slots: int, chunk: int = CHUNK):
    self.loaded = loaded
    self.static = completions.Generator(loaded, sizes, max_wait_s, on_batch)
    # Compiles every prompt bucket's prefill and the decode chunk before the port opens.
    self.engine = inflight.InflightEngine.for_loaded(loaded, max_batch=slots, chunk=chunk,
                                                     warm_up=True)
    self._fallbacks, self._lock = 0, threading.Lock()

  def submit(self, requests: list, timeout: float | None = None) -> list:
    deadline = None if timeout is None else time.monotonic() + timeout
    futures = [self._submit(r) if engine_can_run(r) else None for r in requests]
    static = [i for i, f in enumerate(futures) if f is None]
    with self._lock:
      self._fallbacks += len(static)
    results = [None] * len(requests)
    try:
      if static:
        for i, result in zip(static, self.static.submit([requests[i] for i in static],
                                                         _left(deadline))):
          results[i] = result
      for i, future in enumerate(futures):
        if future is not None:
          results[i] = self._result(requests[i], future, deadline)
    finally:
      for future in futures:     # after a timeout or failure: drop what was not admitted yet
        if future is not None:
          future.cancel()
    return results

  def _submit(self, request: completions.Request):
    """The engine's future for `request`; None where the engine refuses it (static path)."""
    options = dict(request.options)
    controls = Controls(top_k=options.get("top_k", 0), top_p=options.get("top_p", 1.0),
                        min_new=options.get("min_new", 0))
    try:
      return self.engine.submit(request.ids, max_new=request.max_new, controls=controls,
                                seed=options.get("seed", 0))
    except ValueError:        # a prompt and max_new the slots cannot hold
      return None
    except RuntimeError:      # closed: the server is draining
      raise batching.Closed("the server is shutting down") from None

  def _result(self, request, future, deadline) -> completions.Result:
    try:
      out = future.result(_left(deadline))
    except concurrent.futures.TimeoutError:
      raise batching.Timeout("ran longer than the request's time limit") from None
    except concurrent.futures.CancelledError:
      raise batching.Closed("the server is shutting down") from None
    except Exception as e:   # noqa: BLE001 (the engine's model call failed)
      raise batching.ModelError(f"the model failed: {type(e).__name__}: {e}") from e
    stop = dict(request.options).get("stop", ())
    return completions.Result(*completions.finish(self.loaded.tokenizer, out.ids, stop))

  def counts(self) -> dict:
    """The static path's counts (requests, texts, batches) plus the engine's."""
    return {**self.static.counts(), "fallback_requests": self._fallbacks,
            "inflight": self.engine.counters()}

  def depth(self) -> int:
    return self.static.depth() + self.engine.counters()["queued"]

  def close(self):
    """Finishes what the engine holds (the drain), then stops both paths."""
    try:
      self.engine.close()
    finally:
      self.static.close()


def _left(deadline: float | None) -> float | None:
  return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def make_generator(loaded, sizes, max_wait_s, on_batch, *, batching_mode: str, slots: int):
  """completions.Generator (static) or InflightGenerator; static where the model's cache
  cannot hold the engine's slots (local attention)."""
  if batching_mode == "inflight":
    try:
      return InflightGenerator(loaded, sizes, max_wait_s, on_batch, slots=slots)
    except ValueError as e:
      logging.warning("--batching=inflight: %s; serving with static batching", e)
  return completions.Generator(loaded, sizes, max_wait_s, on_batch)
