r"""An HTTP server for a fine-tuned classifier or summarizer, batching concurrent requests.

  python -m infer.serve --workdir=runs/imdb_ft --port=8000
  curl -s localhost:8000/classify -d '{"text": "A moving, brilliant film."}'
  curl -s localhost:8000/classify -d '{"texts": ["Dull.", "Loved it."]}'
  curl -s localhost:8000/summarize -d '{"text": "..."}'
  curl -s localhost:8000/health

Endpoints (JSON in and out):
  POST /classify   {"text": str} -> {"probs": [float], "label": int}
                   {"texts": [str]} -> {"probs": [[float]], "label": [int]}
  POST /summarize  {"text": str} -> {"summary": str}; {"texts": [str]} -> {"summary": [str]};
                   decoding options (all off by default) "beam" (0 or 2..8 beams),
                   "length_penalty" (beam: log-prob sum / length ** it), "no_repeat_ngram_size",
                   "repetition_penalty", "min_new" (acting on the summary's own tokens, never
                   the document's) and "length_ratio" (> 0: at most ceil(ratio * document
                   tokens) summary tokens)
  POST /generate   {"prompt": str} -> {"text": str}; {"prompts": [str]} -> {"text": [str]};
                   options "max_new" (default and limit --generate_max_new), "temperature"
                   (0 = greedy), "top_k", "top_p", "seed", "stop" (a string or a list of them),
                   and the decoding options of /summarize but "length_ratio": continuations
                   from any model with a language-model head - a pre-trained LM (which serves
                   /generate only) or a summarizer - not a classifier
  GET  /health     the model (kind, step, params, limits) and counts of what was served
Errors are {"error": message}: 400 malformed request (or the other model kind's endpoint),
404 unknown path, 405 wrong method, 411 no Content-Length, 413 too large (a text over
--max_chars, over --max_batch texts, a body over what those allow), 415 body not UTF-8, 500 the
model failed (logged; the server keeps serving).

Why a queue: a model call on 32 texts costs little more than on one, so the handler threads
(one per connection) queue their texts and one worker thread runs what is queued together - up
to --max_batch texts, waiting at most --max_wait_ms after the oldest request for company - and
hands each request its own results: throughput grows with concurrency, and only that thread
calls the model. Batches are padded to a power of two rows (at most --max_batch); those shapes,
times the summarizer's prompt-length buckets, are compiled before the port opens, so no request
waits for a compilation (for /generate: greedy at --generate_max_new; another max_new, sampling
or decoding option compiles once, on first use, as do /summarize's decoding options).
Generation and summary requests are batched like the others; a batch runs one model call per
distinct set of options. Standard library only.
"""
import collections
import contextlib
import dataclasses
import http.server
import json
import signal
import sys
import threading
import time
import urllib.parse

import jax
import numpy as np
from absl import app, flags, logging

from infer import decode
from infer import inputs as inputs_lib
from model import log_setup


class RequestError(Exception):
  """A request the server refuses: an HTTP status and the message sent back."""

  def __init__(self, status: int, message: str, headers: dict | None = None):
    super().__init__(message)
    self.status, self.headers = status, headers or {}


class ModelError(RuntimeError):
  """The model failed on the batch that held a request's texts (the Batcher logged why)."""


# --- batching -------------------------------------------------------------------------------
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

  def __init__(self, predict, max_batch: int, max_wait_s: float):
    self._predict, self._max_batch, self._max_wait_s = predict, max_batch, max_wait_s
    self._queue = collections.deque()
    self._cond = threading.Condition()
    self._closed = False
    self._counts = {"requests": 0, "texts": 0, "batches": 0, "failed_batches": 0}
    self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
    self._thread.start()

  def submit(self, texts: list) -> list:
    """Blocks until `texts` were run; returns their results (ModelError if the model failed)."""
    if not 1 <= len(texts) <= self._max_batch:
      raise ValueError(f"a request holds 1..{self._max_batch} texts, not {len(texts)}")
    job = _Job(texts)
    with self._cond:
      if self._closed:
        raise RuntimeError("the server is shutting down")
      self._queue.append(job)
      self._cond.notify()
    job.done.wait()
    if job.error is not None:
      raise ModelError(f"the model failed: {type(job.error).__name__}: {job.error}")
    return job.results

  def counts(self) -> dict:
    """Requests, texts and batches run so far (and batches the model failed on)."""
    with self._cond:
      return dict(self._counts)

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
      for job in jobs:
        job.done.set()


