"""The server's OpenAI-compatible endpoints (infer/openai_api.py, infer/openai_routes.py), its
Prometheus metrics, request time limit and SIGTERM drain (infer/serve.py), through the real
`openai` client and lm-evaluation-harness's `local-completions` model.

One tiny LM is pre-trained for a few steps (a real run: checkpoint, config, tokenizer); its
served copy gets random weights, so that generated texts vary and equal texts mean something
(as tests/test_generate.py does). Every answer is compared with the project's own generation
(LoadedModel.generate) or a direct forward pass of the model."""
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import types
import urllib.request

import jax
import numpy as np
import portpicker
import pytest

from helpers import REPO, random_weights, train_tiny_lm, wait_for_health
from helpers import call as _call, serving as _serving
from infer import decode, loading, openai_api
from infer.request_parsing import RequestError

openai = pytest.importorskip("openai", reason="the openai client: requirements-pytest.txt")

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices

PROMPTS = ["great wonderful film", "the plot was", "music and camera work"]
MODEL, MAX_NEW, SEQ_LEN = "tiny-lm", 16, 64
TASKS = os.path.join(REPO, "tests", "harness_tasks")


@pytest.fixture(scope="module")
def lm_dir(sentiment_files, tmp_path_factory):
  return train_tiny_lm(tmp_path_factory.mktemp("lm"), sentiment_files, SEQ_LEN, steps=2)


@pytest.fixture(scope="module")
def lm(lm_dir):
  return random_weights(loading.LoadedModel.from_workdir(lm_dir))


@pytest.fixture(scope="module")
def server(lm):
  with _serving(lm, max_batch=4, max_wait_ms=5, max_chars=200, generate_max_new=MAX_NEW,
                model_name=MODEL) as server:
    yield server


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=120)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({"params": params}, tokens)


def _logprobs(lm, ids: list[int]) -> np.ndarray:
  """log p(ids[t + 1] | ids[:t + 1]) for every t: one forward pass of the model, no server
  (right-padded to seq_len: causal, so the padding changes no earlier logit, and one
  compiled forward serves every length)."""
  row = np.zeros((1, SEQ_LEN), np.int32)
  row[0, :len(ids)] = ids
  logits = _forward(lm.model, lm.params, row)[0]
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  return np.array([logp[t, ids[t + 1]] for t in range(len(ids) - 1)])


def _metrics(server) -> dict:
  from prometheus_client.parser import text_string_to_metric_families
  with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
    text = response.read().decode()
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


# --- completions ---------------------------------------------------------------------------------
def test_completion_equals_the_projects_greedy_generation(client, lm):
  tok = lm.tokenizer
  one = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_NEW)
  assert one.object == "text_completion" and one.model == MODEL
  assert one.choices[0].text == lm.generate(PROMPTS[:1], MAX_NEW)[0]
  assert one.choices[0].text
  many = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_NEW)
  assert [c.text for c in many.choices] == lm.generate(PROMPTS, MAX_NEW)
  assert [c.index for c in many.choices] == [0, 1, 2]
  # usage: the prompts as read ([bos] text), the tokens generated before eos
  # (a batch of 4 rows, as the server pads it: a shape its warm-up compiled)
  tokens, prompt_len = lm.encode_for_generate(PROMPTS + PROMPTS[:1], MAX_NEW)
  rows = decode.generate(lm.model, lm.params, tokens, prompt_len, jax.random.PRNGKey(0),
                         max_new=MAX_NEW, eos_id=tok.eos_id, prefix_lm=False)
  generated = [decode.strip(row, tok.eos_id) for row in np.asarray(rows)][:len(PROMPTS)]
  prompt_tokens = sum(len(tok.encode(p)) + 1 for p in PROMPTS)
  assert many.usage.prompt_tokens == prompt_tokens
  assert many.usage.completion_tokens == sum(len(g) for g in generated)
  assert many.usage.total_tokens == prompt_tokens + many.usage.completion_tokens
  assert [c.finish_reason for c in many.choices] == [
      "length" if len(g) == MAX_NEW else "stop" for g in generated]


