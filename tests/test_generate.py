"""Text generation from an LM run: infer.generate (streamed, stop strings, sampling, beam),
LoadedModel.generate_stream against LoadedModel.generate, and the server's POST /generate.

One tiny LM is pre-trained for a few steps on generated reviews (a real run: checkpoint, config,
tokenizer). Its served/in-process copy gets random weights, so that generated texts are varied
and equal texts mean something (as tests/test_serve.py does for the summarizer)."""
import json
import subprocess
import sys
import types

import ml_collections
import pytest

from helpers import REPO, _sentiment_config, env, random_weights, train_tiny_lm
from helpers import call as _call, serving as _serving
from infer import generate as generate_cli
from infer import loading, stream_text
from train import run as run_lib

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices


PROMPTS = ["great wonderful film", "the plot was", "music and camera work", "a"]


@pytest.fixture(scope="module")
def lm_dir(sentiment_files, tmp_path_factory):
  return train_tiny_lm(tmp_path_factory.mktemp("lm"), sentiment_files, 64, steps=4)


@pytest.fixture(scope="module")
def lm(lm_dir):
  return random_weights(loading.LoadedModel.from_workdir(lm_dir))


@pytest.fixture(scope="module")
def lm_server(lm):
  with _serving(lm, max_batch=4, max_wait_ms=20, max_chars=200, generate_max_new=16) as server:
    yield server


@pytest.mark.slow
def test_generate_endpoint_matches_the_loaded_model(lm_server, lm):
  status, answer = _call(lm_server.url + "/generate", {"prompt": PROMPTS[0]})
  assert status == 200 and answer == {"text": lm.generate(PROMPTS[:1], 16)[0]}
  status, answer = _call(lm_server.url + "/generate", {"prompts": PROMPTS[:3], "max_new": 8})
  assert status == 200 and answer["text"] == lm.generate(PROMPTS[:3], 8)
  options = {"temperature": 0.7, "top_k": 20, "seed": 4, "stop": ["e"]}
  status, answer = _call(lm_server.url + "/generate", {"prompt": PROMPTS[1], **options})
  expected = lm.generate(PROMPTS[1:2], 16, temperature=0.7, top_k=20, seed=4, stop=("e",))
  assert status == 200 and answer["text"] == expected[0] and "e" not in answer["text"]
  # The decoding controls (the shapes and options test_stream_equals_generate_with_decoding_
  # controls compiled).
  status, answer = _call(lm_server.url + "/generate", {"prompts": PROMPTS, **CONTROLS})
  assert status == 200 and answer["text"] == lm.generate(PROMPTS, 16, **CONTROLS)
  status, info = _call(lm_server.url + "/health")
  assert info["kind"] == "pretrain" and info["endpoints"] == ["/generate"]
  assert info["generate_max_new"] == 16 and info["generated"]["requests"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", [
    (b'{}', 400, 'expected "prompt"'),
    (b'{"prompt": ""}', 400, '"prompt" is empty'),
    (b'{"prompt": "a", "prompts": ["b"]}', 400, "exactly one"),
    (b'{"prompts": ["a", 3]}', 400, '"prompts"[1] must be a string'),
    (b'{"prompt": "a", "max_new": 17}', 400, '"max_new" must be an integer in 1..16'),
    (b'{"prompt": "a", "max_new": true}', 400, '"max_new" must be an integer'),
    (b'{"prompt": "a", "temperature": -1}', 400, '"temperature" must be a number in [0, 10]'),
    (b'{"prompt": "a", "top_p": 0}', 400, '"top_p" must be a number in (0, 1]'),
    (b'{"prompt": "a", "stop": [""]}', 400, '"stop" must be a string or a list'),
    (b'{"prompt": "a", "bogus": 2}', 400, "unknown field 'bogus'"),
    (b'{"prompt": "a", "beam": 1}', 400, '"beam" must be 0 (off) or an integer in 2..8, got 1'),
    (b'{"prompt": "a", "beam": 2, "temperature": 0.5}', 400, "beam search is deterministic"),
    (b'{"prompt": "a", "length_penalty": 0.5}', 400, "applies to beam search only"),
    (b'{"prompt": "a", "no_repeat_ngram_size": -1}', 400,
     '"no_repeat_ngram_size" must be an integer in 0..16 (0: off), got -1'),
    (b'{"prompt": "a", "max_new": 4, "min_new": 5}', 400,
     '"min_new" must be an integer in 0..4, got 5'),
    (b'{"prompt": "a", "repetition_penalty": 0}', 400,
     '"repetition_penalty" must be a number in (0, 10] (1: off), got 0'),
    (b'{"prompt": "a", "repetition_penalty": NaN}', 400, '"repetition_penalty" must be'),
    (b'{"prompt": "a", "length_ratio": 0.5}', 400, "unknown field 'length_ratio'"),
    (json.dumps({"prompt": "x" * 201}).encode(), 413, "201 characters; the limit is 200"),
    (json.dumps({"prompts": ["a"] * 5}).encode(), 413, "5 entries; the limit is 4"),
    (b"not json", 400, "malformed JSON"),
])
def test_generate_bad_requests_are_4xx(lm_server, body, status, message):
  got, answer = _call(lm_server.url + "/generate", data=body)
  assert (got, message in answer["error"]) == (status, True), answer
  got, answer = _call(lm_server.url + "/classify", {"text": "a"})
  assert got == 400 and "use /generate" in answer["error"]


@pytest.mark.slow
def test_a_classifier_server_has_no_generate(sentiment_files, tmp_path):
  config = _sentiment_config(sentiment_files, tmp_path / "cache", num_steps=1, eval_every=1,
                             checkpoint_every=1)
  config.data.test_file = ""
  config.eval.evaluators = ()
  config.model.num_layers = 1
  run_lib.train(config, str(tmp_path / "cls"))
  classifier = loading.LoadedModel.from_workdir(str(tmp_path / "cls"))
  with _serving(classifier, max_batch=1) as server:
    status, answer = _call(server.url + "/generate", {"prompt": "hello"})
  assert status == 400 and "no language-model head" in answer["error"]