def batch_sizes(max_batch: int) -> list[int]:
  """The padded batch sizes: powers of two below max_batch, and max_batch."""
  return [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]


# --- requests -------------------------------------------------------------------------------
def parse_body(raw: bytes) -> dict:
  """The request's JSON object, or a RequestError naming what is wrong with the body."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RequestError(415, f"the request body is not UTF-8 (byte {e.start})") from None
  if not text.strip():
    raise RequestError(400, "the request body is empty; expected a JSON object")
  try:
    return inputs_lib.json_object(text)
  except inputs_lib.InputError as e:
    raise RequestError(400, str(e)) from None


def parse_texts(body: dict, max_batch: int, max_chars: int) -> tuple[list[str], bool]:
  """(texts, whether the request sent one "text" rather than a "texts" list), checked."""
  expected = 'expected "text" (a string) or "texts" (an array of strings)'
  unknown = sorted(set(body) - {"text", "texts"})
  if unknown:
    raise RequestError(400, f"unknown field {unknown[0]!r}; {expected}")
  if ("text" in body) == ("texts" in body):
    raise RequestError(400, f"{expected}, exactly one of them")
  single = "text" in body
  texts = [body["text"]] if single else body["texts"]
  if not isinstance(texts, list):
    raise RequestError(400, '"texts" must be an array of strings, got '
                       f"{inputs_lib.json_type(texts)}")
  if not texts:
    raise RequestError(400, '"texts" is empty')
  if len(texts) > max_batch:
    raise RequestError(413, f'"texts" has {len(texts)} entries; the limit is {max_batch} '
                       "(--max_batch)")
  for i, text in enumerate(texts):
    name = '"text"' if single else f'"texts"[{i}]'
    if not isinstance(text, str):
      raise RequestError(400, f"{name} must be a string, got {inputs_lib.json_type(text)}")
    if not text.strip():
      raise RequestError(400, f"{name} is empty")
    if len(text) > max_chars:
      raise RequestError(413, f"{name} has {len(text)} characters; the limit is {max_chars} "
                         "(--max_chars)")
  return [t.strip() for t in texts], single


def _predict_endpoint(kind: str):
  def endpoint(handler) -> dict:
    server = handler.server
    if server.loaded.kind != kind:
      use = "/generate" if server.batcher is None else f"/{server.loaded.kind}"
      raise RequestError(400, f"this server runs a {server.loaded.kind} model: use "
                         f"{use}, not /{kind}")
    body = handler.read_json()
    if kind == "summarize":
      texts, single, options = parse_summarize(body, server.max_batch, server.max_chars,
                                               server.max_new)
    else:
      (texts, single), options = parse_texts(body, server.max_batch, server.max_chars), ()
    results = server.batcher.submit([(t, options) for t in texts])
    return results[0] if single else {key: [r[key] for r in results] for key in results[0]}
  return endpoint


# The decoding controls a request may set (LoadedModel.summarize / generate keywords; off by
# default), and the most beams one may ask for.
DECODING_OPTIONS = ("beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty",
                    "min_new")
SUMMARIZE_OPTIONS = DECODING_OPTIONS + ("length_ratio", "samples", "temperature", "top_p",
                                          "seed")
MAX_SAMPLES = 32     # MBR candidates per document in one request
GENERATE_OPTIONS = ("max_new", "temperature", "top_k", "top_p", "seed", "stop") + DECODING_OPTIONS
MAX_BEAM = 8


def _option(body: dict, key: str, default, kind, ok, expected: str):
  """body[key] (default if absent); a 400 naming the key and `expected` unless it is a `kind`
  (never a boolean) that passes `ok`."""
  value = body.get(key, default)
  if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
    raise RequestError(400, f'"{key}" must be {expected}, got {json.dumps(value)}')
  return value


def parse_decoding(body: dict, max_new: int) -> dict:
  """A request's decoding controls for texts of at most max_new tokens, checked."""
  beam = _option(body, "beam", 0, int, lambda v: v == 0 or 2 <= v <= MAX_BEAM,
                 f"0 (off) or an integer in 2..{MAX_BEAM}")
  length_penalty = float(_option(body, "length_penalty", 1.0, (int, float),
                                 lambda v: -10 <= v <= 10, "a number in [-10, 10]"))
  if not beam and length_penalty != 1.0:
    raise RequestError(400, '"length_penalty" applies to beam search only: set "beam" too')
  return dict(
      beam=beam, length_penalty=length_penalty,
      no_repeat_ngram_size=_option(body, "no_repeat_ngram_size", 0, int,
                                   lambda v: 0 <= v <= max_new,
                                   f"an integer in 0..{max_new} (0: off)"),
      repetition_penalty=float(_option(body, "repetition_penalty", 1.0, (int, float),
                                       lambda v: 0 < v <= 10, "a number in (0, 10] (1: off)")),
      min_new=_option(body, "min_new", 0, int, lambda v: 0 <= v <= max_new,
                      f"an integer in 0..{max_new}"))


