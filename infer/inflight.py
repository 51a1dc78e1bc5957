"""In-flight (continuous) batching for generation: requests join a running decode batch at
chunk boundaries and leave it as soon as they end, their slot reused at once.

Static batching (infer/batching.py + infer/decode.py) runs a batch until its longest member
ends while finished rows idle, and a request arriving meanwhile waits for the whole batch. Here
the batch is a fixed set of `max_batch` slots (infer/slot_decode.py): between chunks of `chunk`
decode steps (one jitted call and one host sync each) the scheduler fills free slots with
queued requests, each prompt prefilled on its own into its slot (one compilation per prompt
bucket), and hands finished requests their results.

  engine = InflightEngine(model, params, eos_id=tok.eos_id, max_batch=8, max_len=256)
  future = engine.submit(prompt_ids, max_new=64, controls=Controls(temperature=0.8), seed=1)
  result = future.result()     # Result: ids, logprobs, finish_reason, step counts, times
  engine.close()
  results = run_all(model, params, [Request(prompt_ids, max_new=16), ...], eos_id=...)

Greedy results are decode.greedy's tokens, one request at a time; sampled ones depend on the
request's seed and controls only, not on what shares the batch (infer/row_sampling.py).
"""
import collections
import concurrent.futures
import dataclasses
import threading
import time

import jax
import numpy as np
from absl import logging

from infer import decode
from infer import row_sampling
from infer import slot_decode
from infer import stream_text
from infer.decode_controls import Controls


@dataclasses.dataclass
class Request:
  """One generation request. arrive_step: for `run_all` only, the decode step at which it
  arrives (simulated arrivals)."""
  prompt: list
  max_new: int
  controls: Controls = Controls()
  seed: int = 0
  stop_on_eos: bool = True
  arrive_step: int = 0


@dataclasses.dataclass
class Result:
  """ids: the generated tokens (with the eos that ended it, if one did); logprobs: each one's
  log-probability under the model (before controls and sampling filters); finish_reason:
  "eos" or "length" (max_new tokens). Steps count the engine's decode steps: when the request
  was queued, prefilled into a slot, and emitted its last token; times are time.monotonic()."""
  ids: list
  logprobs: list
  finish_reason: str
  submitted_step: int
  admitted_step: int
  finished_step: int
  submitted_at: float
  finished_at: float

  @property
  def latency_s(self) -> float:
    return self.finished_at - self.submitted_at


@dataclasses.dataclass(eq=False)
class _Job:
  request: Request
  rows: row_sampling.RowControls
  future: concurrent.futures.Future
  submitted_step: int
  submitted_at: float = dataclasses.field(default_factory=time.monotonic)
  admitted_step: int = -1
  ids: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)

  def add(self, token: int, logprob: float):
    self.ids.append(int(token))
    self.logprobs.append(float(logprob))

  def result(self, eos_id: int, step: int) -> Result:
    eos = self.request.stop_on_eos and self.ids[-1] == eos_id
    return Result(self.ids, self.logprobs, "eos" if eos else "length", self.submitted_step,
                  self.admitted_step, step, self.submitted_at, time.monotonic())


