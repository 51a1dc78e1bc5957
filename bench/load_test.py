r"""A closed-loop load test of the HTTP server (infer/serve.py), run against 127.0.0.1 only.

  python -m bench.load_test --classify_workdir=runs/imdb_student --clients=1,8,32 \
      --lm_workdir=runs/tiny256 --gen_clients=8,32 --batching=inflight,static --duration_s=60

Each scenario starts the server itself (`python -m infer.serve` on a free local port, as a
subprocess), waits for /health, then for each client count runs N clients for --duration_s
seconds: each client (a thread with its own keep-alive connection) sends its next request as
soon as the last one is answered. Classifier: POST /classify with one review each. Generation:
POST /v1/completions, greedy, max_tokens drawn from --max_tokens (seeded per client, so both
batching modes see the same sequence of requests). Then SIGTERM; the server must exit 0.

Per run: requests/s and generated tokens/s (over the time from the first request to the last
answer), p50 / p99 latency, errors (any non-200, malformed answer or connection error), the
server's resident memory (VmRSS of its /proc/<pid>/status) before and after the run, and the
requests the server itself counted (its /metrics, answered with 200) next to the answers the
clients received, so a lost or double-counted request shows. The table prints the CPU.

Why closed-loop: N clients waiting for their answers is how a chat front end or an evaluation
harness loads a server; throughput then says what N concurrent users get, and latency what each
waits. The clients share the machine with the server (2 cores here): their own Python time is
part of what is measured, the same for every row.
"""
import argparse
import dataclasses
import gzip
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HOST = "127.0.0.1"      # never another host: this tool floods whatever it is pointed at
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where infer.serve is
_FALLBACK_TEXTS = ["A moving, brilliant film with a wonderful cast.",
                   "Dull and far too long; I left halfway through.",
                   "The plot was thin but the music and the camera work were lovely."]
_PROMPTS = ["The licensee shall", "This Agreement is governed by", "Permission is hereby granted",
            "The Software is provided", "Notwithstanding the foregoing, the parties",
            "Subject to the terms and conditions of this License"]


@dataclasses.dataclass
class Run:
  """What one load level measured."""
  scenario: str
  clients: int
  seconds: float
  sent: int
  ok: int
  errors: int
  tokens: int
  latencies: list
  rss_start_kb: int
  rss_end_kb: int
  server_counted: int
  mean_slots: float | None = None
  error_samples: list = dataclasses.field(default_factory=list)

  def row(self) -> dict:
    lat = np.asarray(self.latencies) * 1e3 if self.latencies else np.zeros(1)
    return {"scenario": self.scenario, "clients": self.clients, "seconds": self.seconds,
            "requests": self.sent, "ok": self.ok, "errors": self.errors,
            "server_counted": self.server_counted, "rps": self.ok / self.seconds,
            "tokens_per_s": self.tokens / self.seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "rss_start_mb": self.rss_start_kb / 1024,
            "rss_end_mb": self.rss_end_kb / 1024,
            "rss_growth": self.rss_end_kb / self.rss_start_kb - 1, "mean_slots": self.mean_slots,
            "error_samples": self.error_samples[:5]}


def rss_kb(pid: int) -> int:
  """The process's resident memory (VmRSS), in kB."""
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def _request(conn, method: str, path: str, body=None) -> tuple[int, dict | str]:
  data = None if body is None else json.dumps(body).encode()
  conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  raw = response.read()
  ctype = response.getheader("Content-Type", "")
  return response.status, json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def metrics(port: int) -> dict:
  """The server's unlabelled and labelled samples: {(name, labels...): value}."""
  conn = http.client.HTTPConnection(HOST, port, timeout=60)
  try:
    _, text = _request(conn, "GET", "/metrics")
  finally:
    conn.close()
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      out[name] = float(value)
  return out


