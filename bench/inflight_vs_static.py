r"""Static against in-flight batching for generation, on one mixed-length workload.

  python -m bench.inflight_vs_static [--requests=32] [--max_batch=8] [--chunks=4,8,16] \
      [--arrival_gaps_ms=0,75] [--repeats=3] [--preset=tiny] [--seed=0]

Why: static batching (decode.generate over a fixed batch) runs every batch to its longest
member, so with mixed output lengths most rows idle most of the time and a request waits for
the longest of its batch (and for the batch before it); the in-flight engine
(infer/inflight.py) refills a slot as soon as its request ends. This measures what that buys,
and what the engine's per-chunk host round trip costs (one row per --chunks value).

Workload: --requests prompts of 4..64 random tokens, each asking for 8..128 new tokens (both
uniform, --seed), eos ignored (a random-init model's eos would end requests at random; the
shapes are the preset's - configs/legal_pretrain.py - with random weights). Request i arrives
i * gap ms after the start, for each gap of --arrival_gaps_ms (0: all at once). Static: as
serve's Batcher with no wait, whatever has arrived (up to --max_batch, oldest first) is one
batch, one decode.generate call (one compiled scan, no host sync inside) to its longest
member's max_new (rounded up to a multiple of 16), rows cut after; batches are padded to
--max_batch rows, so every shape is compiled before the timed runs. In-flight: the engine's
Scheduler with --max_batch slots and `chunk` decode steps per call, requests queued at the
chunk boundary after they arrive.
Latency: arrival to the request's last token. Each mode runs the workload once untimed
(compiling every shape), then --repeats rounds run every mode in turn (a shared machine's load
drifts over all of them alike); each mode's run with the median wall time is reported.
tokens/s counts requested tokens only; "wall ms / step" is wall time over decode steps
(prefills, host syncs and idle waits included); "busy rows" is requested tokens per decode step
(the engine's first token of a request comes from its prefill, not a decode step).
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import legal_pretrain
from bench.load_test import cpu_name
from infer import decode, inflight
from model import log_setup
from model.config import ModelConfig
from model.transformer import Transformer

_REQUESTS = flags.DEFINE_integer("requests", 32, "Requests in the workload.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Rows per static batch / engine slots.")
_CHUNKS = flags.DEFINE_list("chunks", ["4", "8", "16"], "Engine decode steps per call.")
_PRESET = flags.DEFINE_string("preset", "tiny", "configs/legal_pretrain.py preset (shapes).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_GAPS = flags.DEFINE_list("arrival_gaps_ms", ["0", "75"], "Arrival patterns: request i arrives "
                          "at i * gap (0: all at once).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per mode (the median is reported).")
_PROMPTS, _OUTPUTS = (4, 64), (8, 128)
NO_EOS = -1   # never generated: every request runs to its max_new in both modes
_ROUND = 16   # static batching's max_new buckets


def workload(n: int, vocab: int, seed: int) -> list[inflight.Request]:
  rng = np.random.default_rng(seed)
  return [inflight.Request(rng.integers(4, vocab, rng.integers(*_PROMPTS, endpoint=True)).tolist(),
                           int(rng.integers(*_OUTPUTS, endpoint=True)), stop_on_eos=False)
          for _ in range(n)]


def _wait_for(arrival: float, t0: float):
  """Sleeps until `arrival` seconds after t0 (an idle server waits for its next request)."""
  time.sleep(max(0.0, t0 + arrival - time.monotonic()))


def _static_shape(prompts: list, max_new: int, max_batch: int):
  """decode.generate's inputs for a batch, padded to max_batch rows (copies of the first) and
  max_new rounded up to a multiple of _ROUND: few shapes, all compiled ahead, as a server
  must (serve pads rows to a few sizes)."""
  max_new = -(-max_new // _ROUND) * _ROUND
  tokens, prompt_len = decode.pack_prompts(prompts + prompts[:1] * (max_batch - len(prompts)),
                                           max_new)
  return tokens, prompt_len, max_new


def compile_static(model, params, max_batch: int):
  """Compiles every shape run_static can meet (each max_new bucket, shortest and longest
  prompt: the buffer lengths in between are among theirs)."""
  for max_new in range(_ROUND, _OUTPUTS[1] + 1, _ROUND):
    for n in _PROMPTS:
      tokens, prompt_len, _ = _static_shape([[4] * n], max_new, max_batch)
      decode.generate(model, params, tokens, prompt_len, max_new=max_new, eos_id=NO_EOS,
                      prefix_lm=False).block_until_ready()


def run_static(model, params, requests, arrivals, max_batch: int) -> dict:
  """Batches of up to max_batch arrived requests (oldest first; none waits for company, as
  serve's Batcher at max_wait_ms 0), each decoded to its longest member's max_new."""
  t0 = time.monotonic()
  latencies, steps, next_ = [0.0] * len(requests), 0, 0
  while next_ < len(requests):
    _wait_for(arrivals[next_], t0)
    now = time.monotonic() - t0
    end = next_ + 1
    while end < min(next_ + max_batch, len(requests)) and arrivals[end] <= now:
      end += 1
    batch = requests[next_:end]
    tokens, prompt_len, max_new = _static_shape([r.prompt for r in batch],
                                                max(r.max_new for r in batch), max_batch)
    decode.generate(model, params, tokens, prompt_len, max_new=max_new, eos_id=NO_EOS,
                    prefix_lm=False).block_until_ready()
    done = time.monotonic() - t0
    for i in range(next_, end):
      latencies[i] = done - arrivals[i]
    steps, next_ = steps + max_new, end
  return {"wall": time.monotonic() - t0, "latencies": latencies, "steps": steps}


def run_inflight(model, params, requests, arrivals, max_batch: int, chunk: int) -> dict:
  """The engine's scheduler, fed each request once it has arrived (at a chunk boundary)."""
  scheduler = inflight.Scheduler(model, params, eos_id=NO_EOS, max_batch=max_batch,
                                 max_len=_PROMPTS[1] + _OUTPUTS[1], chunk=chunk)
  t0 = time.monotonic()
  latencies, index_of, next_ = [0.0] * len(requests), {}, 0
  while next_ < len(requests) or scheduler.busy:
    if not scheduler.busy:
      _wait_for(arrivals[next_], t0)
    while next_ < len(requests) and arrivals[next_] <= time.monotonic() - t0:
      job = scheduler.job(requests[next_])
      index_of[id(job)], next_ = next_, next_ + 1
      scheduler.queue.append(job)
    for job, result in scheduler.tick():
      i = index_of[id(job)]
      assert len(result.ids) == requests[i].max_new
      latencies[i] = result.finished_at - t0 - arrivals[i]
  return {"wall": time.monotonic() - t0, "latencies": latencies,
          "steps": scheduler.counts["steps"]}


def row(name: str, timed: dict, tokens: int) -> str:
  p50, p99 = np.percentile(timed["latencies"], [50, 99])
  busy = tokens / timed["steps"]
  return (f"| {name} | {tokens / timed['wall']:,.0f} | {p50:.2f} | {p99:.2f} | "
          f"{timed['wall']:.2f} | {timed['steps']} | {1e3 * timed['wall'] / timed['steps']:.1f} "
          f"| {busy:.2f} |")


def scenario(model, params, requests, gap_ms: float, max_batch: int, repeats: int) -> list:
  """Table rows for one arrival pattern: static, then the engine at each chunk size. Each
  mode runs once untimed (compiling every shape), then `repeats` rounds of every mode in turn
  (so a shared machine's load drifts over all of them alike); each mode's median-wall run."""
  arrivals = [i * gap_ms / 1e3 for i in range(len(requests))]
  runs = [("static (decode.generate)",
           lambda: run_static(model, params, requests, arrivals, max_batch))]
  runs += [(f"in-flight, chunk {c}",
            lambda c=int(c): run_inflight(model, params, requests, arrivals, max_batch, c))
           for c in _CHUNKS.value]
  for _, run in runs:
    run()
  timed = [[] for _ in runs]
  for _ in range(repeats):
    for times, (_, run) in zip(timed, runs):
      times.append(run())
  tokens = sum(r.max_new for r in requests)
  return [row(name, sorted(times, key=lambda t: t["wall"])[len(times) // 2], tokens)
          for (name, _), times in zip(runs, timed)]


def main(argv):
  del argv
  log_setup.quiet_libraries()
  config = legal_pretrain.get_config(_PRESET.value)
  model = Transformer(ModelConfig.from_config(config.model, config.data.vocab_size))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32)))["params"]
  requests = workload(_REQUESTS.value, config.data.vocab_size, _SEED.value)
  b = _MAX_BATCH.value
  compile_static(model, params, b)
  print(f"{len(requests)} requests (prompts {_PROMPTS[0]}..{_PROMPTS[1]} tokens, outputs "
        f"{_OUTPUTS[0]}..{_OUTPUTS[1]}: {sum(r.max_new for r in requests)} tokens); max_batch "
        f"{b}; legal_pretrain:{_PRESET.value} shapes, random weights; median of "
        f"{_REPEATS.value} timed runs; {jax.devices()[0].device_kind} ({jax.default_backend()});"
        f" CPU: {cpu_name()}")
  for gap in map(float, _GAPS.value):
    when = "all arriving at once" if gap == 0 else f"one arriving every {gap:g} ms"
    print(f"\n{when}; latency from arrival to the last token\n")
    print("| mode | tokens/s | latency p50 (s) | latency p99 (s) | wall (s) | decode steps | "
          "wall ms / step | busy rows |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(scenario(model, params, requests, gap, b, _REPEATS.value)))


if __name__ == "__main__":
  app.run(main)
