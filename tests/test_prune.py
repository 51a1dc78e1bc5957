"""infer/prune.py: structured pruning with real shape changes, written as a normal run.

Why these checks: a pruned model must (1) really be smaller, with the shapes its config says
(GQA grouping intact), (2) be the original bit for bit when nothing is pruned (the slicing
itself changes nothing), (3) remove the units that matter least: on a model whose unimportant
units are known, importance-based pruning must disturb the outputs less than random pruning
(this fails if the scores or the slicing are wrong), and (4) load, serve, quantize and fine-tune
like any run, since that is what it is for.
"""
import gzip
import json
import threading
import urllib.request

import jax
import numpy as np
import portpicker
import pytest

from configs import sentiment_finetune
from helpers import numpy_params, tiny_model_cfg
from infer import loading, prune, ptq, serve
from model.transformer import Transformer
from train import run as run_lib

pytestmark = [pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning"),
              pytest.mark.usefixtures("one_device")]   # in-process runs on 1 of the 8 fake devices


def _forward(cfg, params, tokens):
  model = Transformer(cfg)
  return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))


@pytest.fixture(scope="module")
def model_and_tokens():
  cfg = tiny_model_cfg(num_classes=2, num_heads=8, num_kv_heads=4, mlp_dim=64)
  tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, (32, 16)).astype(np.int32)
  params = numpy_params(Transformer(cfg), tokens)
  return cfg, params, tokens


def _shapes(params):
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("num_heads, num_kv_heads, sparsity, want", [
    (8, 4, 0.5, (4, 2, 32)),     # GQA: whole KV groups go (2 query heads each)
    (8, 8, 0.25, (6, 6, 48)),    # MHA: groups of one
    (8, 1, 0.5, (4, 1, 32)),     # MQA: query heads go, the one KV head stays
    (4, 2, 0.9, (2, 1, 6)),      # at least one unit stays
])
def test_pruned_model_is_smaller_with_the_expected_shapes(num_heads, num_kv_heads, sparsity,
                                                          want):
  cfg = tiny_model_cfg(num_classes=2, num_heads=num_heads, num_kv_heads=num_kv_heads, mlp_dim=64)
  tokens = np.zeros((2, 8), np.int32)
  params = numpy_params(Transformer(cfg), tokens)
  new_cfg, new_params, plan = prune.prune(cfg, params, sparsity)
  assert (new_cfg.num_heads, new_cfg.num_kv_heads, new_cfg.mlp_dim) == want
  assert new_cfg.num_heads % new_cfg.num_kv_heads == 0
  # The pruned tree has exactly the shapes a fresh model of the new config has.
  fresh = numpy_params(Transformer(new_cfg), tokens)
  assert _shapes(new_params) == _shapes(fresh)
  assert prune.param_count(new_params) < prune.param_count(params)
  attn = new_params["block_0"]["attn"]
  assert attn["query"]["kernel"].shape == (cfg.d_model, want[0], cfg.head_dim)
  assert attn["key"]["kernel"].shape == (cfg.d_model, want[1], cfg.head_dim)
  assert attn["out"]["kernel"].shape == (want[0], cfg.head_dim, cfg.d_model)
  assert new_params["block_1"]["mlp"]["wo"]["kernel"].shape == (want[2], cfg.d_model)
  assert _forward(new_cfg, new_params, tokens).shape == (2, 2)


def test_sparsity_zero_is_bit_identical(model_and_tokens):
  cfg, params, tokens = model_and_tokens
  for criterion in ("magnitude", "random"):
    new_cfg, new_params, _ = prune.prune(cfg, params, 0.0, criterion=criterion)
    assert new_cfg == cfg
    np.testing.assert_array_equal(_forward(new_cfg, new_params, tokens),
                                  _forward(cfg, params, tokens))


