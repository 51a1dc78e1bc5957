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

from infer import batching
from infer import decode
from infer import inputs as inputs_lib
from infer import request_parsing as parsing
from model import errors
from model import log_setup


def _predict_endpoint(kind: str):
  def endpoint(handler) -> dict:
    server = handler.server
    if server.loaded.kind != kind:
      use = "/generate" if server.batcher is None else f"/{server.loaded.kind}"
      raise parsing.RequestError(400, f"this server runs a {server.loaded.kind} model: use "
                                 f"{use}, not /{kind}")
    body = handler.read_json()
    if kind == "summarize":
      texts, single, options = parsing.parse_summarize(body, server.max_batch,
                                                       server.max_chars, server.max_new)
    else:
      texts, single = parsing.parse_texts(body, server.max_batch, server.max_chars)
      options = ()
    results = server.batcher.submit([(t, options) for t in texts])
    return results[0] if single else {key: [r[key] for r in results] for key in results[0]}
  return endpoint


def _generate_endpoint(handler) -> dict:
  server = handler.server
  if server.generator is None:
    raise parsing.RequestError(400, f"this server runs a {server.loaded.kind} model, which has "
                               f"no language-model head: use /{server.loaded.kind}")
  prompts, single, options = parsing.parse_generate(
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
        raise parsing.RequestError(404, f"unknown path {path}; expected one of "
                                   f"{sorted(_ROUTES)}")
      method, endpoint = _ROUTES[path]
      if self.command != method and (self.command, method) != ("HEAD", "GET"):
        raise parsing.RequestError(405, f"{path} takes {method}, not {self.command}",
                                   {"Allow": method})
      status, payload = 200, endpoint(self)
    except parsing.RequestError as e:
      status, payload, headers = e.status, {"error": str(e)}, e.headers
    except batching.ModelError as e:
      status, payload = 500, {"error": str(e)}
    except Exception as e:
      logging.exception("%s %s failed", self.command, path)
      status, payload = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
    self._reply(status, payload, headers)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

  def read_json(self) -> dict:
    length = self.headers.get("Content-Length")
    if length is None or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise parsing.RequestError(411, "a Content-Length header is required")
    if not length.isdigit():
      raise parsing.RequestError(400, f"bad Content-Length {length!r}")
    limit = self.server.max_body_bytes
    if int(length) > limit:
      raise parsing.RequestError(413, f"the request body has {length} bytes; the limit is "
                                 f"{limit} (--max_batch texts of --max_chars characters)")
    self._body_read = True
    try:
      raw = self.rfile.read(int(length))
    except TimeoutError:
      raise parsing.RequestError(408, "timed out reading the request body") from None
    return parsing.parse_body(raw)

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
    self.batcher = (batching.Batcher(self._predict, max_batch, max_wait_ms / 1e3)
                    if loaded.kind in ("classify", "summarize") else None)
    self.generator = (batching.Batcher(self._generate, max_batch, max_wait_ms / 1e3)
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
  if loaded.kind == "classify" or not hasattr(loaded, "generate"):
    generate_max_new = 0       # a classifier, or an ensemble: no one language model to continue
  elif not 1 <= generate_max_new <= loaded.config.data.seq_len - 2:
    raise inputs_lib.InputError(f"--generate_max_new={generate_max_new}: expected 1.."
                                f"{loaded.config.data.seq_len - 2} (data.seq_len holds the "
                                "prompt and the text)")
  try:
    max_new = loaded.check_max_new(max_new) if loaded.kind != "pretrain" else None
  except ValueError as e:
    raise inputs_lib.InputError(f"--{e}") from None
  sizes = batching.batch_sizes(max_batch)
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
  lengths = decode.prompt_lengths(loaded.config.data.seq_len - max_new, max_new)
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
  loaded, max_new = inputs_lib.load_predictor(f.workdir, f.max_new, allow_lm=True,
                                               window_stride=f.window_stride)
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
  app.run(errors.exit_on_user_error(main))