class Server:
  """`python -m infer.serve` on a free local port, from --workdir; stopped with SIGTERM."""

  def __init__(self, workdir: str, args: list[str], start_timeout_s: float = 600):
    self.port = free_port()
    command = [sys.executable, "-m", "infer.serve", f"--workdir={workdir}", f"--host={HOST}",
               f"--port={self.port}", *args]
    self.log = tempfile.NamedTemporaryFile("w", prefix="load_test_server_", suffix=".log",
                                           delete=False)
    self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=_REPO)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited with {self.proc.returncode}: see {self.log.name}")
      try:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        status, self.health = _request(conn, "GET", "/health")
        conn.close()
        if status == 200:
          return
      except OSError:
        pass
      time.sleep(0.2)
    self.stop()
    raise RuntimeError(f"no /health within {start_timeout_s}s: see {self.log.name}")

  def stop(self) -> int:
    """SIGTERM (the drain), then the exit status."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(120)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
      self.log.close()


def _client(port: int, make_body, check, deadline: float, seed: int, out: dict, lock):
  """One closed-loop client: request, wait for the answer, repeat until the deadline."""
  rng = random.Random(seed)
  conn = http.client.HTTPConnection(HOST, port, timeout=300)
  path, sent, ok, errors, tokens, latencies, samples = None, 0, 0, 0, 0, [], []
  while time.monotonic() < deadline:
    path, body = make_body(rng)
    started = time.monotonic()
    sent += 1
    try:
      status, answer = _request(conn, "POST", path, body)
      n = check(body, answer) if status == 200 else None
      problem = f"{status}: {str(answer)[:200]}"
    except (OSError, http.client.HTTPException, ValueError) as e:
      conn.close()      # a fresh connection for the next request
      conn = http.client.HTTPConnection(HOST, port, timeout=300)
      n, problem = None, f"{type(e).__name__}: {e}"
    latencies.append(time.monotonic() - started)
    if n is None:
      errors += 1
      samples.append(problem)
    else:
      ok, tokens = ok + 1, tokens + n
  conn.close()
  with lock:
    for key, value in (("sent", sent), ("ok", ok), ("errors", errors), ("tokens", tokens)):
      out[key] = out.get(key, 0) + value
    out.setdefault("latencies", []).extend(latencies)
    out.setdefault("error_samples", []).extend(samples[:3])
    out["last"] = max(out.get("last", 0.0), time.monotonic())
    out["path"] = path


def run_load(server: Server, scenario: str, clients: int, duration_s: float, make_body, check,
             seed: int) -> Run:
  """`clients` closed-loop clients for duration_s seconds against a started server."""
  before, rss_start = metrics(server.port), rss_kb(server.proc.pid)
  out, lock = {}, threading.Lock()
  start = time.monotonic()
  threads = [threading.Thread(target=_client, args=(server.port, make_body, check,
                                                    start + duration_s, seed * 1000 + i, out,
                                                    lock)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  after, rss_end = metrics(server.port), rss_kb(server.proc.pid)
  counter = f'legal_lm_requests_total{{endpoint="{out["path"]}",status="200"}}'
  steps = after.get("legal_lm_engine_decode_steps_total", 0) - before.get(
      "legal_lm_engine_decode_steps_total", 0)
  slots = after.get("legal_lm_engine_slot_steps_total", 0) - before.get(
      "legal_lm_engine_slot_steps_total", 0)
  return Run(scenario, clients, out["last"] - start, out["sent"], out["ok"], out["errors"],
             out["tokens"], out["latencies"], rss_start, rss_end,
             int(after.get(counter, 0) - before.get(counter, 0)),
             slots / steps if steps else None, out["error_samples"])


def classify_load(texts: list[str]):
  """(make_body, check) of /classify: one review a request; check -> 0 tokens, None if bad."""
  def make_body(rng):
    return "/classify", {"text": rng.choice(texts)}

  def check(body, answer):
    del body
    good = (isinstance(answer, dict) and isinstance(answer.get("label"), int)
            and isinstance(answer.get("probs"), list) and abs(sum(answer["probs"]) - 1) < 1e-3)
    return 0 if good else None
  return make_body, check


def completion_load(model: str, max_tokens: list[int], choices: bool):
  """(make_body, check) of greedy /v1/completions with max_tokens drawn uniformly from
  LOW..HIGH, or (choices) from the listed values; check -> the completion's tokens, None if
  the answer is malformed."""
  def make_body(rng):
    n = rng.choice(max_tokens) if choices else rng.randint(*max_tokens)
    return "/v1/completions", {"model": model, "prompt": rng.choice(_PROMPTS),
                               "max_tokens": n, "temperature": 0}

  def check(body, answer):
    try:
      choice, usage = answer["choices"][0], answer["usage"]
      good = (isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
              and 0 <= usage["completion_tokens"] <= body["max_tokens"])
    except (KeyError, IndexError, TypeError):
      return None
    return usage["completion_tokens"] if good else None
  return make_body, check


def read_texts(path: str | None, count: int = 500) -> list[str]:
  """The first `count` texts of a JSONL(.gz) file with a "text" field (reviews to classify)."""
  if not path or not os.path.exists(path):
    return _FALLBACK_TEXTS
  with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
    return [json.loads(line)["text"] for _, line in zip(range(count), f)]


def cpu_name() -> str:
  """lscpu's Model name (what the table's numbers ran on)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return next((line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.startswith("Model name")), "unknown")