def parse_summarize(body: dict, max_batch: int, max_chars: int,
                    max_new: int) -> tuple[list[str], bool, tuple]:
  """(texts, whether one "text" was sent, decoding options as a hashable tuple), checked."""
  texts, single = parse_texts({k: v for k, v in body.items() if k not in SUMMARIZE_OPTIONS},
                              max_batch, max_chars)
  options = parse_decoding(body, max_new)
  options["length_ratio"] = float(_option(
      body, "length_ratio", 0.0, (int, float), lambda v: 0 <= v <= 10,
      "a number in [0, 10] (0: off; else summary tokens per document token)"))
  # MBR decoding (infer/rerank.py): the consensus of "samples" sampled summaries.
  options["samples"] = _option(body, "samples", 0, int, lambda v: 0 <= v <= MAX_SAMPLES,
                               f"an integer in 0..{MAX_SAMPLES} (0: off)")
  options["temperature"] = float(_option(body, "temperature", 1.0, (int, float),
                                         lambda v: 0 < v <= 10, "a number in (0, 10]"))
  options["top_p"] = float(_option(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1,
                                   "a number in (0, 1]"))
  options["seed"] = _option(body, "seed", 0, int, lambda v: 0 <= v < 2**31,
                            "an integer in [0, 2^31)")
  if not options["samples"] and any(k in body for k in ("temperature", "top_p", "seed")):
    raise RequestError(400, '"temperature", "top_p" and "seed" apply to MBR sampling only: '
                       'set "samples" too')
  return texts, single, tuple(sorted(options.items()))


def parse_generate(body: dict, max_batch: int, max_chars: int, max_new: int,
                   vocab_size: int) -> tuple[list[str], bool, tuple]:
  """(prompts, whether one "prompt" was sent, options as a hashable tuple of (name, value)
  pairs: LoadedModel.generate's keywords, max_new included), checked."""
  texts = {k: v for k, v in body.items() if k not in GENERATE_OPTIONS}
  renamed = {("text" if k == "prompt" else "texts" if k == "prompts" else k): v
             for k, v in texts.items()}
  try:
    prompts, single = parse_texts(renamed, max_batch, max_chars)
  except RequestError as e:
    message = str(e).replace('"texts"', '"prompts"').replace('"text"', '"prompt"')
    raise RequestError(e.status, message) from None
  n = _option(body, "max_new", max_new, int, lambda v: 1 <= v <= max_new,
              f"an integer in 1..{max_new} (--generate_max_new)")
  temperature = float(_option(body, "temperature", 0.0, (int, float), lambda v: 0 <= v <= 10,
                              "a number in [0, 10] (0: greedy)"))
  top_k = _option(body, "top_k", 0, int, lambda v: 0 <= v <= vocab_size,
                  f"an integer in 0..{vocab_size} (0: off)")
  top_p = float(_option(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1,
                        "a number in (0, 1]"))
  seed = _option(body, "seed", 0, int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")
  stop = body.get("stop", [])
  stop = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > 16 or
      not all(isinstance(x, str) and 0 < len(x) <= 256 for x in stop)):
    raise RequestError(400, '"stop" must be a string or a list of at most 16 non-empty '
                       "strings of at most 256 characters")
  decoding = parse_decoding(body, n)
  if decoding["beam"] and (temperature or top_k or top_p != 1.0):
    raise RequestError(400, 'beam search is deterministic: drop "temperature", "top_k" and '
                       '"top_p" (or "beam")')
  options = dict(max_new=n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 stop=tuple(stop), **decoding)
  return prompts, single, tuple(sorted(options.items()))


