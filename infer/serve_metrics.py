"""Prometheus metrics of the HTTP server (infer/serve.py), exposed at GET /metrics.

Each server owns its registry (several servers may live in one process, as in the tests), so
the names below are per server, not prometheus_client's process-wide default registry."""
import prometheus_client as prom
from prometheus_client import core as prom_core

CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
  """Requests by endpoint and status, latency by endpoint, queued texts, requests in flight,
  texts per model call and generated tokens."""

  def __init__(self, queue_depth):
    """queue_depth(): texts waiting for a model call, read at each scrape."""
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("legal_lm_requests", "HTTP requests answered.",
                                 ["endpoint", "status"], registry=r)
    self.latency = prom.Histogram("legal_lm_request_seconds", "Time to answer a request "
                                  "(a stream: to its last event).", ["endpoint"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
    self.queue_depth = prom.Gauge("legal_lm_queue_depth", "Texts queued for a model call.",
                                  registry=r)
    self.queue_depth.set_function(queue_depth)
    self.in_flight = prom.Gauge("legal_lm_requests_in_flight", "Requests being answered.",
                                registry=r)
    self.batch_size = prom.Histogram("legal_lm_batch_size", "Texts per model call.",
                                     buckets=_BATCH_BUCKETS, registry=r)
    self.generated_tokens = prom.Counter("legal_lm_generated_tokens", "Tokens generated "
                                         "(up to eos or a stop string).", registry=r)

  def watch_engine(self, counters):
    """Exposes the in-flight engine's occupancy, read from counters() (InflightEngine's) at
    each scrape: the engine's worker thread updates them, not the request threads."""
    self.registry.register(_EngineCollector(counters))

  def observe(self, endpoint: str, status: int, seconds: float):
    self.requests.labels(endpoint, str(status)).inc()
    self.latency.labels(endpoint).observe(seconds)

  def render(self) -> bytes:
    return prom.generate_latest(self.registry)


class _EngineCollector:
  """The in-flight engine's slots and steps (infer/inflight.py InflightEngine.counters)."""

  def __init__(self, counters):
    self._counters = counters

  def collect(self):
    c = self._counters()
    yield prom_core.GaugeMetricFamily("legal_lm_engine_occupied_slots", "In-flight engine "
                                      "slots holding a request.", value=c["occupied"])
    yield prom_core.GaugeMetricFamily("legal_lm_engine_queued", "Requests waiting for an "
                                      "in-flight engine slot.", value=c["queued"])
    yield prom_core.CounterMetricFamily("legal_lm_engine_decode_steps", "In-flight engine "
                                        "decode steps (every slot advances one token).",
                                        value=c["steps"])
    yield prom_core.CounterMetricFamily("legal_lm_engine_slot_steps", "Slot-steps that "
                                        "produced a token: over decode_steps, the mean "
                                        "occupancy.", value=c["occupied_slot_steps"])
    yield prom_core.CounterMetricFamily("legal_lm_engine_requests", "Requests the in-flight "
                                        "engine finished.", value=c["requests"])
