r"""An HTTP server for a fine-tuned classifier, a summarizer or a language model, batching
concurrent requests; OpenAI-compatible endpoints for language models; Prometheus metrics.

  python -m infer.serve --workdir=runs/imdb_ft --port=8000
  curl -s localhost:8000/classify -d '{"text": "A moving, brilliant film."}'
  curl -s localhost:8000/classify -d '{"texts": ["Dull.", "Loved it."]}'
  curl -s localhost:8000/summarize -d '{"text": "..."}'
  curl -s localhost:8000/v1/completions -d '{"model": "tiny", "prompt": "The licensee"}'
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
  POST /v1/completions, POST /v1/chat/completions, GET /v1/models
                   OpenAI's API for the same models as /generate (infer/openai_api.py: the
                   fields, streaming as server-sent events, logprobs and echo), its model id
                   --model_name; errors as OpenAI's {"error": {"message", "type", "param",
                   "code"}}; with GET /tokenizer_info, POST /tokenize and /detokenize (vLLM's),
                   lm-evaluation-harness's `local-completions` model scores as infer.harness does
  GET  /health     the model (kind, step, params, limits) and counts of what was served
  GET  /metrics    Prometheus text (infer/serve_metrics.py): requests by endpoint and status,
                   latency, queue depth, requests in flight, batch sizes, generated tokens
Errors are {"error": message}: 400 malformed request (or the other model kind's endpoint),
404 unknown path, 405 wrong method, 411 no Content-Length, 413 too large (a text over
--max_chars, over --max_batch texts, a body over what those allow), 415 body not UTF-8, 500 the
model failed (logged; the server keeps serving), 503 shutting down, 504 a request that waited
and ran longer than --request_timeout_s.

Why a queue: a model call on 32 texts costs little more than on one, so the handler threads
(one per connection) queue their texts and one worker thread runs what is queued together - up
to --max_batch texts, waiting at most --max_wait_ms after the oldest request for company - and
hands each request its own results: throughput grows with concurrency, and only that thread
calls the model. Batches are padded to a power of two rows (at most --max_batch); those shapes,
times the summarizer's prompt-length buckets, are compiled before the port opens, so no request
waits for a compilation (generation, --batching=inflight: the engine's shapes, any max_new;
static: greedy at --generate_max_new. On the static path another max_new, sampling or decoding
option compiles once, on first use, as do /summarize's decoding options).
Summary requests are batched like the others; a batch runs one model call per distinct set
of options. Every generating endpoint calls one engine method, InferenceServer.complete.
--batching=static (infer/completions.py Generator) batches generation the same way: a batch
runs until its longest member ends. --batching=inflight (the default; infer/inflight_generator.py)
sends greedy requests to a continuous-batching engine of --max_batch slots: a request joins the
running decode batch at the next chunk boundary and leaves it when it ends, so short requests
do not wait for long ones; beam search, no-repeat n-grams, repetition penalty, sampling,
logprobs / echo and streams take the static path (/metrics: legal_lm_engine_* gauges and
counters show the engine's occupancy).

SIGTERM or SIGINT: the listening socket closes at once (new connections are refused), requests
in flight finish within --drain_s seconds (the in-flight engine finishes what it holds), then
the process exits 0.
"""
import collections
import contextlib
import http.server
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import app, flags, logging

from infer import batching
from infer import completions
from infer import decode
from infer import http_handler
from infer import inflight_generator
from infer import inputs as inputs_lib
from infer import openai_api
from infer import openai_routes
from infer import request_parsing as parsing
from infer import serve_metrics
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
    results = server.batcher.submit([(t, options) for t in texts], handler.remaining())
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
  options = dict(options)
  max_new = options.pop("max_new")
  # [bos] and the prompt's head, as LoadedModel.generate frames it.
  tok, budget = server.loaded.tokenizer, server.loaded.config.data.seq_len - max_new
  requests = [completions.Request(tuple([tok.bos_id] + tok.encode(p)[:budget - 1]), max_new,
                                  tuple(sorted(options.items()))) for p in prompts]
  texts = [r.text for r in server.complete(requests, handler.remaining())]
  return {"text": texts[0]} if single else {"text": texts}


_ROUTES = {"/health": ("GET", lambda handler: handler.server.info()),
           "/metrics": ("GET", lambda handler: http_handler.RawReply(
               handler.server.metrics.render(), serve_metrics.CONTENT_TYPE)),
           "/classify": ("POST", _predict_endpoint("classify")),
           "/summarize": ("POST", _predict_endpoint("summarize")),
           "/generate": ("POST", _generate_endpoint),
           **openai_routes.ROUTES}