def _generate_endpoint(handler) -> dict:
  server = handler.server
  if server.generator is None:
    raise RequestError(400, f"this server runs a {server.loaded.kind} model, which has no "
                       f"language-model head: use /{server.loaded.kind}")
  prompts, single, options = parse_generate(
      handler.read_json(), server.max_batch, server.max_chars, server.generate_max_new,
      server.loaded.config.data.vocab_size)
  texts = server.generator.submit([(p, options) for p in prompts])
  return {"text": texts[0]} if single else {"text": texts}


_ROUTES = {"/health": ("GET", lambda handler: handler.server.info()),
           "/classify": ("POST", _predict_endpoint("classify")),
           "/summarize": ("POST", _predict_endpoint("summarize")),
           "/generate": ("POST", _generate_endpoint)}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"      # keep-alive: a client's next request skips the handshake
  server_version = "legal-lm-serve"
  timeout = 60                       # seconds a client may stall mid-request

  def _dispatch(self):
    path = urllib.parse.urlsplit(self.path).path
    headers, self._body_read = {}, False
    try:
      if path not in _ROUTES:
        raise RequestError(404, f"unknown path {path}; expected one of {sorted(_ROUTES)}")
      method, endpoint = _ROUTES[path]
      if self.command != method and (self.command, method) != ("HEAD", "GET"):
        raise RequestError(405, f"{path} takes {method}, not {self.command}", {"Allow": method})
      status, payload = 200, endpoint(self)
    except RequestError as e:
      status, payload, headers = e.status, {"error": str(e)}, e.headers
    except ModelError as e:
      status, payload = 500, {"error": str(e)}
    except Exception as e:
      logging.exception("%s %s failed", self.command, path)
      status, payload = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
    self._reply(status, payload, headers)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

  def read_json(self) -> dict:
    length = self.headers.get("Content-Length")
    if length is None or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise RequestError(411, "a Content-Length header is required")
    if not length.isdigit():
      raise RequestError(400, f"bad Content-Length {length!r}")
    limit = self.server.max_body_bytes
    if int(length) > limit:
      raise RequestError(413, f"the request body has {length} bytes; the limit is {limit} "
                         "(--max_batch texts of --max_chars characters)")
    self._body_read = True
    try:
      raw = self.rfile.read(int(length))
    except TimeoutError:
      raise RequestError(408, "timed out reading the request body") from None
    return parse_body(raw)

  def _drain_body(self):
    """Reads a request body left unread (if of an allowed size): closing a socket with unread
    data resets the connection, and the client could lose the answer."""
    length = self.headers.get("Content-Length", "")
    if not self._body_read and length.isdigit() and (
        int(length) <= self.server.max_body_bytes):
      with contextlib.suppress(OSError):
        self.rfile.read(int(length))

  def _reply(self, status: int, payload: dict, headers: dict):
    body = (json.dumps(payload) + "\n").encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
      self.send_header(key, value)
    if status != 200:     # after an error, start the next request on a clean connection
      self._drain_body()
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)
    if status != 200:
      logging.info("%s %s -> %d: %s", self.command, self.path, status, payload["error"])

  def log_message(self, format, *args):   # noqa: A002 (the base class's name)
    logging.debug("%s " + format, self.address_string(), *args)