def test_streamed_chunks_concatenate_to_the_same_text(client, lm):
  expected = lm.generate(PROMPTS[:2], MAX_NEW)
  stream = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=MAX_NEW,
                                     stream=True, stream_options={"include_usage": True})
  texts, finish, usage = ["", ""], [None, None], None
  for chunk in stream:
    if chunk.usage is not None:
      usage = chunk.usage
    for choice in chunk.choices:
      assert chunk.object == "text_completion"
      texts[choice.index] += choice.text
      finish[choice.index] = choice.finish_reason or finish[choice.index]
  assert texts == expected and None not in finish
  assert usage.prompt_tokens == sum(len(lm.tokenizer.encode(p)) + 1 for p in PROMPTS[:2])
  # chat, streamed (n=2: the same batch shape as above): deltas add up to the answers
  messages = [{"role": "user", "content": "hello there"}]
  whole = client.chat.completions.create(model=MODEL, messages=messages, n=2)
  parts = ["", ""]
  for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2,
                                              stream=True):
    assert chunk.object == "chat.completion.chunk"
    for choice in chunk.choices:
      parts[choice.index] += choice.delta.content or ""
  assert parts == [c.message.content for c in whole.choices]


def test_chat_uses_the_plain_template_without_a_tokenizer_template(client, lm):
  messages = [{"role": "system", "content": "You are brief."},
              {"role": "user", "content": "the film"}]
  answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_NEW)
  prompt = "System: You are brief.\nUser: the film\nAssistant:"
  assert answer.object == "chat.completion"
  assert answer.choices[0].message.role == "assistant"
  assert answer.choices[0].message.content == lm.generate(
      [prompt], MAX_NEW, stop=openai_api.PLAIN_STOP)[0]
  assert answer.usage.prompt_tokens == len(lm.tokenizer.encode(prompt)) + 1


def test_chat_renders_an_imported_tokenizers_template():
  template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  tok = types.SimpleNamespace(chat_template=template, special_tokens={"bos_token": "<s>"})
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
  text, stop = openai_api.chat_prompt(messages, types.SimpleNamespace(tok=tok))
  assert (text, stop) == ("<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>", ())
  refuse = "{{ raise_exception('no system role') }}"
  with pytest.raises(RequestError, match="refused the messages: no system role"):
    openai_api.chat_prompt(messages, types.SimpleNamespace(tok=types.SimpleNamespace(
        chat_template=refuse, special_tokens={})))
  with pytest.raises(RequestError, match='"messages"\\[0\\] must be'):
    openai_api.chat_prompt([{"role": "robot", "content": "x"}], types.SimpleNamespace(tok=tok))


def test_n_choices_with_a_seed_are_reproducible_samples(client, lm):
  options = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_NEW, n=3, temperature=1.0,
                 seed=5)
  first = [c.text for c in client.completions.create(**options).choices]
  again = [c.text for c in client.completions.create(**options).choices]
  assert first == again and len(set(first)) > 1
  # one batch of n rows (padded to 4), sampled as LoadedModel.generate samples it
  assert first == lm.generate([PROMPTS[1]] * 4, MAX_NEW, temperature=1.0, seed=5)[:3]
  other = [c.text for c in client.completions.create(**dict(options, seed=6)).choices]
  assert other != first


def test_stop_strings_end_the_text(client, lm):
  whole = lm.generate(PROMPTS[1:2], MAX_NEW)[0]
  assert len(whole) >= 8, whole
  stop = [whole[5:7], "zzz"]                # the text ends before the first occurrence
  answer = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_NEW,
                                     stop=stop)
  expected = lm.generate(PROMPTS[1:2], MAX_NEW, stop=tuple(stop))[0]
  assert answer.choices[0].text == expected and len(expected) <= 5
  assert whole.startswith(expected) and stop[0] not in expected
  assert answer.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_are_the_models_own(client, lm):
  tok = lm.tokenizer
  ids = tok.encode(PROMPTS[2])
  direct = _logprobs(lm, [tok.bos_id] + ids)     # the model reads [bos] first
  scored = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=0,
                                     echo=True, logprobs=3)
  lp = scored.choices[0].logprobs
  assert scored.choices[0].text == PROMPTS[2]
  assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == tok.decode(ids)
  np.testing.assert_allclose(lp.token_logprobs, direct, rtol=1e-4, atol=1e-4)
  # (ids with one text share an entry: those past the tokenizer's pieces have none)
  assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
  assert all(max(top.values()) >= value - 1e-6
             for top, value in zip(lp.top_logprobs, lp.token_logprobs))
  assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
  # token ids that start with [bos]: nothing precedes it, so its log-probability is null
  raw = client.completions.create(model=MODEL, prompt=[tok.bos_id] + ids, max_tokens=0,
                                  echo=True, logprobs=0)
  assert raw.choices[0].logprobs.token_logprobs[0] is None
  np.testing.assert_allclose(raw.choices[0].logprobs.token_logprobs[1:], direct, atol=1e-4)
  # generated tokens: their log-probabilities given the prompt and what came before
  gen = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_NEW,
                                  logprobs=1)
  choice = gen.choices[0]
  new = tok.encode(choice.text)
  full = _logprobs(lm, [tok.bos_id] + ids + new)[len(ids):]
  assert len(choice.logprobs.token_logprobs) == gen.usage.completion_tokens
  if new and len(new) == gen.usage.completion_tokens:    # the text re-encodes to its tokens
    np.testing.assert_allclose(choice.logprobs.token_logprobs, full, atol=1e-4)
  for top, value in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs):
    assert max(top.values()) == pytest.approx(value, abs=1e-5)      # greedy: the likeliest


