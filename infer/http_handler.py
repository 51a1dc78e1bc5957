"""The HTTP request handler of infer/serve.py: routing by path and method, the request's body
read and checked, answers as JSON (an error as {"error": message}, or OpenAI's error object
under /v1/), as raw text (RawReply) or as server-sent events (start_events / send_event);
in-flight counting, latency and status metrics, and the per-request time limit."""
import collections
import contextlib
import http.server
import json
import time
import urllib.parse

from absl import logging

from infer import openai_api
from infer import request_parsing as parsing


class RawReply(collections.namedtuple("RawReply", "body content_type")):
  """A 200 answer that is not JSON (the Prometheus text of /metrics)."""



class Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"      # keep-alive: a client's next request skips the handshake
  server_version = "legal-lm-serve"
  timeout = 60                       # seconds a client may stall mid-request

  def _dispatch(self):
    path = urllib.parse.urlsplit(self.path).path
    headers, self._body_read, self._streaming = {}, False, False
    self._started = time.monotonic()
    endpoint_name = path if path in self.server.routes else "other"    # bounded metric labels
    with self.server.in_flight():
      try:
        if self.server.draining:
          raise parsing.RequestError(503, "the server is shutting down")
        if path not in self.server.routes:
          raise parsing.RequestError(404, f"unknown path {path}; expected one of "
                                     f"{sorted(self.server.routes)}")
        method, endpoint = self.server.routes[path]
        if self.command != method and (self.command, method) != ("HEAD", "GET"):
          raise parsing.RequestError(405, f"{path} takes {method}, not {self.command}",
                                     {"Allow": method})
        status, payload = 200, endpoint(self)
      except Exception as e:   # noqa: BLE001 (each becomes an answer: see error_status)
        status, message = self.server.error_status(e, f"{self.command} {path}")
        headers = getattr(e, "headers", {})
        payload = (openai_api.error_object(status, message, getattr(e, "param", None),
                                           getattr(e, "code", None))
                   if path.startswith("/v1/") else {"error": message})
      if not self._streaming:
        self._reply(status, payload, headers)
      self.server.metrics.observe(endpoint_name, status, time.monotonic() - self._started)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

  def remaining(self) -> float | None:
    """Seconds this request may still take (--request_timeout_s), None without a limit."""
    limit = self.server.request_timeout_s
    return None if not limit else max(limit - (time.monotonic() - self._started), 0.001)

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

  def _reply(self, status: int, payload, headers: dict):
    if isinstance(payload, RawReply):
      body, content_type = payload.body, payload.content_type
    else:
      body, content_type = (json.dumps(payload) + "\n").encode(), "application/json"
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
      self.send_header(key, value)
    # After an error, or once draining, start the next request on a clean connection.
    if status != 200 or self.server.draining:
      self._drain_body()
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)
    if status != 200:
      logging.info("%s %s -> %d: %s", self.command, self.path, status, payload["error"])

  def start_events(self):
    """Starts a server-sent-events answer: 200, then `send_event`s until the connection
    closes (close-delimited: no length is known in advance)."""
    self._streaming = True
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.close_connection = True
    self.end_headers()

  def send_event(self, data):
    text = data if isinstance(data, str) else json.dumps(data)
    self.wfile.write(f"data: {text}\n\n".encode())
    self.wfile.flush()

  def log_message(self, format, *args):   # noqa: A002 (the base class's name)
    logging.debug("%s " + format, self.address_string(), *args)
