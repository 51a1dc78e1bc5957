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


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_stream_equals_generate_greedy_and_sampled(lm, chunk):
  greedy = lm.generate(PROMPTS, 20)
  assert any(greedy)
  pieces = list(lm.generate_stream(PROMPTS, 20, chunk=chunk))
  assert ["".join(p[i] for p in pieces) for i in range(len(PROMPTS))] == greedy
  options = dict(temperature=1.0, top_k=50, top_p=0.9, seed=7)
  sampled = lm.generate(PROMPTS, 20, **options)
  assert lm.generate(PROMPTS, 20, **options) == sampled          # reproducible
  assert lm.generate(PROMPTS, 20, **dict(options, seed=8)) != sampled
  pieces = list(lm.generate_stream(PROMPTS, 20, chunk=chunk, **options))
  assert ["".join(p[i] for p in pieces) for i in range(len(PROMPTS))] == sampled


CONTROLS = dict(no_repeat_ngram_size=2, repetition_penalty=1.3, min_new=4)


@pytest.mark.slow
def test_stream_equals_generate_with_decoding_controls(lm):
  controlled = lm.generate(PROMPTS, 16, **CONTROLS)
  # Not the plain continuations (of which 16 tokens would be a prefix): the controls acted.
  plain = lm.generate(PROMPTS, 20)                   # compiled by the first test
  assert all(controlled) and any(not p.startswith(c) for p, c in zip(plain, controlled))
  pieces = list(lm.generate_stream(PROMPTS, 16, chunk=8, **CONTROLS))
  assert ["".join(p[i] for p in pieces) for i in range(len(PROMPTS))] == controlled


@pytest.mark.slow
def test_stop_strings_cut_at_the_first_one(lm):
  full = lm.generate(PROMPTS, 30)
  text = max(full, key=len)
  row = full.index(text)
  stop = text[len(text) // 2:len(text) // 2 + 2]
  expected = text[:text.find(stop)]
  assert lm.generate(PROMPTS, 30, stop=("never-there", stop))[row] == expected
  pieces = list(lm.generate_stream(PROMPTS, 30, stop=(stop,), chunk=3))
  joined = ["".join(p[i] for p in pieces) for i in range(len(PROMPTS))]
  assert joined[row] == expected
  assert all(stop not in t for t in joined)
  assert stream_text.cut_at_stop("a. b. c", (" c", ".")) == ("a", True)


def test_streamed_rows_hold_back_unsettled_text():
  """Byte-level ids (eos 0): a split UTF-8 character and a possible stop string's start wait
  for the ids that settle them; a finished row yields nothing more."""
  bytes_tok = types.SimpleNamespace(
      eos_id=0, decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))
  rows = stream_text.StreamedRows(1, bytes_tok, max_new=12)
  e_acute = list("é".encode())                       # two bytes
  assert rows.add([[ord("a"), e_acute[0]]]) == ["a"]
  assert rows.add([[e_acute[1], ord("b")]]) == ["éb"]
  assert rows.add([[0, ord("c")]]) == [""] and rows.all_finished and rows.shown == ["aéb"]
  rows = stream_text.StreamedRows(1, bytes_tok, max_new=12, stop=("END",))   # holds 2 back
  assert rows.add([list(b"xyE")]) == ["x"]
  assert rows.add([list(b"NDz")]) == ["y"] and rows.all_finished
  assert rows.add([list(b"qqq")]) == [""] and rows.shown == ["xy"]


@pytest.mark.slow
def test_beam_search_text(lm):
  beams = lm.generate(PROMPTS, 12, beam=3)
  assert len(beams) == len(PROMPTS) and all(isinstance(t, str) for t in beams)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "infer.generate", *args], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_streams_greedy_and_writes_jsonl(lm_dir, tmp_path):
  trained = loading.LoadedModel.from_workdir(lm_dir)
  proc = _cli(f"--workdir={lm_dir}", f"--prompt={PROMPTS[0]}", "--max_new=16", "--chunk=3")
  assert proc.returncode == 0, proc.stderr
  text = trained.generate([PROMPTS[0]], 16)[0]
  assert proc.stdout == text + "\n"     # piped: the generated text alone
  assert generate_cli.describe(text, 16) in proc.stderr
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                             for i, p in enumerate(PROMPTS)))
  out = tmp_path / "out.jsonl"
  proc = _cli(f"--workdir={lm_dir}", f"--prompts_file={prompts}", f"--output={out}",
              "--max_new=8", "--temperature=0.8", "--seed=2", "--stop=.", "--batch_size=3",
              "--repetition_penalty=1.3", "--min_new=2")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == [0, 1, 2, 3]
  options = dict(temperature=0.8, seed=2, stop=(".",), repetition_penalty=1.3, min_new=2)
  expected = (trained.generate(PROMPTS[:3], 8, **options) +
              trained.generate(PROMPTS[3:], 8, **options))
  assert [r["text"] for r in rows] == expected
  proc = _cli(f"--workdir={lm_dir}", f"--prompts_file={prompts}", "--max_new=8", "--beam=2",
              "--length_penalty=0.5", "--no_repeat_ngram_size=2")
  assert proc.returncode == 0, proc.stderr
  assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == trained.generate(
      PROMPTS, 8, beam=2, length_penalty=0.5, no_repeat_ngram_size=2)


def test_describe_says_what_was_generated():
  assert generate_cli.describe(" not be\n\n\n", 64) == (
      "[generated: 2 words, 3 line breaks, 10 characters; --max_new=64 tokens at most] mostly "
      "line breaks: the model ends lines early, as a small or briefly trained one (a :tiny run) "
      "does")
  assert generate_cli.describe("The licensee shall not.", 8).endswith("tokens at most]")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--max_new=500"], "max_new=500: expected 1..62"),
    (["--top_p=0"], "top_p=0.0: expected (0, 1]"),
    (["--beam=2", "--temperature=1"], "beam search is deterministic"),
    (["--beam=1"], "beam=1: expected 0 (off) or >= 2"),
])
def test_cli_bad_options_are_one_line(lm_dir, args, message):
  proc = _cli(f"--workdir={lm_dir}", "--prompt=hello", *args)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("options, message", [
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1: expected 0 (off) .. max_new=16"),
    (dict(no_repeat_ngram_size=17), "no_repeat_ngram_size=17: expected 0 (off) .. max_new=16"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0: expected (0, 10] (1: off"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty=nan: expected (0, 10]"),
    (dict(min_new=17), "min_new=17: expected 0..max_new=16"),
    (dict(length_penalty=0.5), "length_penalty=0.5 applies to beam search only: add --beam"),
    (dict(beam=2, length_penalty=11.0), "length_penalty=11.0: expected [-10, 10]"),
    (dict(beam=2, top_k=5), "beam search is deterministic: drop --temperature / --top_k"),
])
def test_check_options_names_the_flag_and_its_range(options, message):
  from infer import inputs as inputs_lib
  loaded = types.SimpleNamespace(config=ml_collections.ConfigDict(
      {"data": {"seq_len": 64, "vocab_size": 512}}))
  args = {**dict(temperature=0.0, top_k=0, top_p=1.0, beam=0), **options}
  with pytest.raises(inputs_lib.InputError) as error:
    generate_cli.check_options(loaded, 16, **args)
  assert str(error.value).startswith(message), error.value
  generate_cli.check_options(loaded, 16, 0.0, 0, 1.0, 3, no_repeat_ngram_size=16,
                             repetition_penalty=10, min_new=16, length_penalty=-2.0)


# --- the server ----------------------------------------------------------------------------
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