class Scheduler:
  """The single-threaded core: slots, a queue, and `tick` (admit, then one decode chunk).
  InflightEngine runs it on a worker thread; run_all drives it directly."""

  def __init__(self, model, params, *, eos_id: int, max_batch: int, max_len: int,
               chunk: int = 8, prefix_lm: bool = False, bucket: int = 16):
    slot_decode.check_model(model)
    if max_batch < 1 or chunk < 1 or bucket < 1 or max_len < 2:
      raise ValueError(f"max_batch={max_batch}, chunk={chunk}, bucket={bucket}: expected >= 1; "
                       f"max_len={max_len}: expected >= 2")
    self.model, self.params, self.eos_id = model, params, eos_id
    self.max_batch, self.max_len, self.chunk = max_batch, max_len, chunk
    self.prefix_lm, self.bucket = prefix_lm, bucket
    self.queue: collections.deque[_Job] = collections.deque()
    self.jobs: list[_Job | None] = [None] * max_batch
    self.counts = {"steps": 0, "chunks": 0, "prefills": 0, "tokens": 0, "requests": 0,
                   "occupied_slot_steps": 0}
    self._slots = slot_decode.empty(model, params, slots=max_batch, max_len=max_len)

  @property
  def slots(self) -> slot_decode.Slots:
    """The device state (for inspection: the next admit or chunk donates it)."""
    return self._slots

  @property
  def busy(self) -> bool:
    return bool(self.queue) or any(j is not None for j in self.jobs)

  def check(self, request: Request):
    """ValueError for a request the slots cannot hold."""
    n = len(request.prompt)
    if n < 1 or request.max_new < 1 or n + request.max_new > self.max_len:
      raise ValueError(f"a prompt of {n} tokens (>= 1) and max_new={request.max_new} (>= 1) "
                       f"must fit in max_len={self.max_len}")

  def job(self, request: Request) -> _Job:
    """The queued form of `request` (checked; its future not yet queued)."""
    self.check(request)
    rows = row_sampling.one_row(request.controls, request.seed)
    return _Job(request, rows, concurrent.futures.Future(), self.counts["steps"])

  def bucket_len(self, prompt_len: int) -> int:
    return min(-(-prompt_len // self.bucket) * self.bucket, self.max_len)

  def admit(self) -> list[tuple[_Job, Result]]:
    """Fills free slots from the queue. The prefills are dispatched first and their first
    tokens fetched together: one host sync per boundary, not per request."""
    admitted = []
    for index, occupant in enumerate(self.jobs):
      if occupant is not None or not self.queue:
        continue
      # In its slot before the call: if the call fails, fail_all finds it there.
      job = self.jobs[index] = self.queue.popleft()
      prompt = np.asarray(job.request.prompt, np.int32)
      tokens = np.zeros((1, self.bucket_len(len(prompt))), np.int32)
      tokens[0, :len(prompt)] = prompt
      self._slots, *first = slot_decode.admit(
          self.model, self.params, self._slots, np.int32(index), tokens,
          np.array([len(prompt)], np.int32), np.array([job.request.max_new], np.int32),
          np.array([job.request.stop_on_eos]), job.rows, np.int32(self.eos_id),
          prefix_lm=self.prefix_lm)
      job.admitted_step = self.counts["steps"]
      admitted.append((index, job, first))
    self.counts["prefills"] += len(admitted)
    self.counts["tokens"] += len(admitted)
    finished = []
    firsts = jax.device_get([first for _, _, first in admitted])
    for (index, job, _), (token, logprob, live) in zip(admitted, firsts):
      job.add(token[0], logprob[0])
      if not live[0]:
        finished.append(self._finish(index, self.counts["steps"]))
    return finished

  def _finish(self, index: int, step: int) -> tuple[_Job, Result]:
    job, self.jobs[index] = self.jobs[index], None
    self.counts["requests"] += 1
    return job, job.result(self.eos_id, step)

  def decode_chunk(self) -> list[tuple[_Job, Result]]:
    """One chunk of decode steps over every slot; hands out the new tokens."""
    self._slots, ids, logprobs, emitted = slot_decode.decode_chunk(
        self.model, self.params, self._slots, np.int32(self.eos_id), steps=self.chunk)
    ids, logprobs, emitted, live = jax.device_get((ids, logprobs, emitted, self._slots.live))
    start = self.counts["steps"]
    self.counts["steps"] += self.chunk
    self.counts["chunks"] += 1
    self.counts["occupied_slot_steps"] += int(emitted.sum())
    self.counts["tokens"] += int(emitted.sum())
    finished = []
    for index, job in enumerate(self.jobs):
      if job is None:
        continue
      for token, logprob in zip(ids[index][emitted[index]], logprobs[index][emitted[index]]):
        job.add(token, logprob)
      if not live[index]:
        # The step of its last token inside the chunk, so step counts compare requests exactly.
        last = start + int(np.flatnonzero(emitted[index]).max(initial=-1)) + 1
        finished.append(self._finish(index, last))
    return finished

  def tick(self) -> list[tuple[_Job, Result]]:
    """Admits what fits, then (if any slot is occupied) runs one chunk: the jobs that ended."""
    finished = self.admit()
    if any(j is not None for j in self.jobs):
      finished += self.decode_chunk()
    return finished

  def fail_all(self) -> list[_Job]:
    """Drops every queued and running job (after a failed call) and starts from fresh slots."""
    jobs = list(self.queue) + [j for j in self.jobs if j is not None]
    self.queue.clear()
    self.jobs = [None] * self.max_batch
    self._slots = slot_decode.empty(self.model, self.params, slots=self.max_batch,
                                    max_len=self.max_len)
    return jobs

  def warm_up(self) -> int:
    """Compiles the decode chunk and every prompt bucket's prefill (a throwaway request per
    bucket): what the first requests would otherwise wait for. Returns how many buckets."""
    lengths = sorted({self.bucket_len(n) for n in range(1, self.max_len)})
    for length in lengths:
      self.queue.append(self.job(Request([0] * (length - 1 if length > 1 else 1), max_new=1)))
      self.tick()
    self.queue.append(self.job(Request([0], max_new=2)))
    while self.busy:
      self.tick()
    self.counts = dict.fromkeys(self.counts, 0)
    return len(lengths)


def mean_occupied(counts: dict) -> float:
  """The mean number of slots decoding per step."""
  return counts["occupied_slot_steps"] / counts["steps"] if counts["steps"] else 0.0


class InflightEngine:
  """A thread-safe front to a Scheduler on its own worker thread. `submit` returns a
  concurrent.futures.Future of a Result; `counters` are for metrics; `close` finishes what
  was submitted, then stops the worker."""

  def __init__(self, model, params, *, eos_id: int, max_batch: int, max_len: int,
               chunk: int = 8, prefix_lm: bool = False, bucket: int = 16,
               warm_up: bool = False):
    self._scheduler = Scheduler(model, params, eos_id=eos_id, max_batch=max_batch,
                                max_len=max_len, chunk=chunk, prefix_lm=prefix_lm,
                                bucket=bucket)
    if warm_up:
      self._scheduler.warm_up()
    self._cond = threading.Condition()
    self._incoming: list[_Job] = []
    self._counts = dict(self._scheduler.counts)
    self._occupied = self._queued = 0
    self._closed = False
    self._thread = threading.Thread(target=self._work, name="inflight", daemon=True)
    self._thread.start()

  @classmethod
  def for_loaded(cls, loaded, *, max_batch: int, chunk: int = 8, **options) -> "InflightEngine":
    """An engine for an infer.loading.LoadedModel: its model, params, eos and data.seq_len
    (prompt + generated tokens), decoding as a plain causal LM like LoadedModel.generate."""
    return cls(loaded.model, loaded.params, eos_id=loaded.tokenizer.eos_id,
               max_batch=max_batch, max_len=loaded.config.data.seq_len, chunk=chunk,
               prefix_lm=False, **options)

  def submit(self, prompt, *, max_new: int, controls: Controls | None = None, seed: int = 0,
             stop_on_eos: bool = True) -> concurrent.futures.Future:
    """Queues a prompt (token ids); the future's result is a Result, or the exception of a
    failed model call. future.cancel() works until the worker takes the request (at the next
    chunk boundary). ValueError at once for a request the engine cannot run (too long,
    controls it does not take)."""
    request = Request(list(prompt), max_new, controls or Controls(), seed, stop_on_eos)
    job = self._scheduler.job(request)
    with self._cond:
      if self._closed:
        raise RuntimeError("the engine is closed")
      self._incoming.append(job)
      self._cond.notify()
    return job.future

  def counters(self) -> dict:
    """steps, chunks, prefills, tokens, requests (finished), occupied_slot_steps and
    mean_occupied (slots decoding per step), as of the last chunk; occupied (slots holding a
    request) and queued (requests waiting for a slot) now, for an occupancy gauge."""
    with self._cond:
      counts = dict(self._counts)
      queued = len(self._incoming) + self._queued
    return {**counts, "mean_occupied": mean_occupied(counts), "occupied": self._occupied,
            "queued": queued}

  def close(self):
    with self._cond:
      self._closed = True
      self._cond.notify()
    self._thread.join()

  def _work(self):
    scheduler = self._scheduler
    while True:
      with self._cond:
        while not (self._incoming or scheduler.busy or self._closed):
          self._cond.wait()
        # A future cancelled while queued is dropped; past this point it cannot be cancelled.
        scheduler.queue.extend(j for j in self._incoming
                               if j.future.set_running_or_notify_cancel())
        self._incoming.clear()
        if self._closed and not scheduler.busy:
          return
      try:
        finished = scheduler.tick()
      except Exception as e:   # every job in flight gets the error; the engine carries on
        logging.exception("the in-flight engine failed")
        for job in scheduler.fail_all():
          job.future.set_exception(e)
        with self._cond:
          self._occupied = self._queued = 0
        continue
      with self._cond:
        self._counts = dict(scheduler.counts)
        self._occupied = sum(j is not None for j in scheduler.jobs)
        self._queued = len(scheduler.queue)
      for job, result in finished:
        job.future.set_result(result)


def submit_text(engine: InflightEngine, loaded, prompt: str, max_new: int, *,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                stop: tuple = (), min_new: int = 0, beam: int = 0, length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0,
                repetition_penalty: float = 1.0) -> concurrent.futures.Future:
  """LoadedModel.generate for one prompt through `engine` (made by InflightEngine.for_loaded):
  the same framing and stop strings, so greedy gives the same text. The future's result is the
  text. ValueError at once for what the engine does not do (beam search, no-repeat n-grams,
  repetition penalty: serve those with LoadedModel.generate); `length_penalty` only goes with
  beam. Sampled texts follow the engine's per-request seeding, not decode.generate's."""
  del length_penalty
  if beam > 1:
    raise ValueError("the in-flight engine does not do beam search; use LoadedModel.generate")
  tokens, prompt_len = loaded.encode_for_generate([prompt], max_new)
  controls = Controls(temperature=temperature, top_k=top_k, top_p=top_p, min_new=min_new,
                      no_repeat_ngram_size=no_repeat_ngram_size,
                      repetition_penalty=repetition_penalty)
  ids = engine.submit(tokens[0, :prompt_len[0]], max_new=max_new, controls=controls, seed=seed)
  text = concurrent.futures.Future()
  tok = loaded.tokenizer

  def finish(done: concurrent.futures.Future):
    if text.cancelled() or done.cancelled():
      text.cancel()
    elif done.exception() is not None:
      text.set_exception(done.exception())
    else:
      decoded = tok.decode(decode.strip(done.result().ids, tok.eos_id))
      text.set_result(stream_text.cut_at_stop(decoded, stop)[0])
  ids.add_done_callback(finish)
  text.add_done_callback(lambda f: f.cancelled() and ids.cancel())   # not yet admitted: dropped
  return text


def run_all(model, params, requests: list[Request], **options) -> list[Result]:
  """Runs `requests` through a fresh Scheduler on this thread (tests, benchmarks): each joins
  the queue once the simulated clock reaches its `arrive_step`. The clock is the decode steps
  run, plus the stretches where nothing was running (skipped: an idle engine waits for the
  next arrival). The results in the requests' order. options: Scheduler's (eos_id,
  max_batch, max_len, ...)."""
  scheduler = Scheduler(model, params, **options)
  order = sorted(range(len(requests)), key=lambda i: requests[i].arrive_step)
  index_of, results, skipped = {}, [None] * len(requests), 0
  while order or scheduler.busy:
    if order and not scheduler.busy:
      skipped = max(skipped, requests[order[0]].arrive_step - scheduler.counts["steps"])
    while order and requests[order[0]].arrive_step <= scheduler.counts["steps"] + skipped:
      job = scheduler.job(requests[order[0]])
      index_of[id(job)] = order.pop(0)
      scheduler.queue.append(job)
    for job, result in scheduler.tick():
      results[index_of[id(job)]] = result
  return results