class InferenceServer(http.server.ThreadingHTTPServer):
  """The HTTP server (a thread per connection) around one model, its Batcher and its
  generation engine."""
  request_queue_size = 128    # listen backlog for bursts of connections

  def __init__(self, address, loaded, *, max_batch: int, max_wait_ms: float, max_chars: int,
               max_new: int | None, sizes: list[int], generate_max_new: int = 0,
               model_name: str = "legal-lm", request_timeout_s: float = 0.0,
               batching_mode: str = "static"):
    self.routes = _ROUTES
    self.loaded, self.max_new, self.sizes = loaded, max_new, sizes
    self.max_batch, self.max_chars = max_batch, max_chars
    self.generate_max_new, self.request_timeout_s = generate_max_new, request_timeout_s
    self.started, self.draining = int(time.time()), False
    self._active, self._idle = 0, threading.Condition()
    # The largest valid request: max_batch texts of max_chars characters, JSON-escaped (at
    # most 12 bytes a character: a surrogate pair as \uXXXX\uXXXX), and some room.
    self.max_body_bytes = max_batch * max_chars * 12 + (64 << 10)
    self.num_params = sum(x.size for x in jax.tree.leaves(loaded.params))
    self.metrics = serve_metrics.ServerMetrics(self._queue_depth)
    observe = self.metrics.batch_size.observe
    self.batcher = (batching.Batcher(self._predict, max_batch, max_wait_ms / 1e3, observe)
                    if loaded.kind in ("classify", "summarize") else None)
    self.generator = (inflight_generator.make_generator(
        loaded, sizes, max_wait_ms / 1e3, observe, batching_mode=batching_mode,
        slots=max_batch) if generate_max_new else None)
    if isinstance(self.generator, inflight_generator.InflightGenerator):
      self.metrics.watch_engine(self.generator.engine.counters)
    self.openai = (openai_api.Context(loaded, model_name, generate_max_new, max_batch,
                                      max_chars) if generate_max_new else None)
    # The port opens last: the engine compiles while it is built, and a client connecting
    # meanwhile would wait in the backlog instead of being refused.
    try:
      super().__init__(address, http_handler.Handler)
    except OSError:
      self._close_engines()
      raise

  def _queue_depth(self) -> int:
    return sum(b.depth() for b in (self.batcher, self.generator) if b is not None)

  def complete(self, requests: list, timeout: float | None) -> list:
    """The one generation call of every endpoint: completions.Results of the Requests."""
    results = self.generator.submit(requests, timeout)
    self.metrics.generated_tokens.inc(sum(len(r.ids) for r in results))
    return results

  def _predict(self, items: list[tuple]) -> list[dict]:
    """LoadedModel.predict once per distinct options among the batch's (text, options)
    items, each group padded to a compiled batch size with copies of its first text."""
    results = [None] * len(items)
    groups = collections.defaultdict(list)
    for i, (_, options) in enumerate(items):
      groups[options].append(i)
    for options, rows in groups.items():
      texts = [items[i][0] for i in rows]
      pad_to = min(s for s in self.sizes if s >= len(texts))
      out = self.loaded.predict(texts + texts[:1] * (pad_to - len(texts)),
                                max_new=self.max_new, **dict(options))
      for i, result in zip(rows, out):
        results[i] = result
    return results

  def error_status(self, error: Exception, what: str = "a request") -> tuple[int, str]:
    """(HTTP status, message) of an exception a request ended with."""
    if isinstance(error, parsing.RequestError):
      return error.status, str(error)
    if isinstance(error, batching.Timeout):
      return 504, f"timed out: {error} (--request_timeout_s)"
    if isinstance(error, batching.ModelError):
      return 500, str(error)
    if isinstance(error, batching.Closed):
      return 503, "the server is shutting down"
    if isinstance(error, ConnectionError):   # the client left (mid-stream, say): not our bug
      logging.info("%s: the client went away: %s", what, error)
      return 499, f"the client went away: {error}"
    logging.error("%s failed", what, exc_info=error)
    return 500, f"internal error: {type(error).__name__}: {error}"

  @contextlib.contextmanager
  def in_flight(self):
    """Counts the request as in flight for the drain and the metrics."""
    with self._idle:
      self._active += 1
    self.metrics.in_flight.inc()
    try:
      yield
    finally:
      self.metrics.in_flight.dec()
      with self._idle:
        self._active -= 1
        self._idle.notify_all()

  def drain(self, grace_s: float) -> bool:
    """After serve_forever returned: refuses new connections, then waits up to grace_s for the
    requests in flight; whether they all finished."""
    self.draining = True
    self.socket.close()
    with self._idle:
      done = self._idle.wait_for(lambda: self._active == 0, timeout=grace_s)
    if not done:
      logging.warning("%d request(s) still running after --drain_s=%g", self._active, grace_s)
    return done

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
      info["model"] = self.openai.model_id
    info["endpoints"] = sorted(
        ([f"/{self.loaded.kind}"] if self.batcher else []) +
        (["/generate"] if self.generator else []))
    info["served"] = self.batcher.counts() if self.batcher else {}
    if self.generator is not None:
      info["generated"] = self.generator.counts()
      info["batching"] = ("inflight" if isinstance(self.generator,
                                                    inflight_generator.InflightGenerator)
                          else "static")
    return info

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], ConnectionError):   # the client went away: not our bug
      logging.info("client %s disconnected: %s", client_address, sys.exc_info()[1])
    else:
      super().handle_error(request, client_address)

  def server_close(self):
    super().server_close()
    self._close_engines()

  def _close_engines(self):
    for batcher in (self.batcher, self.generator):
      if batcher is not None:
        batcher.close()