def serve_and_load(workdir: str, server_args: list[str], scenario: str, clients: list[int],
                   duration_s: float, load, seed: int, warmup_s: float = 0.0) -> list[dict]:
  """One server for every client count of a scenario (started, loaded, SIGTERMed). warmup_s:
  an untimed load first (max(clients) clients), so that shapes compiled on first use (static
  batching: one per max_tokens value and batch size) are not timed."""
  server = Server(workdir, server_args)
  runs = []
  try:
    make_body, check = load(server.health)
    if warmup_s:
      run_load(server, "warm-up", max(clients), warmup_s, make_body, check, seed + 1)
    for n in clients:
      runs.append(run_load(server, scenario, n, duration_s, make_body, check, seed).row())
  finally:
    code = server.stop()
  for row in runs:
    row["exit_code"] = code
  return runs


def table(rows: list[dict], cpu: str) -> str:
  lines = [f"CPU: {cpu} ({os.cpu_count()} cores visible)", "",
           "| scenario | clients | s | answered | errors | server counted | req/s | tok/s | "
           "p50 ms | p99 ms | RSS start -> end MB | mean slots busy |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
  for r in rows:
    slots = "-" if r["mean_slots"] is None else f"{r['mean_slots']:.1f}"
    lines.append(
        f"| {r['scenario']} | {r['clients']} | {r['seconds']:.1f} | {r['ok']} | {r['errors']} | "
        f"{r['server_counted']} | {r['rps']:.1f} | {r['tokens_per_s']:.0f} | "
        f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['rss_start_mb']:.0f} -> "
        f"{r['rss_end_mb']:.0f} ({100 * r['rss_growth']:+.1f}%) | {slots} |")
  return "\n".join(lines)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--host", default=HOST, help="must be 127.0.0.1 (anything else is refused)")
  p.add_argument("--classify_workdir", help="a classifier run: the /classify scenario")
  p.add_argument("--lm_workdir", help="a run with an LM head: the /v1/completions scenario")
  p.add_argument("--clients", type=_ints, default=[1, 8, 32], help="classifier client counts")
  p.add_argument("--gen_clients", type=_ints, default=[8, 32], help="generation client counts")
  p.add_argument("--batching", default="inflight,static", help="generation: modes to compare")
  p.add_argument("--duration_s", type=float, default=60.0, help="seconds per load level")
  p.add_argument("--max_tokens", type=_ints, default=[8, 128], help="LOW,HIGH of max_tokens "
                 "(uniform), or with --max_tokens_choices the values to draw from")
  p.add_argument("--max_tokens_choices", action="store_true", help="draw max_tokens from the "
                 "--max_tokens values instead of the range between them")
  p.add_argument("--warmup_s", type=float, default=0.0, help="generation: untimed load "
                 "before the timed levels, per server")
  p.add_argument("--max_batch", type=int, default=32, help="the server's --max_batch")
  p.add_argument("--texts_file", default=os.path.join(
      os.environ.get("LEGAL_LM_DATA", "../shared/data"), "sentiment_imdb/test.jsonl.gz"),
                 help="reviews to classify (JSONL with a text field; absent: 3 built-in ones)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", help="also write the rows as JSON here")
  args = p.parse_args(argv)
  if args.host != HOST:
    p.error(f"--host={args.host}: this tool only loads a server it starts on {HOST}")
  if not args.max_tokens_choices and len(args.max_tokens) != 2:
    p.error("--max_tokens=LOW,HIGH (or a list of values with --max_tokens_choices)")
  if not (args.classify_workdir or args.lm_workdir):
    p.error("give --classify_workdir and/or --lm_workdir")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  rows = []
  if args.classify_workdir:
    texts = read_texts(args.texts_file)
    rows += serve_and_load(args.classify_workdir, [f"--max_batch={args.max_batch}"],
                           "classify", args.clients, args.duration_s,
                           lambda health: classify_load(texts), args.seed)
  modes = [m for m in args.batching.split(",") if m] if args.lm_workdir else []
  for mode in modes:      # the same seeds: both modes get the same requests in the same order
    rows += serve_and_load(
        args.lm_workdir, [f"--batching={mode}", f"--generate_max_new={max(args.max_tokens)}",
                          f"--max_batch={args.max_batch}"], f"generate ({mode})",
        args.gen_clients, args.duration_s,
        lambda health: completion_load(health["model"], args.max_tokens,
                                       args.max_tokens_choices), args.seed, args.warmup_s)
  print(table(rows, cpu_name()))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(rows, f, indent=1)
  bad = [r for r in rows if r["errors"] or r["exit_code"] != 0 or r["ok"] != r["server_counted"]]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