@pytest.mark.parametrize("options, status, param, message", [
    (dict(model="nope", prompt="a"), 404, "model", "does not exist"),
    (dict(model=MODEL, prompt="a", temperature=3), 400, "temperature", "[0, 2]"),
    (dict(model=MODEL, prompt="a", max_tokens=MAX_NEW + 1), 400, "max_tokens", "[0, 16]"),
    (dict(model=MODEL, prompt=[[1.5]]), 400, "prompt", '"prompt" must be'),
    (dict(model=MODEL, prompt="a", extra_body={"bogus": 1}), 400, "bogus", "unknown field"),
    (dict(model=MODEL, prompt="a", stop=[""]), 400, "stop", '"stop" must be'),
    (dict(model=MODEL, prompt="a", n=5), 400, "n", "[1, 4]"),
    (dict(model=MODEL, prompt="a", logprobs=6), 400, "logprobs", "[0, 5]"),
    (dict(model=MODEL, prompt="a", stream=True, logprobs=1), 400, "stream", "not supported"),
    (dict(model=MODEL, prompt="a " * 99), 400, "prompt", "context"),
])
def test_bad_requests_get_openai_error_objects(client, options, status, param, message):
  kind = openai.NotFoundError if status == 404 else openai.BadRequestError
  with pytest.raises(kind) as error:
    client.completions.create(**options)
  body = error.value.response.json()["error"]
  assert (body["param"], body["type"]) == (param, "invalid_request_error")
  assert message in body["message"], body


def test_models_and_the_tokenizer_endpoints(client, server, lm):
  assert [m.id for m in client.models.list().data] == [MODEL]
  tok = lm.tokenizer
  status, info = _call(server.url + "/tokenizer_info")
  assert status == 200 and info["eos_token"] == "</s>"
  status, answer = _call(server.url + "/tokenize", {"prompt": info["bos_token"]})
  assert answer["tokens"] == [tok.bos_id]
  status, answer = _call(server.url + "/tokenize", {"prompt": PROMPTS[0]})
  assert answer["tokens"] == tok.encode(PROMPTS[0])
  status, answer = _call(server.url + "/detokenize", {"tokens": tok.encode(PROMPTS[0])})
  assert answer == {"prompt": tok.decode(tok.encode(PROMPTS[0]))}
  # the project's own endpoints carry on, with their own error format
  status, answer = _call(server.url + "/generate", {"prompt": PROMPTS[0]})
  assert status == 200 and answer == {"text": lm.generate(PROMPTS[:1], MAX_NEW)[0]}
  status, answer = _call(server.url + "/v1/nope")
  assert status == 404 and answer["error"]["type"] == "invalid_request_error"


def test_metrics_count_requests_batches_and_tokens(client, server):
  before = _metrics(server)
  answers = [client.completions.create(model=MODEL, prompt=p) for p in PROMPTS]
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model=MODEL, prompt="a", temperature=-1)
  after = _metrics(server)

  def delta(name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)
  assert delta("legal_lm_requests_total", endpoint="/v1/completions", status="200") == 3
  assert delta("legal_lm_requests_total", endpoint="/v1/completions", status="400") == 1
  assert delta("legal_lm_request_seconds_count", endpoint="/v1/completions") == 4
  assert delta("legal_lm_generated_tokens_total") == sum(a.usage.completion_tokens
                                                         for a in answers)
  assert delta("legal_lm_batch_size_count") == 3 and delta("legal_lm_batch_size_sum") == 3
  assert after[("legal_lm_queue_depth", ())] == 0
  assert after[("legal_lm_requests_in_flight", ())] == 1      # the scrape itself


