"""The server's in-flight batching (--batching=inflight, infer/inflight_generator.py): greedy
answers sent concurrently equal static batching's and LoadedModel.generate's; what the engine
does not run takes the static path; metrics show the engine's occupancy; time limits and the
drain hold. The tiny LM is test_openai_api's (random weights, so texts vary)."""
import dataclasses
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

from configs import legal_pretrain
from helpers import numpy_params
from helpers import call as _call, serving as _serving
from infer import loading
from train import run as run_lib

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices

MODEL, MAX_NEW, SEQ_LEN = "tiny-lm", 16, 64
# Mixed prompt lengths and output lengths, so requests join and leave the batch at different steps.
CASES = [("great", 16), ("the plot was dull and the music loud", 3), ("music and camera", 11),
         ("a film", 1), ("wonderful acting but the story is " * 2 + "long", 16), ("bad", 7),
         ("the ending", 13), ("camera work and a long plot that goes on", 5)]


@pytest.fixture(scope="module")
def lm(sentiment_files, tmp_path_factory):
  root = tmp_path_factory.mktemp("lm")
  config = legal_pretrain.get_config("tiny")
  config.data.update(use_licensedcode=False, extra_dirs=(str(sentiment_files),), vocab_size=512,
                     data_dir=str(root / "cache"), seq_len=SEQ_LEN, batch_size=8, max_docs=-1)
  config.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64)
  config.train.update(num_steps=2, eval_every=2, checkpoint_every=2)
  run_lib.train(config, str(root / "lm"))
  loaded = loading.LoadedModel.from_workdir(str(root / "lm"))
  params = numpy_params(loaded.model, np.zeros((1, 8), np.int32), seed=3)
  return dataclasses.replace(loaded, params=jax.device_put(params, jax.devices()[0]))


def _server(lm, mode: str, **limits):
  return _serving(lm, max_batch=4, max_wait_ms=5, max_chars=400, generate_max_new=MAX_NEW,
                  model_name=MODEL, batching_mode=mode, **limits)


def _concurrently(url: str) -> list:
  """Every CASES request to both endpoints at once (one thread each): the answers' texts."""
  answers = [None] * (2 * len(CASES))

  def send(i):
    prompt, max_new = CASES[i % len(CASES)]
    if i < len(CASES):
      status, body = _call(url + "/v1/completions", {"model": MODEL, "prompt": prompt,
                                                     "max_tokens": max_new})
      answers[i] = (status, body["choices"][0]["text"] if status == 200 else body)
    else:
      status, body = _call(url + "/generate", {"prompt": prompt, "max_new": max_new})
      answers[i] = (status, body.get("text", body))
  threads = [threading.Thread(target=send, args=(i,)) for i in range(len(answers))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  return answers


def _metrics(url: str) -> dict:
  from prometheus_client.parser import text_string_to_metric_families
  with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
    text = response.read().decode()
  return {s.name: s.value for family in text_string_to_metric_families(text)
          for s in family.samples if not s.labels}


@pytest.mark.slow
def test_concurrent_greedy_answers_equal_static_batching_and_generate(lm):
  expected = [lm.generate([p], n)[0] for p, n in CASES] * 2
  with _server(lm, "static") as static:
    static_answers = _concurrently(static.url)
  with _server(lm, "inflight") as server:
    before = _metrics(server.url)
    answers = _concurrently(server.url)
    after = _metrics(server.url)
    counts = server.generator.counts()
    assert _call(server.url + "/health")[1]["batching"] == "inflight"
  assert answers == static_answers == [(200, text) for text in expected]
  assert counts["inflight"]["requests"] == 2 * len(CASES) and counts["fallback_requests"] == 0
  # Occupancy: every request's tokens came from the engine, which is idle again.
  assert after["legal_lm_engine_requests_total"] - before.get(
      "legal_lm_engine_requests_total", 0) == 2 * len(CASES)
  assert after["legal_lm_engine_decode_steps_total"] > 0
  assert 0 < after["legal_lm_engine_slot_steps_total"] <= (
      4 * after["legal_lm_engine_decode_steps_total"])
  assert after["legal_lm_engine_occupied_slots"] == after["legal_lm_queue_depth"] == 0
  assert after["legal_lm_generated_tokens_total"] > before["legal_lm_generated_tokens_total"]


@pytest.mark.slow
def test_what_the_engine_does_not_run_takes_the_static_path(lm):
  with _server(lm, "inflight") as server:
    url = server.url
    beam = _call(url + "/generate", {"prompt": "great", "beam": 2, "max_new": 8})
    assert beam == (200, {"text": lm.generate(["great"], 8, beam=2)[0]})
    ngram = _call(url + "/generate", {"prompt": "bad", "no_repeat_ngram_size": 2,
                                      "repetition_penalty": 1.3})
    assert ngram[1]["text"] == lm.generate(["bad"], MAX_NEW, no_repeat_ngram_size=2,
                                           repetition_penalty=1.3)[0]
    sampled = _call(url + "/generate", {"prompt": "bad", "temperature": 0.7, "seed": 4})
    assert sampled[1]["text"] == lm.generate(["bad"], MAX_NEW, temperature=0.7, seed=4)[0]
    status, scored = _call(url + "/v1/completions", {"model": MODEL, "prompt": "the plot",
                                                     "max_tokens": 4, "logprobs": 2,
                                                     "echo": True})
    assert status == 200 and len(scored["choices"][0]["logprobs"]["token_logprobs"]) >= 3
    assert scored["choices"][0]["text"].startswith("the plot")
    counts = server.generator.counts()
  assert counts["fallback_requests"] == 4 and counts["inflight"]["requests"] == 0


@pytest.mark.slow
def test_time_limit_and_drain_with_the_engine(lm):
  with _server(lm, "inflight", request_timeout_s=0.3) as server:
    scheduler = server.generator.engine._scheduler
    tick = scheduler.tick
    scheduler.tick = lambda: (time.sleep(0.2), tick())[1]    # a slow model: 0.2 s a chunk
    status, answer = _call(server.url + "/generate", {"prompt": "great", "max_new": 16})
    assert status == 504 and "timed out" in answer["error"]
    # Drain: a request in the engine when the server stops still gets its answer.
    server.request_timeout_s = 0.0
    engine = server.generator.engine
    while engine.counters()["occupied"] or engine.counters()["queued"]:   # the 504's request
      time.sleep(0.01)
    answers = {}
    thread = threading.Thread(target=lambda: answers.update(
        late=_call(server.url + "/generate", {"prompt": "bad", "max_new": 16})))
    thread.start()
    while not engine.counters()["occupied"]:
      time.sleep(0.01)
    server.shutdown()
    assert server.drain(30)
    thread.join(60)
  assert answers["late"] == (200, {"text": lm.generate(["bad"], 16)[0]})