def test_kept_units_are_the_original_slices(model_and_tokens):
  cfg, params, _ = model_and_tokens
  new_cfg, new_params, plan = prune.prune(cfg, params, 0.5, criterion="random", seed=3)
  group = cfg.num_heads // cfg.num_kv_heads
  for i in range(cfg.num_layers):
    old, new = params[f"block_{i}"], new_params[f"block_{i}"]
    for j, unit in enumerate(plan.heads[i]):
      np.testing.assert_array_equal(new["attn"]["key"]["kernel"][:, j],
                                    old["attn"]["key"]["kernel"][:, unit])
      np.testing.assert_array_equal(new["attn"]["out"]["kernel"][j * group:(j + 1) * group],
                                    old["attn"]["out"]["kernel"][unit * group:(unit + 1) * group])
    np.testing.assert_array_equal(new["mlp"]["wg"]["kernel"],
                                  old["mlp"]["wg"]["kernel"][:, list(plan.mlp[i])])


def _with_weak_units(cfg, params, rng):
  """params where half of every layer's KV groups and MLP channels barely reach the residual
  stream (output slices scaled by 0.02): the units a good criterion removes first."""
  params = jax.tree.map(np.array, params)
  weak = {}
  for i in range(cfg.num_layers):
    block = params[f"block_{i}"]
    groups = rng.choice(cfg.num_kv_heads, cfg.num_kv_heads // 2, replace=False)
    group = cfg.num_heads // cfg.num_kv_heads
    for g in groups:
      block["attn"]["out"]["kernel"][g * group:(g + 1) * group] *= 0.02
    channels = rng.choice(cfg.mlp_dim, cfg.mlp_dim // 2, replace=False)
    block["mlp"]["wo"]["kernel"][channels] *= 0.02
    weak[i] = (set(groups.tolist()), set(channels.tolist()))
  return params, weak


def test_pruning_the_least_important_units_changes_outputs_less_than_random(model_and_tokens):
  cfg, params, tokens = model_and_tokens
  params, weak = _with_weak_units(cfg, params, np.random.default_rng(0))
  reference = _forward(cfg, params, tokens)
  change = lambda out: float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
  new_cfg, new_params, plan = prune.prune(cfg, params, 0.5, criterion="magnitude")
  for i, (groups, channels) in weak.items():   # exactly the weak units went
    assert not set(plan.heads[i]) & groups and not set(plan.mlp[i]) & channels
  by_importance = change(_forward(new_cfg, new_params, tokens))
  by_chance = [change(_forward(*prune.prune(cfg, params, 0.5, criterion="random", seed=s)[:2],
                               tokens)) for s in range(4)]
  assert by_importance < 0.2 * min(by_chance), (by_importance, by_chance)


# --- a real run: prune -> load, serve, quantize, fine-tune ---------------------------------------

_POS, _NEG = "great wonderful superb loved".split(), "awful boring dreadful hated".split()
_FILLER = "the film story actor scene plot music camera ending".split()


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory):
  """train.jsonl.gz: 160 generated reviews whose label a word decides."""
  root = tmp_path_factory.mktemp("prune_reviews")
  rng = np.random.default_rng(0)
  for name, n in (("train.jsonl.gz", 160), ("test.jsonl", 24)):
    with (gzip.open if name.endswith(".gz") else open)(root / name, "wt", encoding="utf-8") as f:
      for i in range(n):
        words = list(rng.choice(_FILLER, 8)) + [rng.choice(_POS if i % 2 else _NEG)]
        rng.shuffle(words)
        f.write(json.dumps({"id": f"{name}{i}", "text": " ".join(words), "label": i % 2}) + "\n")
  return root


def _sentiment_config(files, data_dir):
  config = sentiment_finetune.get_config("tiny")
  config.data.update(train_file=str(files / "train.jsonl.gz"), test_file="",
                     data_dir=str(data_dir))
  config.eval.evaluators = ()
  return config


@pytest.fixture(scope="module")
def classifier_dir(sentiment_files, tmp_path_factory):
  root = tmp_path_factory.mktemp("prune_classifier")
  config = _sentiment_config(sentiment_files, root / "cache")
  config.model.update(num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
  config.train.update(num_steps=4, eval_every=4, checkpoint_every=4, log_every=2)
  run_lib.train(config, str(root / "run"))
  return str(root / "run")


@pytest.fixture(scope="module")
def pruned_dir(classifier_dir, sentiment_files, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pruned") / "p50")
  summary = prune.prune_run(classifier_dir, out, 0.5, criterion="taylor",
                            calibration_file=str(sentiment_files / "train.jsonl.gz"),
                            calibration_examples=64)
  assert summary["num_heads"] == (4, 2) and summary["mlp_dim"] == (64, 32)
  assert summary["params_after"] < summary["params_before"]
  return out


@pytest.mark.slow
def test_pruned_run_loads_and_serves_like_any_run(classifier_dir, pruned_dir, tmp_path):
  source = loading.LoadedModel.from_workdir(classifier_dir)
  loaded = loading.LoadedModel.from_workdir(pruned_dir)
  assert loaded.kind == "classify" and loaded.tokenizer.path == source.tokenizer.path
  cfg = loaded.model.cfg
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim) == (2, 1, 32)
  run = loading.open_run(pruned_dir)
  assert run.meta["pruned"]["criterion"] == "taylor" and run.meta["params"] == \
      prune.param_count(loaded.params)
  texts = ["great wonderful film", "awful boring script"]
  probs = loaded.classify(texts)
  assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
  server = serve.make_server(loaded, "127.0.0.1", portpicker.pick_unused_port(), max_batch=2)
  thread = threading.Thread(target=server.serve_forever)
  thread.start()
  try:
    request = urllib.request.Request(f"{server.url}/classify", data=json.dumps(
        {"text": texts[0]}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
      answer = json.load(response)
  finally:
    server.shutdown()
    server.server_close()
    thread.join()
  np.testing.assert_allclose(answer["probs"], probs[0], rtol=1e-5, atol=1e-6)
  # The pruned run quantizes like any run.
  qmodel, qparams = ptq.quantize(loaded.model, loaded.params, "w8a8",
                                      loaded.encode_for_classify(texts)["tokens"])
  assert qmodel.cfg.num_heads == 2


@pytest.mark.slow
def test_pruned_run_fine_tunes_through_init_from(pruned_dir, sentiment_files, tmp_path):
  config = _sentiment_config(sentiment_files, tmp_path / "cache")
  config.train.update(num_steps=2, eval_every=2, checkpoint_every=2, log_every=1,
                      init_from=pruned_dir)
  run_lib.train(config, str(tmp_path / "ft"))
  tuned = loading.open_run(str(tmp_path / "ft"))
  model = tuned.meta["config"]["model"]
  assert (model["num_layers"], model["num_heads"], model["num_kv_heads"], model["mlp_dim"]) == \
      (1, 2, 1, 32)


@pytest.mark.slow
def test_inference_report_has_pruned_and_pruned_int8_rows(classifier_dir, pruned_dir,
                                                          sentiment_files, tmp_path):
  from bench import inference_report
  from configs import inference_report as report_config
  cfg = report_config.get_config("tiny")
  cfg.update(teacher=classifier_dir, pruned=(pruned_dir,), out_dir=str(tmp_path),
             test_file=str(sentiment_files / "test.jsonl"))
  rows = {r["variant"]: r for r in inference_report.run(cfg)["classification"]}
  assert list(rows) == ["teacher f32", "pruned 50% taylor f32", "pruned 50% taylor w8a8"]
  assert rows["pruned 50% taylor f32"]["params"] < rows["teacher f32"]["params"]
  assert rows["pruned 50% taylor w8a8"]["memory MiB"] < rows["pruned 50% taylor f32"]["memory MiB"]
  for r in rows.values():
    assert 0 <= r["accuracy"] <= 1 and 0 < r["p50 ms (b=1)"] <= r["p99 ms (b=1)"]


@pytest.mark.slow
def test_errors_are_clear(classifier_dir, pruned_dir, tmp_path):
  with pytest.raises(loading.LoadError, match="exists"):
    prune.prune_run(classifier_dir, pruned_dir, 0.5)
  with pytest.raises(ValueError, match="sparsity"):
    prune.prune_run(classifier_dir, str(tmp_path / "x"), 1.0)
