"""LoRA (train/lora.py through train/build.py; inference merges with infer/lora_weights.py): a
fine-tune changes only the adapters and the task head, the optimizer holds moments for those
only, merged equals unmerged, inference reads a LoRA run's tree without the LoRA model, exports
load like any run, and bad train.lora values are one ConfigError line."""
import os
import subprocess
import sys

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import legal_pretrain
from helpers import _sentiment_config, env
from infer import loading, lora_weights
from model.config import ModelConfig
from model.transformer import Transformer
from train import build
from train import lora
from train import run as run_lib
from train import state as state_lib
from train.config_check import ConfigError

pytestmark = pytest.mark.usefixtures("one_device")   # in-process runs on 1 of the 8 fake devices


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(sentiment_files, tmp_path_factory):
  """(root, LM config): a tiny LM pre-trained on the review texts, and a LoRA classifier
  fine-tuned from it for 6 steps (result kept)."""
  root = tmp_path_factory.mktemp("lora")
  lm = legal_pretrain.get_config("tiny")
  lm.data.update(use_licensedcode=False, extra_dirs=(str(sentiment_files),), vocab_size=512,
                 data_dir=str(root / "cache"), seq_len=32, batch_size=8, max_docs=-1)
  lm.model.update(num_layers=2, d_model=48, num_heads=2, num_kv_heads=2, head_dim=24,
                  mlp_dim=96)
  lm.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
  run_lib.train(lm, str(root / "lm"))
  config = lora_config(sentiment_files, root)
  result = run_lib.train(config, str(root / "lora"))
  return root, result


def lora_config(sentiment_files, root, **lora_keys):
  config = _sentiment_config(sentiment_files, root / "cache", num_steps=6, eval_every=3,
                             checkpoint_every=3)
  config.train.init_from = str(root / "lm")
  config.train.lora.update(rank=4, alpha=8.0, dropout=0.1, **lora_keys)
  config.optim.update(lr=1e-2, warmup_steps=0)
  return config


def _flat(params):
  return flax.traverse_util.flatten_dict(jax.device_get(params))


@pytest.mark.slow
def test_lora_finetune_changes_only_adapters_and_head(runs):
  root, result = runs
  lm = loading.open_run(str(root / "lm"))
  base = _flat(loading.restore_params(lm, Transformer(lm.model_config())))
  trained = _flat(result["state"].params)
  adapters = [k for k in trained if lora_weights.is_adapter(k)]
  # Adapters on q/k/v/o and wi/wg/wo of both blocks: 14 projections x (A, B).
  assert len(adapters) == 28
  for key, value in base.items():          # every base parameter: bit-identical
    np.testing.assert_array_equal(trained[key], value, err_msg="/".join(key))
  assert set(trained) - set(base) == set(adapters) | {("cls_head", "kernel")}
  # B starts at zero (a fresh adapter changes nothing); training moved it.
  for key in adapters:
    if key[-1].endswith("_lora_b"):
      assert np.abs(trained[key]).max() > 0, key


@pytest.mark.slow
def test_optimizer_state_holds_only_trained_params(runs, sentiment_files):
  root, _ = runs
  config, _ = build.resolve(lora_config(sentiment_files, root))
  parts = build.build(config)
  params = _flat(parts.abstract.params)
  trained = sum(int(np.prod(v.shape)) for k, v in params.items() if lora_weights.is_trained(k))
  total = sum(int(np.prod(v.shape)) for v in params.values())
  opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts.abstract.opt_state))
  assert trained < total / 5
  assert trained * 2 <= opt <= trained * 2 + 8      # Adam's mu and nu, plus counters
  # The full fine-tune of the same model allocates moments for everything.
  config_full = _sentiment_config(sentiment_files, root / "cache", num_steps=6)
  config_full.train.init_from = str(root / "lm")
  full = build.build(build.resolve(config_full)[0])
  opt_full = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full.abstract.opt_state))
  assert opt_full >= 2 * state_lib.param_count(full.abstract.params)


