"""Batch inference (infer/main.py) and the HTTP server (infer/serve.py) on real tiny runs.

A classifier and a summarizer are trained once per module for two steps: the point is real
checkpoints, configs and tokenizers, not quality. Two steps leave a summarizer that ends every
summary at once, so its served model gets random weights: then equal summaries mean something.
Every answer is compared with LoadedModel's own classify / summarize on the same texts.
"""
import contextlib
import dataclasses
import gzip
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import portpicker
import pytest

from configs import legal_summ_finetune
from helpers import REPO, _sentiment_config, _summary_file, numpy_params
from helpers import wait_for_health
from helpers import call as _call, serving as _serving
from infer import batching, decode, inputs, loading
from infer import main as batch_lib
from model import errors
from model import progress as progress_lib
from train import run as run_lib

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices


TEXTS = ["great wonderful film", "awful boring script", "the plot was dull", "superb cast",
         "hated the ending", "a moving story", "music and camera", "terrible waste"]
MAX_BATCH, MAX_CHARS = 4, 200


def _train_fast(config, workdir: str) -> str:
  config.model.num_layers = 1
  config.eval.evaluators = ()     # no validation decoding
  config.train.update(num_steps=2, eval_every=2, checkpoint_every=2, log_every=1)
  run_lib.train(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def classifier_dir(sentiment_files, tmp_path_factory):
  root = tmp_path_factory.mktemp("classifier")
  config = _sentiment_config(sentiment_files, root / "cache")
  config.data.test_file = ""      # no final test evaluation
  return _train_fast(config, str(root / "run"))


@pytest.fixture(scope="module")
def classifier(classifier_dir):
  return loading.LoadedModel.from_workdir(classifier_dir)


@pytest.fixture(scope="module")
def summarizer_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("summarizer")
  _summary_file(root / "pairs.jsonl", n=40)
  config = legal_summ_finetune.get_config("tiny")
  config.data.update(train_file=str(root / "pairs.jsonl"), data_dir=str(root / "cache"),
                     test_fraction=0.0)
  config.model.attention.kind = "full"    # compiles faster than the preset's blocked kernel
  return _train_fast(config, str(root / "run"))


@pytest.fixture(scope="module")
def summarizer(summarizer_dir):
  loaded = loading.LoadedModel.from_workdir(summarizer_dir)
  params = numpy_params(loaded.model, np.zeros((1, 8), np.int32))
  return dataclasses.replace(loaded, params=jax.device_put(params, jax.devices()[0]))


@contextlib.contextmanager
def _no_compilation():
  """Fails unless the block compiles nothing (the server's warm-up compiled every shape)."""
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, f"{len(compiles)} compilation(s) while serving"


@pytest.fixture(scope="module")
def cls_server(classifier):
  # A long max_wait so that concurrent requests reliably share batches.
  with _serving(classifier, max_batch=MAX_BATCH, max_wait_ms=50, max_chars=MAX_CHARS) as server:
    yield server


# --- the server: classification, batching, bad requests ------------------------------------------
@pytest.mark.slow
def test_classify_one_and_many_match_the_loaded_model(cls_server, classifier):
  with _no_compilation():
    one = _call(cls_server.url + "/classify", {"text": TEXTS[0]})
    three = _call(cls_server.url + "/classify", {"texts": TEXTS[:3]})   # padded to a batch of 4
    blanks = _call(cls_server.url + "/classify", {"text": f"  {TEXTS[0]}\n"})
  assert (one[0], three[0], blanks[0]) == (200, 200, 200)
  expected = classifier.classify(TEXTS[:1])[0]
  np.testing.assert_allclose(one[1]["probs"], expected, atol=1e-5)
  assert one[1]["label"] == int(expected.argmax())
  expected = classifier.classify(TEXTS[:4])[:3]     # rows are independent
  np.testing.assert_allclose(three[1]["probs"], expected, atol=1e-5)
  assert three[1]["label"] == expected.argmax(-1).tolist()
  # Leading / trailing blanks are dropped, as in training.
  np.testing.assert_allclose(blanks[1]["probs"], one[1]["probs"], atol=1e-6)


@pytest.mark.slow
def test_concurrent_requests_share_batches_and_get_their_own_answers(cls_server, classifier):
  before = cls_server.batcher.counts()
  barrier = threading.Barrier(len(TEXTS))
  answers = [None] * len(TEXTS)

  def client(i):
    barrier.wait()
    answers[i] = _call(cls_server.url + "/classify", {"text": TEXTS[i]})
  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(TEXTS))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  expected = np.concatenate([classifier.classify(TEXTS[:4]), classifier.classify(TEXTS[4:])])
  assert [status for status, _ in answers] == [200] * len(TEXTS)
  np.testing.assert_allclose([a["probs"] for _, a in answers], expected, atol=1e-5)
  after = cls_server.batcher.counts()
  assert after["requests"] - before["requests"] == len(TEXTS)
  assert after["batches"] - before["batches"] < len(TEXTS)