class InferenceServer(http.server.ThreadingHTTPServer):
  """The HTTP server (a thread per connection) around one model and its Batcher."""
  request_queue_size = 128    # listen backlog for bursts of connections

  def __init__(self, address, loaded, *, max_batch: int, max_wait_ms: float, max_chars: int,
               max_new: int | None, sizes: list[int], generate_max_new: int = 0):
    super().__init__(address, _Handler)
    self.loaded, self.max_new, self.sizes = loaded, max_new, sizes
    self.max_batch, self.max_chars = max_batch, max_chars
    self.generate_max_new = generate_max_new
    # The largest valid request: max_batch texts of max_chars characters, JSON-escaped (at
    # most 12 bytes a character: a surrogate pair as \uXXXX\uXXXX), and some room.
    self.max_body_bytes = max_batch * max_chars * 12 + (64 << 10)
    self.num_params = sum(x.size for x in jax.tree.leaves(loaded.params))
    self.batcher = (Batcher(self._predict, max_batch, max_wait_ms / 1e3)
                    if loaded.kind in ("classify", "summarize") else None)
    self.generator = (Batcher(self._generate, max_batch, max_wait_ms / 1e3)
                      if generate_max_new else None)

  def _by_options(self, items: list[tuple], run) -> list:
    """run(texts padded to a compiled batch size with copies of the first, options as a dict)
    once per distinct options among the batch's (text, options) items; the results in the
    items' order."""
    results = [None] * len(items)
    groups = collections.defaultdict(list)
    for i, (_, options) in enumerate(items):
      groups[options].append(i)
    for options, rows in groups.items():
      texts = [items[i][0] for i in rows]
      pad_to = min(s for s in self.sizes if s >= len(texts))
      out = run(texts + texts[:1] * (pad_to - len(texts)), dict(options))
      for i, result in zip(rows, out):
        results[i] = result
    return results

  def _predict(self, items: list[tuple]) -> list[dict]:
    return self._by_options(items, lambda texts, options: self.loaded.predict(
        texts, max_new=self.max_new, **options))

  def _generate(self, items: list[tuple]) -> list[str]:
    def run(prompts, options):
      return self.loaded.generate(prompts, options.pop("max_new"), **options)
    return self._by_options(items, run)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def info(self) -> dict:
    config = self.loaded.config
    info = {"status": "ok", "kind": self.loaded.kind, "step": self.loaded.step,
            "params": self.num_params, "seq_len": config.data.seq_len,
            "max_batch": self.max_batch, "max_chars": self.max_chars,
            "batch_sizes": self.sizes}
    if self.loaded.kind == "classify":
      info["num_classes"] = config.model.num_classes
    elif self.loaded.kind == "summarize":
      info["max_new"] = self.max_new
    if self.generator is not None:
      info["generate_max_new"] = self.generate_max_new
    info["endpoints"] = sorted(
        ([f"/{self.loaded.kind}"] if self.batcher else []) +
        (["/generate"] if self.generator else []))
    info["served"] = self.batcher.counts() if self.batcher else {}
    if self.generator is not None:
      info["generated"] = self.generator.counts()
    return info

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], ConnectionError):   # the client went away: not our bug
      logging.info("client %s disconnected: %s", client_address, sys.exc_info()[1])
    else:
      super().handle_error(request, client_address)

  def server_close(self):
    super().server_close()
    for batcher in (self.batcher, self.generator):
      if batcher is not None:
        batcher.close()