@pytest.mark.slow
def test_merged_equals_unmerged_and_loads_everywhere(runs, sentiment_files, tmp_path):
  root, result = runs
  config, _ = build.resolve(lora_config(sentiment_files, root))
  parts = build.build(config)
  # jax arrays: qwix finds a kernel among the module's params by identity or by tracing it,
  # which numpy arrays in an eager call defeat (the train step and LoadedModel run under jit).
  params = jax.tree.map(jnp.asarray, jax.device_get(result["state"].params))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 32), 1, 512)
  unmerged = parts.model.apply({"params": params}, tokens)
  spec = lora_weights.LoraSpec.from_config(config.train.lora)
  merged = lora_weights.merge(params, spec)
  plain = Transformer(parts.model_cfg)
  np.testing.assert_allclose(plain.apply({"params": merged}, tokens), unmerged, atol=1e-5,
                             rtol=0)
  # The LoRA run loads merged through the one inference API (best state: the same step here).
  loaded = loading.LoadedModel.from_workdir(str(root / "lora"), prefer_best=False)
  assert isinstance(loaded.model, Transformer) and not any(
      lora_weights.is_adapter(k) for k in _flat(loaded.params))
  chex.assert_trees_all_close(jax.device_get(loaded.params), merged, atol=1e-6)
  texts = ["great movie", "awful film"]
  np.testing.assert_allclose(loaded.classify(texts), jax.device_get(jax.nn.softmax(
      parts.model.apply({"params": params}, loaded.encode_for_classify(texts)["tokens"],
                        pool_mask=loaded.encode_for_classify(texts)["mask"] > 0))), atol=1e-5)
  # The export: a normal run (rank 0) that LoadedModel, quantize and init_from read.
  out = tmp_path / "merged"
  proc = subprocess.run([sys.executable, "-m", "infer.lora_merge", f"--workdir={root / 'lora'}",
                         f"--out={out}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  exported = loading.open_run(str(out))
  assert exported.lora is None and exported.kind == "classify"
  again = loading.LoadedModel.from_workdir(str(out))
  chex.assert_trees_all_equal(jax.device_get(again.params), jax.device_get(loaded.params))
  # The adapters alone: a small fraction of the run.
  small = tmp_path / "adapters"
  proc = subprocess.run([sys.executable, "-m", "infer.lora_merge", f"--workdir={root / 'lora'}",
                         f"--out={small}", "--adapters_only"], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  # Merging twice is refused with one line.
  proc = subprocess.run([sys.executable, "-m", "infer.lora_merge", f"--workdir={out}",
                         f"--out={tmp_path / 'again'}"], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "not a LoRA run" in proc.stderr
  assert not (tmp_path / "again").exists()


@pytest.mark.slow
@pytest.mark.parametrize("keys, message", [
    ({"rank": -1}, "config.train.lora.rank=-1 must be >= 1"),
    ({"rank": 1000}, "config.train.lora.rank=1000 exceeds"),
    ({"alpha": 0.0}, "config.train.lora.alpha=0.0 must be > 0"),
    ({"dropout": 1.0}, "config.train.lora.dropout=1.0 must be in [0, 1)"),
    ({"targets": "block_0/attn/qkv"}, "matches no projection; the model's are"),
    ({"targets": "block_(0"}, "is not a regex"),
])
def test_bad_lora_values_are_one_config_error(runs, sentiment_files, keys, message):
  root, _ = runs
  config = lora_config(sentiment_files, root)
  config.train.lora.update(**keys)
  with pytest.raises(ConfigError) as e:
    build.resolve(config)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_needs_a_pretrained_run(sentiment_files, tmp_path):
  config = _sentiment_config(sentiment_files, tmp_path / "cache", num_steps=2)
  config.train.lora.rank = 4
  with pytest.raises(ConfigError, match="needs config.train.init_from"):
    build.resolve(config)


@pytest.mark.slow
def test_only_targeted_projections_get_adapters(runs, sentiment_files):
  root, _ = runs
  config = lora_config(sentiment_files, root, targets=r"block_\d+/attn/(query|value)")
  config, _ = build.resolve(config)
  params = _flat(build.build(config).abstract.params)
  assert sorted("/".join(k) for k in params if lora_weights.is_adapter(k)) == sorted(
      f"block_{i}/attn/{m}/kernel_lora_{ab}" for i in (0, 1) for m in ("query", "value")
      for ab in "ab")


@pytest.mark.parametrize("targets", [lora_weights.DEFAULT_TARGETS, r"block_1/(attn/out|mlp/wo)"])
def test_inference_reads_the_lora_tree_without_the_lora_model(targets):
  """infer/ restores a LoRA run into the tree it derives from the plain Transformer: the same
  shapes, dtypes and logical axis names (hence shardings) as qwix's LoRA model, GQA included."""
  model_cfg = ModelConfig(vocab_size=512, num_layers=2, d_model=48, num_heads=2, num_kv_heads=1,
                          head_dim=24, mlp_dim=96, num_classes=2)
  spec = lora_weights.LoraSpec(4, 8.0, targets=targets)
  tokens = jnp.zeros((1, 8), jnp.int32)
  shape_of = lambda model: jax.eval_shape(lambda r: model.init(r, tokens),
                                          jax.random.PRNGKey(0))["params"]
  derived = lora_weights.with_adapters(shape_of(Transformer(model_cfg)), spec)
  built = shape_of(lora.lora_model(model_cfg, spec))
  describe = lambda tree: {k: (v.value.shape, v.value.dtype, v.names) for k, v in
                           flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, v: hasattr(
                               v, "names")).items()}
  assert describe(derived) == describe(built)


def test_lora_on_bf16_compute_is_refused_with_the_reason():
  from helpers import tiny_model_cfg
  spec = lora_weights.LoraSpec(rank=2, alpha=4.0, dropout=0.0, targets=r".*/query")
  assert lora.check(spec, tiny_model_cfg(vocab_size=97))   # float32: targets found
  with pytest.raises(lora.LoraConfigError, match="needs config.model.dtype='float32'"):
    lora.check(spec, tiny_model_cfg(vocab_size=97, dtype="bfloat16"))