def make_server(loaded, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 32,
                max_wait_ms: float = 5.0, max_chars: int = 20_000,
                max_new: int | None = None, generate_max_new: int | None = None,
                model_name: str = "legal-lm", request_timeout_s: float = 0.0,
                batching_mode: str = "static") -> InferenceServer:
  """A ready server for `loaded` (an infer.loading.LoadedModel): shapes compiled, port bound
  (port 0: a free one, see .url). Run it with serve_forever(); stop it with shutdown() from
  another thread, then server_close(). /generate and /v1 (model id `model_name`) are served by
  every model with a language-model head (generate_max_new: default min(64, data.seq_len / 2),
  at most data.seq_len - 2). request_timeout_s > 0: a request taking longer gets a 504.
  batching_mode: how generation is batched, "static" or "inflight" (infer/inflight_generator.py;
  the command's default)."""
  if batching_mode not in ("static", "inflight"):
    raise inputs_lib.InputError(f"--batching={batching_mode}: expected inflight or static")
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
  # In flight, the engine compiles its own shapes (InflightGenerator); its static fallback
  # (beam, sampling, logprobs, streams) compiles on first use, as decoding options do.
  if generate_max_new and batching_mode == "static":
    count += warm_up_generate(loaded, sizes, generate_max_new)
  logging.info("compiled %d shapes in %.1fs", count, time.perf_counter() - t0)
  try:
    return InferenceServer((host, port), loaded, max_batch=max_batch, max_wait_ms=max_wait_ms,
                           max_chars=max_chars, max_new=max_new, sizes=sizes,
                           generate_max_new=generate_max_new, model_name=model_name,
                           request_timeout_s=request_timeout_s,
                           batching_mode=batching_mode)
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
  """SIGINT / SIGTERM: stop accepting, let what is in flight finish (main's drain), exit 0."""
  def stop(signum, frame):
    del frame
    logging.info("%s: shutting down (draining requests in flight)",
                 signal.Signals(signum).name)
    server.draining = True      # answers on kept-alive connections close them
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
  name = f.model_name or os.path.basename(os.path.normpath(f.workdir.split(",")[0]))
  server = make_server(loaded, f.host, f.port, max_batch=f.max_batch,
                       max_wait_ms=f.max_wait_ms, max_chars=f.max_chars, max_new=max_new,
                       generate_max_new=f.generate_max_new, model_name=name,
                       request_timeout_s=f.request_timeout_s, batching_mode=f.batching)
  _stop_on_signals(server)
  logging.info("ready: %s model (step %d, %d params) at %s", loaded.kind, loaded.step,
               server.num_params, server.url)
  try:
    server.serve_forever()
    server.drain(f.drain_s)
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
  flags.DEFINE_integer("generate_max_new", None, "POST /generate and /v1: the default and "
                       "largest max_new (models with a language-model head; default: min(64, "
                       "data.seq_len / 2)).", lower_bound=1)
  flags.DEFINE_string("model_name", None, "The model id of the /v1 endpoints (default: the "
                      "--workdir folder's name).")
  flags.DEFINE_float("request_timeout_s", 0.0, "A request queued and running longer gets a "
                     "504 (0: no limit).", lower_bound=0.0)
  flags.DEFINE_enum("batching", "inflight", ["inflight", "static"], "How generation requests "
                    "are batched: inflight (they join the running decode batch and leave it "
                    "when done; beam, no-repeat n-grams, repetition penalty, sampling, logprobs "
                    "and streams take the static path) or static (a batch runs until its "
                    "longest member ends). Classifier and summarizer batching is static.")
  flags.DEFINE_float("drain_s", 30.0, "On SIGTERM / SIGINT: how long requests in flight may "
                     "take to finish before the process exits.", lower_bound=0.0)
  app.run(errors.exit_on_user_error(main))