def test_timeouts_and_a_classifier_get_clear_errors(lm, monkeypatch):
  # A request that waits longer than --request_timeout_s (here: for company in its batch).
  with _serving(lm, max_batch=2, max_wait_ms=3000, generate_max_new=MAX_NEW, model_name=MODEL,
                request_timeout_s=0.3) as slow:
    status, answer = _call(slow.url + "/v1/completions", {"model": MODEL, "prompt": "a"})
    assert status == 504 and "timed out" in answer["error"]["message"]
    assert slow.generator.depth() == 0       # dropped from the queue, never run
  # A classifier serves no /v1 generation: a 404 error object (no model call is made here).
  monkeypatch.setattr(loading.LoadedModel, "warm_up", lambda *args: 0)
  with _serving(dataclasses.replace(lm, kind="classify"), max_batch=1) as server:
    status, answer = _call(server.url + "/v1/completions", {"model": MODEL, "prompt": "a"})
    health = _call(server.url + "/health")[1]
  assert status == 404 and "no language-model head" in answer["error"]["message"]
  assert health["endpoints"] == ["/classify"]


# --- lm-evaluation-harness -----------------------------------------------------------------------
@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_the_projects_harness(server, lm):
  pytest.importorskip("lm_eval", reason="lm-eval: requirements-harness.txt")
  pytest.importorskip("tenacity", reason="lm-eval's API models: requirements-harness.txt")
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager
  from infer import harness
  tasks = ["legal_mc", "legal_gen", "legal_ppl"]
  ours = harness.evaluate(harness.HarnessLM(lm, batch_size=4), tasks, include_path=TASKS,
                          log_samples=True)
  # max_length: lm-eval keeps one position for the token it asks for, the server one for [bos]
  remote = evaluator.simple_evaluate(
      model="local-completions", model_args={
          "base_url": server.url + "/v1/completions", "model": MODEL,
          "tokenizer_backend": "remote", "max_length": SEQ_LEN - 1, "batch_size": 4,
          "max_retries": 1},
      tasks=tasks, task_manager=TaskManager(include_path=TASKS, include_defaults=False), log_samples=True,
      random_seed=0, numpy_random_seed=0, torch_random_seed=None, fewshot_random_seed=0,
      bootstrap_iters=0)
  for task in tasks:
    mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
    theirs = sorted(remote["samples"][task], key=lambda s: s["doc_id"])
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
      if task == "legal_gen":
        assert a["resps"] == b["resps"]
      else:
        np.testing.assert_allclose(np.array(a["resps"], dtype=object)[..., 0].astype(float),
                                   np.array(b["resps"], dtype=object)[..., 0].astype(float),
                                   rtol=1e-5, atol=1e-4)
  scores, remote_scores = harness.scalar_results(ours), harness.scalar_results(remote)
  for task in tasks:
    assert scores[task] == pytest.approx(remote_scores[task], rel=1e-4)


# --- SIGTERM: drain ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_drains_the_request_in_flight_and_refuses_new_ones(lm_dir):
  port = portpicker.pick_unused_port()
  # A request waits up to --max_wait_ms for company: a slow request with no compilation race.
  proc = subprocess.Popen([sys.executable, "-m", "infer.serve", f"--workdir={lm_dir}",
                           f"--port={port}", "--max_batch=2", "--max_wait_ms=2500",
                           "--batching=static",   # the static queue (the engine's drain:
                                                  # test_serve_inflight)
                           f"--generate_max_new={MAX_NEW}", "--drain_s=30"], cwd=REPO,
                          stderr=subprocess.PIPE, text=True)
  url, answers = f"http://127.0.0.1:{port}", {}
  try:
    wait_for_health(url, proc)
    name = os.path.basename(lm_dir)
    request = threading.Thread(target=lambda: answers.update(slow=_call(
        url + "/v1/completions", {"model": name, "prompt": PROMPTS[0], "max_tokens": 8})))
    request.start()
    while not _queued(url):        # the request is in flight, waiting in the queue
      threading.Event().wait(0.02)
    proc.send_signal(signal.SIGTERM)
    threading.Event().wait(0.5)
    with pytest.raises(OSError):      # the listening socket is closed ...
      _call(url + "/health")
    assert proc.poll() is None        # ... while the request in flight still waits
    request.join(60)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  status, answer = answers["slow"]
  assert status == 200, answer
  assert answer["choices"][0]["finish_reason"] in ("stop", "length")
  assert answer["usage"]["completion_tokens"] <= 8
  assert proc.returncode == 0, stderr[-2000:]
  assert "SIGTERM: shutting down" in stderr


def _queued(url: str) -> bool:
  with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
    text = response.read().decode()
  return any(line.startswith("legal_lm_queue_depth ") and float(line.split()[1]) > 0
             for line in text.splitlines())