def test_batcher_fills_batches_in_arrival_order():
  release, started, batches = threading.Event(), threading.Event(), []

  def predict(texts):
    batches.append(list(texts))
    started.set()
    release.wait()
    return [t.upper() for t in texts]
  batcher = batching.Batcher(predict, max_batch=4, max_wait_s=0.0)
  results = {}

  def submit(name, texts):
    results[name] = batcher.submit(texts)
  first = threading.Thread(target=submit, args=("a", ["a"]))
  first.start()
  started.wait()            # the worker is busy: the next requests queue up behind it
  others = [threading.Thread(target=submit, args=(name, texts))
            for name, texts in (("b", ["b1", "b2"]), ("c", ["c1", "c2"]), ("d", ["d"]))]
  for t in others:
    t.start()
    while len(batcher._queue) < others.index(t) + 1:   # queued in this order
      threading.Event().wait(0.001)
  release.set()
  for t in [first] + others:
    t.join()
  batcher.close()
  # b and c fill one batch of four; d would overflow it and runs next.
  assert batches == [["a"], ["b1", "b2", "c1", "c2"], ["d"]]
  assert results == {"a": ["A"], "b": ["B1", "B2"], "c": ["C1", "C2"], "d": ["D"]}
  assert batcher.counts() == {"requests": 4, "texts": 6, "batches": 3, "failed_batches": 0}
  with pytest.raises(ValueError, match="1..4 texts"):
    batcher.submit(["x"] * 5)