def make_server(loaded, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 32,
                max_wait_ms: float = 5.0, max_chars: int = 20_000,
                max_new: int | None = None,
                generate_max_new: int | None = None) -> InferenceServer:
  """A ready server for `loaded` (an infer.loading.LoadedModel): shapes compiled, port bound
  (port 0: a free one, see .url). Run it with serve_forever(); stop it with shutdown() from
  another thread, then server_close(). /generate is served by every model with a language-
  model head (generate_max_new: default min(64, data.seq_len / 2), at most data.seq_len - 2)."""
  if generate_max_new is None:
    generate_max_new = min(64, loaded.config.data.seq_len // 2)
  if loaded.kind == "classify":
    generate_max_new = 0
  elif not 1 <= generate_max_new <= loaded.config.data.seq_len - 2:
    raise inputs_lib.InputError(f"--generate_max_new={generate_max_new}: expected 1.."
                                f"{loaded.config.data.seq_len - 2} (data.seq_len holds the "
                                "prompt and the text)")
  try:
    max_new = loaded.check_max_new(max_new) if loaded.kind != "pretrain" else None
  except ValueError as e:
    raise inputs_lib.InputError(f"--{e}") from None
  sizes = batch_sizes(max_batch)
  t0 = time.perf_counter()
  logging.info("compiling the model for batches of %s texts", sizes)
  count = loaded.warm_up(sizes, max_new) if loaded.kind != "pretrain" else 0
  if generate_max_new:
    count += warm_up_generate(loaded, sizes, generate_max_new)
  logging.info("compiled %d shapes in %.1fs", count, time.perf_counter() - t0)
  try:
    return InferenceServer((host, port), loaded, max_batch=max_batch, max_wait_ms=max_wait_ms,
                           max_chars=max_chars, max_new=max_new, sizes=sizes,
                           generate_max_new=generate_max_new)
  except OSError as e:
    raise inputs_lib.InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def warm_up_generate(loaded, sizes: list[int], max_new: int) -> int:
  """Compiles greedy generation of max_new tokens for every batch size and prompt bucket."""
  budget = loaded.config.data.seq_len - max_new
  lengths = sorted({decode.pack_prompts([[0] * n], max_new)[0].shape[1]
                    for n in range(1, budget + 1)})
  for size in sizes:
    for length in lengths:
      decode.generate(loaded.model, loaded.params, np.zeros((size, length), np.int32),
                      np.ones(size, np.int32), jax.random.PRNGKey(0), max_new=max_new,
                      eos_id=loaded.tokenizer.eos_id, prefix_lm=False).block_until_ready()
  return len(sizes) * len(lengths)


def _stop_on_signals(server: InferenceServer):
  """SIGINT / SIGTERM: stop accepting, answer what is queued, exit 0."""
  def stop(signum, frame):
    del frame
    logging.info("%s: shutting down", signal.Signals(signum).name)
    threading.Thread(target=server.shutdown).start()   # shutdown() waits for serve_forever
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, stop)


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  loaded, max_new = inputs_lib.load_predictor(f.workdir, f.max_new, allow_lm=True)
  server = make_server(loaded, f.host, f.port, max_batch=f.max_batch,
                       max_wait_ms=f.max_wait_ms, max_chars=f.max_chars, max_new=max_new,
                       generate_max_new=f.generate_max_new)
  _stop_on_signals(server)
  logging.info("ready: %s model (step %d, %d params) at %s", loaded.kind, loaded.step,
               server.num_params, server.url)
  try:
    server.serve_forever()
  finally:
    server.server_close()
  logging.info("stopped")


if __name__ == "__main__":
  # Defined here, not at import: tests import this module.
  inputs_lib.define_model_flags()
  flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: every one).")
  flags.DEFINE_integer("port", 8000, "TCP port (0: any free one).", lower_bound=0)
  flags.DEFINE_integer("max_batch", 32, "Most texts per model call and per request.",
                       lower_bound=1)
  flags.DEFINE_float("max_wait_ms", 5.0, "How long the oldest queued request may wait for "
                     "others to share its batch.", lower_bound=0.0)
  flags.DEFINE_integer("max_chars", 20_000, "Longest accepted text, in characters.",
                       lower_bound=1)
  flags.DEFINE_integer("generate_max_new", None, "POST /generate: the default and largest "
                       "max_new (models with a language-model head; default: min(64, "
                       "data.seq_len / 2)).", lower_bound=1)
  app.run(inputs_lib.friendly_errors(main))
