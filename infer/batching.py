"""Batching concurrent requests for one model: each request thread queues its texts, one worker
thread runs what is queued together and hands each request its own results (infer.serve)."""
import collections
import dataclasses
import threading
import time

from absl import logging


class ModelError(RuntimeError):
  """The model failed on the batch that held a request's texts (the Batcher logged why)."""


class Closed(RuntimeError):
  """The Batcher was closed (the server is shutting down): no new texts are taken."""


class Timeout(RuntimeError):
  """A request's texts were not run within its time limit (queued ones are dropped unrun)."""


@dataclasses.dataclass(eq=False)
class _Job:
  texts: list
  arrived: float = dataclasses.field(default_factory=time.monotonic)
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  results: list | None = None
  error: Exception | None = None


class Batcher:
  """Runs `predict(texts) -> one result per text` on one worker thread, over the texts of as
  many queued requests as fit in `max_batch`."""

  def __init__(self, predict, max_batch: int, max_wait_s: float, on_batch=None):
    """on_batch(texts): called after each model call with its number of texts (metrics)."""
    self._predict, self._max_batch, self._max_wait_s = predict, max_batch, max_wait_s
    self._on_batch = on_batch
    self._queue = collections.deque()
    self._cond = threading.Condition()
    self._closed = False
    self._counts = {"requests": 0, "texts": 0, "batches": 0, "failed_batches": 0}
    self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
    self._thread.start()

  def submit(self, texts: list, timeout: float | None = None) -> list:
    """Blocks until `texts` were run; returns their results (ModelError if the model failed,
    Timeout after `timeout` seconds: still queued, the texts are dropped; already running,
    their results are discarded)."""
    if not 1 <= len(texts) <= self._max_batch:
      raise ValueError(f"a request holds 1..{self._max_batch} texts, not {len(texts)}")
    job = _Job(texts)
    with self._cond:
      if self._closed:
        raise Closed("the server is shutting down")
      self._queue.append(job)
      self._cond.notify()
    if not job.done.wait(timeout):
      with self._cond:
        queued = job in self._queue
        if queued:
          self._queue.remove(job)
      if queued or not job.done.wait(0.05):     # (unless it finished just now)
        raise Timeout(f"{'waited' if queued else 'ran'} longer than the {timeout:.3g}s limit")
    if job.error is not None:
      raise ModelError(f"the model failed: {type(job.error).__name__}: {job.error}")
    return job.results

  def counts(self) -> dict:
    """Requests, texts and batches run so far (and batches the model failed on)."""
    with self._cond:
      return dict(self._counts)

  def depth(self) -> int:
    """Texts queued and not yet running."""
    with self._cond:
      return sum(len(job.texts) for job in self._queue)

  def close(self):
    """Runs what is queued, then stops the worker."""
    with self._cond:
      self._closed = True
      self._cond.notify()
    self._thread.join()

  def _take(self) -> list[_Job]:
    """The next batch of jobs, oldest first; [] once closed and drained."""
    with self._cond:
      while not self._queue and not self._closed:
        self._cond.wait()
      deadline = self._queue[0].arrived + self._max_wait_s if self._queue else 0
      while (not self._closed and sum(len(j.texts) for j in self._queue) < self._max_batch
             and time.monotonic() < deadline):
        self._cond.wait(deadline - time.monotonic())
      jobs, count = [], 0
      while self._queue and count + len(self._queue[0].texts) <= self._max_batch:
        jobs.append(self._queue.popleft())
        count += len(jobs[-1].texts)
      return jobs

  def _work(self):
    while jobs := self._take():
      texts = [t for job in jobs for t in job.texts]
      try:
        results = self._predict(texts)
      except Exception as e:   # each request of the batch reports it; the worker carries on
        logging.exception("the model failed on a batch of %d texts", len(texts))
        for job in jobs:
          job.error = e
      else:
        for job in jobs:
          job.results, results = results[:len(job.texts)], results[len(job.texts):]
      with self._cond:
        self._counts["requests"] += len(jobs)
        self._counts["texts"] += len(texts)
        self._counts["batches"] += 1
        self._counts["failed_batches"] += int(jobs[0].error is not None)
      if self._on_batch is not None:
        self._on_batch(len(texts))
      for job in jobs:
        job.done.set()


def batch_sizes(max_batch: int) -> list[int]:
  """The padded batch sizes: powers of two below max_batch, and max_batch."""
  return [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]