@pytest.mark.slow
@pytest.mark.parametrize("method,path,body,status,message", [
    ("POST", "/classify", b"not json", 400, "malformed JSON (Expecting value at column 1)"),
    ("POST", "/classify", b"", 400, "body is empty"),
    ("POST", "/classify", b"[1, 2]", 400, "expected a JSON object, got an array"),
    ("POST", "/classify", b"\xff\xfe{}", 415, "not UTF-8"),
    ("POST", "/classify", b"{}", 400, 'expected "text"'),
    ("POST", "/classify", b'{"text": "a", "texts": ["b"]}', 400, "exactly one"),
    ("POST", "/classify", b'{"text": "a", "max_new": 3}', 400, "unknown field 'max_new'"),
    ("POST", "/classify", b'{"text": "a", "beam": 2}', 400, "unknown field 'beam'"),
    ("POST", "/classify", b'{"text": ""}', 400, '"text" is empty'),
    ("POST", "/classify", b'{"text": "  \\n"}', 400, '"text" is empty'),
    ("POST", "/classify", b'{"text": 5}', 400, '"text" must be a string, got a number'),
    ("POST", "/classify", b'{"texts": "abc"}', 400, "must be an array of strings"),
    ("POST", "/classify", b'{"texts": []}', 400, '"texts" is empty'),
    ("POST", "/classify", b'{"texts": ["a", null]}', 400, '"texts"[1] must be a string'),
    ("POST", "/classify", json.dumps({"text": "x" * (MAX_CHARS + 1)}).encode(), 413,
     f"{MAX_CHARS + 1} characters; the limit is {MAX_CHARS}"),
    ("POST", "/classify", json.dumps({"texts": ["a"] * (MAX_BATCH + 1)}).encode(), 413,
     f"{MAX_BATCH + 1} entries; the limit is {MAX_BATCH}"),
    ("POST", "/summarize", b'{"text": "a"}', 400, "use /classify"),
    ("GET", "/nope", None, 404, "unknown path /nope"),
    ("POST", "/nope", b"{}", 404, "unknown path /nope"),
    ("GET", "/classify", None, 405, "/classify takes POST, not GET"),
    ("DELETE", "/health", None, 405, "/health takes GET, not DELETE"),
])
def test_bad_requests_get_a_clear_error_and_the_server_carries_on(cls_server, method, path,
                                                                  body, status, message):
  got, answer = _call(cls_server.url + path, method=method, data=body)
  assert (got, message in answer["error"]) == (status, True), answer
  assert _call(cls_server.url + "/health")[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize("headers,status,message", [
    ({}, 411, "Content-Length header is required"),
    ({"Content-Length": "999999999"}, 413, "999999999 bytes; the limit is"),
    ({"Content-Length": "-1"}, 400, "bad Content-Length"),
])
def test_body_size_is_checked_before_reading(cls_server, headers, status, message):
  host, port = cls_server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  conn.putrequest("POST", "/classify")
  for key, value in headers.items():
    conn.putheader(key, value)
  conn.endheaders()           # and no body
  response = conn.getresponse()
  assert response.status == status
  assert message in json.load(response)["error"]
  conn.close()


@pytest.mark.slow
def test_a_model_failure_is_a_500_and_the_next_request_is_served(cls_server, classifier,
                                                                 monkeypatch):
  def broken(texts):
    raise RuntimeError("device on fire")
  monkeypatch.setattr(classifier, "classify", broken)
  status, answer = _call(cls_server.url + "/classify", {"text": TEXTS[0]})
  assert status == 500 and "RuntimeError: device on fire" in answer["error"]
  monkeypatch.undo()
  status, answer = _call(cls_server.url + "/classify", {"text": TEXTS[0]})
  assert status == 200 and len(answer["probs"]) == 2
  assert cls_server.batcher.counts()["failed_batches"] >= 1


@pytest.mark.slow
def test_health_describes_the_model(cls_server, classifier):
  status, info = _call(cls_server.url + "/health")
  assert status == 200
  assert (info["kind"], info["step"], info["num_classes"]) == ("classify", classifier.step, 2)
  assert info["params"] == sum(x.size for x in jax.tree.leaves(classifier.params)) > 0
  assert info["batch_sizes"] == [1, 2, 4] and info["max_chars"] == MAX_CHARS


@pytest.mark.slow
def test_an_ensemble_of_classifiers_serves_their_mean(classifier):
  from infer import ensemble
  other = dataclasses.replace(classifier,
                              params=jax.tree.map(lambda x: x * 1.5, classifier.params))
  both = ensemble.ClassifierEnsemble([classifier, other], ["a", "b"])
  expected = (np.asarray(classifier.classify(TEXTS[:3])) +
              np.asarray(other.classify(TEXTS[:3]))) / 2
  assert np.abs(expected - np.asarray(classifier.classify(TEXTS[:3]))).max() > 1e-4
  with _serving(both, max_batch=MAX_BATCH) as server:
    with _no_compilation():
      status, answer = _call(server.url + "/classify", {"texts": TEXTS[:3]})
    info = _call(server.url + "/health")[1]
  assert status == 200
  np.testing.assert_allclose(answer["probs"], expected, atol=1e-5)
  assert answer["label"] == expected.argmax(-1).tolist()
  assert info["params"] == 2 * sum(x.size for x in jax.tree.leaves(classifier.params))


# --- summarization -------------------------------------------------------------------------------
DOCS = ["the film story actor. scene plot music camera.", "ending director cast script."]


@pytest.fixture(scope="module")
def summ_server(summarizer):
  with _serving(summarizer, max_batch=2) as server:
    yield server


@pytest.mark.slow
def test_summaries_match_the_loaded_model(summ_server, summarizer):
  with _no_compilation():
    one = _call(summ_server.url + "/summarize", {"text": DOCS[0]})
    two = _call(summ_server.url + "/summarize", {"texts": DOCS})
  wrong = _call(summ_server.url + "/classify", {"text": DOCS[0]})
  health = _call(summ_server.url + "/health")[1]
  assert one == (200, {"summary": summarizer.summarize(DOCS[:1])[0]})
  assert one[1]["summary"]
  assert two == (200, {"summary": summarizer.summarize(DOCS)})
  assert wrong[0] == 400 and "use /summarize" in wrong[1]["error"]
  assert health["max_new"] == summarizer.config.eval.decode_len


@pytest.mark.slow
def test_summaries_with_decoding_options_match_the_loaded_model(summ_server, summarizer):
  greedy = {"no_repeat_ngram_size": 2, "repetition_penalty": 1.5, "min_new": 2,
            "length_ratio": 0.5}
  beam = {"beam": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2}
  answers = [_call(summ_server.url + "/summarize", {"texts": DOCS, **options})
             for options in (greedy, beam)]
  mbr = {"samples": 3, "temperature": 1.5, "seed": 4, "source_weight": 2.0}
  answers.append(_call(summ_server.url + "/summarize", {"texts": DOCS, **mbr}))
  expected = [summarizer.summarize(DOCS, **options) for options in (greedy, beam, mbr)]
  assert answers == [(200, {"summary": summaries}) for summaries in expected]
  assert expected[0] != summarizer.summarize(DOCS)     # the options act (tests/test_decode.py)


@pytest.mark.slow
def test_an_ensemble_of_summarizers_serves_their_consensus(summarizer, summarizer_dir):
  from infer import ensemble
  other = dataclasses.replace(summarizer, params=jax.device_put(
      numpy_params(summarizer.model, np.zeros((1, 8), np.int32), seed=7), jax.devices()[0]))
  # The odd one first: the two identical members outvote it wherever it differs.
  three = ensemble.SummarizerEnsemble([other, summarizer, summarizer], ["o", "a", "b"])
  options = {"no_repeat_ngram_size": 2}
  own, odd = summarizer.summarize(DOCS, **options), other.summarize(DOCS, **options)
  assert own != odd, "the members must disagree for the test to choose"
  with _serving(three, max_batch=2) as server:
    with _no_compilation():
      status, answer = _call(server.url + "/summarize", {"texts": DOCS, **options})
    info = _call(server.url + "/health")[1]
  assert (status, answer) == (200, {"summary": own})
  assert info["endpoints"] == ["/summarize"] and info["max_new"] == summarizer.config.eval.decode_len
  with pytest.raises(ValueError, match="needs >= 3 members"):
    ensemble.SummarizerEnsemble([other, summarizer], ["o", "a"])
  # From the command line's --workdir (infer.main, infer.serve): comma-separated runs.
  loaded, max_new = inputs.load_predictor(",".join([summarizer_dir] * 3), 5)
  assert isinstance(loaded, ensemble.SummarizerEnsemble) and max_new == 5
  with pytest.raises(inputs.InputError, match="--workdir: an ensemble of summarizers needs >= 3"):
    inputs.load_predictor(f"{summarizer_dir},{summarizer_dir}", None)


@pytest.mark.slow
@pytest.mark.parametrize("body, message", [
    (b'{"text": "a", "beam": 1}', '"beam" must be 0 (off) or an integer in 2..8, got 1'),
    (b'{"text": "a", "length_penalty": 0.5}', "applies to beam search only"),
    (b'{"text": "a", "no_repeat_ngram_size": "3"}',
     '"no_repeat_ngram_size" must be an integer in 0..12 (0: off), got "3"'),
    (b'{"text": "a", "min_new": 13}', '"min_new" must be an integer in 0..12, got 13'),
    (b'{"text": "a", "repetition_penalty": -1}', '"repetition_penalty" must be a number in'),
    (b'{"text": "a", "length_ratio": -0.5}',
     '"length_ratio" must be a number in [0, 10] (0: off; else summary tokens per document '
     'token), got -0.5'),
    (b'{"text": "a", "temperature": 1}', '"temperature", "top_p", "seed" and "source_weight" '
                                         'apply to MBR sampling only: set "samples" too'),
    (b'{"text": "a", "source_weight": 1}', 'apply to MBR sampling only'),
    (b'{"text": "a", "samples": 2, "source_weight": -1}',
     '"source_weight" must be a number in [0, 100], got -1'),
    (b'{"text": "a", "samples": 33}', '"samples" must be an integer in 0..32 (0: off), got 33'),
    (b'{"text": "a", "samples": 2, "temperature": 0}', '"temperature" must be a number in (0, 10]'),
    (b'{"text": "a", "top_k": 1}', "unknown field 'top_k'"),
])
def test_summarize_bad_decoding_options_are_400(summ_server, body, message):
  status, answer = _call(summ_server.url + "/summarize", data=body)
  assert (status, message in answer["error"]) == (400, True), answer


@pytest.mark.slow
def test_write_predictions_summaries(summarizer, tmp_path):
  inputs = [("a", "the film story. actor scene."), ("b", "plot music camera."),
            ("c", "ending director.")]
  out = tmp_path / "out" / "summaries.jsonl"
  batch_lib.write_predictions(summarizer, inputs, str(out), batch_size=2)
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  texts = [t for _, t in inputs]
  expected = summarizer.summarize(texts[:2]) + summarizer.summarize(texts[2:])
  assert lines == [{"id": i, "summary": s} for (i, _), s in zip(inputs, expected)]


@pytest.mark.slow
def test_summaries_drop_ids_the_tokenizer_has_no_piece_for(summarizer, monkeypatch):
  tok = summarizer.tokenizer
  past = summarizer.config.data.vocab_size - 1      # an embedding row past the tokenizer
  assert past >= tok.vocab_size
  monkeypatch.setattr(decode, "greedy",
                      lambda *args, **kwargs: np.array([[40, past, 41, tok.eos_id]]))
  assert summarizer.summarize(["a document."], max_new=4) == [tok.decode([40, 41])]


# --- batch inference and the command lines -------------------------------------------------------
@pytest.mark.slow
def test_long_inputs_log_progress_with_an_eta(classifier, tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(progress_lib.CountProgress, "every_s", 0.0)
  caplog.set_level(logging.INFO)
  inputs = [(i, TEXTS[i % len(TEXTS)]) for i in range(12)]
  batch_lib.write_predictions(classifier, inputs, str(tmp_path / "p.jsonl"), batch_size=4)
  # The first batch (compilation) sets the pace's start; the last one is the summary line.
  progress = [r.getMessage() for r in caplog.records if "texts/s" in r.getMessage()]
  assert len(progress) == 1 and re.match(r"8/12 texts \(67%\) .* ETA 0:00:\d\d$", progress[0])
  assert "wrote 12 predictions" in caplog.text
  assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_serve_command_answers_then_stops_cleanly_on_sigterm(classifier_dir, classifier):
  port = portpicker.pick_unused_port()
  proc = subprocess.Popen([sys.executable, "-m", "infer.serve", f"--workdir={classifier_dir}",
                           f"--port={port}", "--max_batch=1"], cwd=REPO,
                          stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    wait_for_health(url, proc)
    status, answer = _call(url + "/classify", {"text": TEXTS[0]})
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert status == 200
  np.testing.assert_allclose(answer["probs"], classifier.classify(TEXTS[:1])[0], atol=1e-5)
  assert proc.returncode == 0, stderr[-2000:]
  assert f"at http://127.0.0.1:{port}" in stderr and "SIGTERM: shutting down" in stderr


@pytest.mark.slow
def test_cli_writes_one_prediction_per_line(classifier_dir, classifier, tmp_path):
  path = tmp_path / "in.jsonl.gz"
  lines = [{"id": 7, "body": TEXTS[0]}, {"body": TEXTS[1]}, None, {"body": TEXTS[2], "id": "x"},
           {"body": TEXTS[3]}, {"body": TEXTS[4]}]
  with gzip.open(path, "wt") as f:      # line 3 is blank: skipped
    f.writelines((json.dumps(x) if x else "") + "\n" for x in lines)
  result = subprocess.run(
      [sys.executable, "-m", "infer.main", f"--workdir={classifier_dir}", f"--input={path}",
       f"--output={tmp_path / 'preds.jsonl'}", "--text_field=body", "--batch_size=4"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
  assert [x["id"] for x in preds] == [7, "in.jsonl.gz:2", "x", "in.jsonl.gz:5", "in.jsonl.gz:6"]
  # Batches of four; the last (one text) padded to four.
  expected = np.concatenate([classifier.classify(TEXTS[:4]), classifier.classify(TEXTS[4:5])])
  np.testing.assert_allclose([x["probs"] for x in preds], expected, atol=1e-5)
  assert [x["label"] for x in preds] == expected.argmax(-1).tolist()


def test_cli_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n{"text": broken\n')
  main = errors.exit_on_user_error(lambda argv: batch_lib.read_inputs(str(path), "text"))
  with pytest.raises(SystemExit) as exit_info:
    main(["infer.main"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (f"error: {path}:2: malformed JSON (Expecting value at "
                                     "column 10)\n")


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"title": "no"}\n', "in.jsonl:2: expected a non-empty string field 'text'"),
    ('{"text": "ok"}\n\n{"text": 3}\n', r"in.jsonl:3: expected a non-empty string field"),
    (b'{"text": "\xff"}\n', r"in.jsonl:1: not valid UTF-8"),
    ('{"text": "ok"}\n[1]\n', r"in.jsonl:2: expected a JSON object, got an array"),
    ("\n\n", r"in.jsonl: no lines to predict"),
])
def test_bad_input_files_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "in.jsonl"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(inputs.InputError, match=message):
    batch_lib.read_inputs(str(path), "text")


@pytest.mark.slow
def test_missing_workdir_input_or_checkpoint_are_clear_errors(tmp_path, classifier, summarizer):
  with pytest.raises(loading.LoadError, match="no such directory"):
    inputs.load_predictor(str(tmp_path / "nope"), None)
  with pytest.raises(loading.LoadError, match="no finished checkpoint"):
    inputs.load_predictor(str(tmp_path), None)
  with pytest.raises(inputs.InputError, match="no such file"):
    batch_lib.read_inputs(str(tmp_path / "nope.jsonl"), "text")
  with pytest.raises(ValueError, match="only summarizers generate"):
    classifier.check_max_new(8)
  with pytest.raises(ValueError, match=r"max_new=62: expected 1..61"):
    summarizer.check_max_new(62)
  assert summarizer.check_max_new(None) == summarizer.config.eval.decode_len


@pytest.mark.slow
def test_window_stride_flag_sets_how_a_classifier_reads_long_texts(classifier_dir, classifier,
                                                                   summarizer_dir):
  loaded, _ = inputs.load_predictor(str(classifier_dir), None, window_stride=8)
  long = " ".join(TEXTS * 6)
  assert len(loaded.tokenizer.encode(long)) > loaded.config.data.seq_len
  np.testing.assert_allclose(loaded.predict([long], pad_to=2)[0]["probs"],
                             classifier.classify([long], window_stride=8)[0], atol=1e-6)
  assert not np.allclose(classifier.classify([long], window_stride=8),
                         classifier.classify([long]), atol=1e-4)
  with pytest.raises(inputs.InputError, match=r"--window_stride=63: expected 0 \(off\) \.\. 62"):
    inputs.load_predictor(str(classifier_dir), None, window_stride=63)
  with pytest.raises(inputs.InputError, match="--window_stride applies to classifiers"):
    inputs.load_predictor(str(summarizer_dir), None, window_stride=8)


@pytest.mark.slow
def test_inference_report_compares_every_variant(classifier_dir, summarizer_dir, sentiment_files,
                                                 tmp_path):
  from configs import inference_report as report_config
  from bench import inference_report
  cfg = report_config.get_config("tiny")
  # The tiny classifier stands in for both teacher and student: the report's plumbing is
  # under test here, not distillation (tests/test_finetune.py covers that).
  cfg.update(teacher=classifier_dir, student=classifier_dir, summarizer=summarizer_dir,
             test_file=str(sentiment_files / "test.jsonl"), out_dir=str(tmp_path),
             summarizer_file=str(tmp_path / "docs.jsonl"))
  _summary_file(tmp_path / "docs.jsonl", n=3)
  result = inference_report.run(cfg)
  rows = {r["variant"]: r for r in result["classification"]}
  assert list(rows) == ["teacher f32", "student f32", "student bf16",
                        "student int8_weight_only", "student w8a8"]
  # The same f32 model twice: the same accuracy; int8 stores fewer bytes.
  assert rows["teacher f32"]["accuracy"] == rows["student f32"]["accuracy"]
  assert rows["student w8a8"]["memory MiB"] < rows["student f32"]["memory MiB"]
  assert abs(rows["student w8a8"]["accuracy"] - rows["student f32"]["accuracy"]) <= 0.1
  for r in rows.values():
    assert 0 < r["p50 ms (b=1)"] <= r["p99 ms (b=1)"]
  # f32 decoding is exact: the cache changes the cost, never the tokens.
  assert result["decoders_agree"]["f32"] == {"identical rows": 3, "rows": 3}
  assert {r["decoder"] for r in result["decoding"]} == {
      f"{d} ({m})" for d in ("KV cache", "recompute") for m in ("f32", "bf16")}
  for name in ("inference_report.md", "inference_report.json", "latency_vs_accuracy.png"):
    assert (tmp_path / name).exists()
  cfg.update(teacher="", summarizer="")
  with pytest.raises(ValueError, match="config.summarizer"):
    inference_report.run(cfg)


@pytest.mark.slow
def test_quantized_run_infers_and_serves_like_any_run(classifier_dir, classifier, tmp_path,
                                                    monkeypatch):
  """`infer.quantize --out=DIR` writes a run: infer.main and the server load DIR by path (a
  relative one, as the README writes it) and predict what the in-process int8 model does."""
  from infer import ptq
  out = tmp_path / "runs" / "w8a8"
  result = subprocess.run(
      [sys.executable, "-m", "infer.quantize", f"--workdir={classifier_dir}", "--mode=w8a8",
       "--out=runs/w8a8"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (out / loading.QUANTIZED_DIR / "params").is_dir()
  loaded = loading.LoadedModel.from_workdir(str(out))
  assert (loaded.kind, loaded.quantization, loaded.step) == ("classify", "w8a8", classifier.step)
  qmodel, qparams = ptq.quantize(classifier.model, classifier.params, "w8a8",
                                      np.zeros((1, 8), np.int32))
  batch = classifier.encode_for_classify(TEXTS[:4])
  expected = np.asarray(loading.classify_probs(qmodel, qparams, batch["tokens"], batch["mask"]))
  np.testing.assert_allclose(loaded.classify(TEXTS[:4]), expected, atol=1e-6)
  # Batch inference as infer.main does it (its command line: test_cli_writes_one_prediction_per_
  # line), in this process, with the relative path: a second process would only repeat the
  # imports and the compile.
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
  monkeypatch.chdir(tmp_path)
  relative, max_new = inputs.load_predictor("runs/w8a8", None)
  assert relative.quantization == "w8a8"
  batch_lib.write_predictions(relative, batch_lib.read_inputs("in.jsonl", "text"), "preds.jsonl",
                              batch_size=4, max_new=max_new)
  preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([p["probs"] for p in preds], expected, atol=1e-5)
  # The server answers from it too.
  with _serving(loaded, max_batch=1) as server:
    status, answer = _call(server.url + "/classify", {"text": TEXTS[0]})
  assert status == 200
  np.testing.assert_allclose(answer["probs"], expected[0], atol=1e-5)


@pytest.mark.slow
def test_relative_workdir_loads_and_a_missing_one_says_so(classifier_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(os.path.dirname(classifier_dir))
  loaded = loading.LoadedModel.from_workdir(os.path.basename(classifier_dir))
  assert loaded.kind == "classify"
  with pytest.raises(loading.LoadError, match=r"--workdir=nope: no such directory"):
    loading.open_run("nope")
