"""lm-evaluation-harness over a run (infer/harness.py): every per-example log-likelihood the
harness receives equals the project's own scoring — one unbatched, unsharded forward pass of the
model summing log p of the continuation tokens — on local tasks shipped in tests/harness_tasks/
(multiple choice, generation, rolling perplexity), and on hand-made requests (empty context,
a context longer than the model's window, several windows of a long document)."""
import functools
import os
import types

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is optional: pip install -r requirements-harness.txt")

from helpers import REPO, base_args, run_main  # noqa: E402
from infer import harness, loading  # noqa: E402
from model import sharding as sharding_lib  # noqa: E402

TASKS = os.path.join(REPO, "tests", "harness_tasks")
SEQ_LEN = 64


@pytest.fixture(scope="module")
def run_dir(corpus, data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("harness") / "run"
  r = run_main(base_args(corpus, data_dir, workdir, **{
      "train.num_steps": 6, "train.eval_every": 6, "train.checkpoint_every": 6,
      "data.seq_len": SEQ_LEN}))
  assert r.returncode == 0, r.stderr[-3000:]
  return str(workdir)


@pytest.fixture(scope="module")
def lm(run_dir):
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  loaded = loading.LoadedModel.from_workdir(run_dir, mesh=mesh)
  # batch 3 rounds up to the 2 devices; bucket 16 gives several compiled widths
  return harness.HarnessLM(loaded, batch_size=3, bucket=16)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({"params": params}, tokens)


def reference(lm, ids: list[int], scored: int) -> float:
  """sum log p(ids[t] | ids[:t]) over the last `scored` tokens: one row, one forward pass."""
  # Right-padded to the model's length: causal, so padding changes no earlier logit, and one
  # compiled forward serves every reference (eager applies of each length took minutes).
  row = np.zeros((1, lm.max_length), np.int32)
  row[0, :len(ids) - 1] = ids[:-1]
  logits = _forward(lm.loaded.model, jax.device_get(lm.loaded.params), row)[0]
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  n = len(ids) - 1
  return float(sum(logp[t, ids[t + 1]] for t in range(n - scored, n)))


def pair_reference(lm, context: str, continuation: str) -> float:
  tok = lm.tok
  ctx = [tok.bos_id] + (tok.encode(context) if context else [])
  cont = tok.encode(context + continuation)[len(ctx) - 1:]
  ids = (ctx + cont)[-(lm.max_length + 1):]
  return reference(lm, ids, len(cont))


def requests(*args):
  return [types.SimpleNamespace(args=a) for a in args]


@pytest.mark.slow
def test_loglikelihood_equals_a_direct_forward_pass(lm):
  long_context = " ".join(["the licensee shall pay the fee under this agreement"] * 20)
  pairs = [("The licensee shall", " pay the fee."), ("", "Governing law."),
           ("This agreement is ", "governed by the law"),   # the space moves to the continuation
           (long_context, " without written consent."), ("Notice", " in writing")]
  got = lm.loglikelihood(requests(*pairs))
  assert len(lm.tok.encode(long_context)) > lm.max_length   # the left end is really cut
  for (context, continuation), (logp, greedy) in zip(pairs, got):
    assert isinstance(greedy, bool)
    np.testing.assert_allclose(logp, pair_reference(lm, context.rstrip(), (
        context[len(context.rstrip()):] + continuation)), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_rolling_windows_cover_every_token_once(lm):
  text = " ".join(["either party may terminate this agreement upon written notice"] * 15)
  ids = lm.tok.encode(text)
  windows = lm.rolling_windows(text)
  assert len(windows) > 1 and sum(len(c) for _, c in windows) == len(ids)
  (total,) = lm.loglikelihood_rolling(requests((text,)))
  expected = sum(reference(lm, (ctx + cont)[-(lm.max_length + 1):], len(cont))
                 for ctx, cont in windows)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  short = "The licensee shall pay the fee."
  (got,) = lm.loglikelihood_rolling(requests((short,)))
  np.testing.assert_allclose(got, reference(lm, [lm.tok.bos_id] + lm.tok.encode(short),
                                            len(lm.tok.encode(short))), rtol=1e-5)


@pytest.mark.slow
def test_local_tasks_score_with_the_projects_own_loglikelihoods(lm):
  results = harness.evaluate(lm, ["legal_mc", "legal_gen", "legal_ppl"], include_path=TASKS,
                             log_samples=True)
  samples = results["samples"]

  # multiple choice: every choice's log-likelihood, and acc from them
  correct = []
  assert len(samples["legal_mc"]) == 6
  for sample in samples["legal_mc"]:
    scores = []
    for (context, continuation), ((logp, _),) in zip(sample["arguments"], sample["resps"]):
      assert continuation.startswith(" ")
      expected = pair_reference(lm, context, continuation)
      np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-4)
      scores.append(expected)
    correct.append(int(np.argmax(scores)) == sample["target"])
  scalars = harness.scalar_results(results)
  assert scalars["legal_mc"]["acc"] == pytest.approx(np.mean(correct))

  # generation: the greedy KV-cache continuation, cut at the task's stop string
  prompts = [s["arguments"][0][0] for s in samples["legal_gen"]]
  expected = [g.split(".")[0] for g in lm.loaded.generate(prompts, max_new=8)]
  assert [s["resps"][0][0] for s in samples["legal_gen"]] == expected
  assert 0.0 <= scalars["legal_gen"]["exact_match"] <= 1.0

  # rolling: the whole document after [bos]
  for sample in samples["legal_ppl"]:
    ids = lm.tok.encode(sample["arguments"][0][0])
    np.testing.assert_allclose(sample["resps"][0][0],
                               reference(lm, [lm.tok.bos_id] + ids, len(ids)), rtol=1e-5)
  assert scalars["legal_ppl"]["byte_perplexity"] > 1.0


@pytest.mark.slow
def test_the_command_line_writes_scores(run_dir, tmp_path):
  import json
  import subprocess
  import sys
  from helpers import env
  out = tmp_path / "harness.json"
  r = subprocess.run([sys.executable, "-m", "infer.harness", f"--workdir={run_dir}",
                      "--tasks=legal_mc", f"--include_path={TASKS}", "--limit=3",
                      f"--output={out}"], cwd=REPO, env=env(2), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "legal_mc" in r.stdout and "acc" in r.stdout
  scores = json.loads(out.read_text())["scores"]
  assert set(scores["legal_mc"]) == {"acc", "acc_norm"}
  assert len(json.loads(out.read_text())["samples"]["legal_mc"]) == 3


def test_a_classifier_is_refused():
  loaded = types.SimpleNamespace(kind="classify")
  with pytest.raises(ValueError, match="classifier"):
    harness.HarnessLM(loaded)


@pytest.mark.slow
def test_an_imported_model_scores_as_the_harness_hf_backend(tmp_path):
  """A Hugging Face model imported with train.hf.convert gets the same per-example
  log-likelihoods (and task scores) from this adapter as from lm-eval's own HF backend."""
  pytest.importorskip("transformers", reason="transformers: pip install -r requirements-hf.txt")
  pytest.importorskip("accelerate", reason="lm-eval's HF backend: requirements-hf.txt")
  import subprocess
  import sys
  from hf_models import make_hf
  from helpers import env
  from lm_eval.models.huggingface import HFLM
  import transformers
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  model = make_hf("llama", hf_dir)
  r = subprocess.run([sys.executable, "-m", "train.hf.convert", "import", f"--hf_dir={hf_dir}",
                      f"--workdir={workdir}"], cwd=REPO, env=env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  ours = harness.HarnessLM(loading.LoadedModel.from_workdir(workdir), batch_size=4, bucket=16)
  theirs = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(hf_dir),
                batch_size=4, add_bos_token=True)
  got = [harness.evaluate(lm, ["legal_mc"], include_path=TASKS, log_samples=True)
         for lm in (ours, theirs)]
  scores = [np.array([resp[0][0] for s in g["samples"]["legal_mc"] for resp in s["resps"]])
            for g in got]
  assert len(scores[0]) == 6 * 4   # 6 questions x 4 choices
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-4)
  assert harness.scalar_results(got[0]) == harness.scalar_results(got[1])
