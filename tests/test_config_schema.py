"""The model's keys are declared once (configs/model_schema.py) and everything reads that
declaration; a recorded run's config is brought up to date in one place when it is opened."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import common, model_schema
from infer import loading
from model import attention
from model import checkpoint as checkpoint_lib
from model.config import ModelConfig
from model.transformer import Transformer
from train import build, config_check


def _keys(section, prefix=""):
  """Dotted names of every leaf of a nested dict."""
  for key, value in section.items():
    if isinstance(value, dict):
      yield from _keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _declared():
  return ([k.name for k in model_schema.MODEL_KEYS]
          + [f"attention.{k.name}" for k in model_schema.ATTENTION_KEYS])


def test_base_config_model_is_exactly_the_declared_schema():
  model = common.base_config().model.to_dict()
  assert sorted(_keys(model)) == sorted(_declared())
  assert len(set(_declared())) == len(_declared())
  for key in model_schema.MODEL_KEYS:
    assert model[key.name] == key.default and type(model[key.name]) is type(key.default)
  assert {k.name: k.default for k in model_schema.ATTENTION_KEYS} == model["attention"]
  assert common.base_config().schema_version == common.SCHEMA_VERSION


def test_model_config_fields_are_the_schema():
  cfg = ModelConfig.from_config(common.base_config().model, 300)
  assert cfg.vocab_size == 300 and cfg.attention_kind == "full" and cfg.norm == "rmsnorm"
  for key in model_schema.MODEL_KEYS:
    assert getattr(cfg, key.name) == key.default
  for key in model_schema.ATTENTION_KEYS:
    assert getattr(cfg, f"attention_{key.name}") == key.default


def test_attention_kinds_are_the_kernel_registry():
  kind = next(k for k in model_schema.ATTENTION_KEYS if k.name == "kind")
  assert sorted(kind.choices) == sorted(attention.KERNELS)


def _choice_cases():
  for key in model_schema.MODEL_KEYS:
    if key.choices:
      yield key.name, key.choices
  for key in model_schema.ATTENTION_KEYS:
    if key.choices:
      yield f"attention.{key.name}", key.choices


@pytest.mark.parametrize("key, choices", list(_choice_cases()))
def test_every_declared_choice_is_validated(key, choices):
  config = common.base_config()
  *section, name = ["model"] + key.split(".")
  node = config
  for part in section:
    node = node[part]
  for good in choices:   # every allowed value passes (norm_* switches stay off)
    node[name] = good
    ModelConfig.from_config(config.model, 256)
  node[name] = "no_such_value"
  expected = f"config.model.{key}='no_such_value'; expected one of {choices}"
  with pytest.raises(ValueError) as raised:
    ModelConfig.from_config(config.model, 256)
  assert str(raised.value) == expected
  with pytest.raises(config_check.ConfigError) as raised:
    config_check.validate(config, num_devices=1, process_count=1)
  assert str(raised.value) == expected


@pytest.mark.parametrize("key", [k.name for k in model_schema.MODEL_KEYS if k.minimum is not None]
                         + [f"attention.{k.name}" for k in model_schema.ATTENTION_KEYS
                            if k.minimum is not None])
def test_declared_minimums_are_validated(key):
  config = common.base_config()
  node = config.model.attention if key.startswith("attention.") else config.model
  declared = next(k for k in model_schema.MODEL_KEYS + model_schema.ATTENTION_KEYS
                  if k.name == key.split(".")[-1])
  node[key.split(".")[-1]] = declared.minimum - 1
  with pytest.raises(ValueError, match=rf"config\.model\.{key}=-?\d+ must be >= "
                                       rf"{declared.minimum}"):
    ModelConfig.from_config(config.model, 256)


def test_architecture_keys_are_the_model_keys_a_fine_tune_cannot_choose():
  own = {"dtype", "remat", "scan_layers", "dropout_rate", "num_classes", "pooling"}
  assert set(build.ARCHITECTURE_KEYS) == {k.name for k in model_schema.MODEL_KEYS} - own
  assert "attention" not in build.ARCHITECTURE_KEYS   # adopted by kind (a sliding window)


# Keys added after the first recorded runs: an old run's config lacks them.
_NEWER = ("model.norm", "model.norm_eps", "model.qkv_bias", "model.rope_scaling",
          "model.tied_head_rescale", "model.causal", "model.pooler", "model.scan_layers",
          "model.attention.num_global", "eval.decode", "eval.window_stride", "train.select_by",
          "train.lora", "optim.loss_chunk", "distill.offline_weight",
          "schema_version")


def _old_recorded_config() -> dict:
  config = common.base_config()
  config.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, positions="learned", max_len=64)
  config.data.vocab_size = 256
  recorded = config.to_dict()
  for key in _NEWER:
    *sections, name = key.split(".")
    node = recorded
    for section in sections:
      node = node[section]
    del node[name]
  return recorded


def _check_up_to_date(config: dict):
  assert config["schema_version"] == common.SCHEMA_VERSION
  m = config["model"]   # recorded values kept ...
  assert (m["num_layers"], m["d_model"], m["positions"], m["max_len"]) == (1, 32, "learned", 64)
  # ... the keys the run lacked at today's defaults
  assert (m["norm"], m["norm_eps"], m["qkv_bias"], m["rope_scaling"], m["tied_head_rescale"],
          m["causal"], m["pooler"], m["scan_layers"]) == (
              "rmsnorm", 1e-6, False, "none", True, True, "none", False)
  assert m["attention"] == {"kind": "full", "implementation": "auto", "block_size": 128,
                            "window": 512, "num_global": 0}
  assert config["eval"]["decode"]["samples"] == 0 and config["eval"]["decode"]["beam"] == 0
  assert config["eval"]["window_stride"] == 0
  assert config["train"]["select_by"] == "loss" and config["train"]["lora"]["rank"] == 0
  assert config["optim"]["loss_chunk"] == -1 and config["distill"]["offline_weight"] == 0.5


def test_upgrade_fills_newer_keys_with_todays_defaults():
  recorded = _old_recorded_config()
  upgraded = common.upgrade(recorded)
  _check_up_to_date(upgraded)
  assert "norm" not in recorded["model"]          # the recorded dict is left as it was
  assert sorted(_keys(upgraded)) == sorted(_keys(common.base_config().to_dict()))
  with pytest.raises(ValueError, match="config.schema_version=99: .* newer version"):
    common.upgrade({**recorded, "schema_version": 99})


def test_upgrade_drops_the_keys_that_left_the_schema():
  recorded = _old_recorded_config()
  recorded["data"]["train_window_stride"] = 0
  recorded["train"]["profile"] = False
  recorded["distill"]["offline_folds"] = 5
  upgraded = common.upgrade(recorded)
  assert sorted(_keys(upgraded)) == sorted(_keys(common.base_config().to_dict()))
  assert recorded["train"]["profile"] is False    # the recorded dict is left as it was


def test_upgrade_brings_a_distillation_teachers_model_up_to_date():
  recorded = _old_recorded_config()
  recorded["distill"]["teacher_model"] = dict(_old_recorded_config()["model"], num_layers=2)
  teacher = common.upgrade(recorded)["distill"]["teacher_model"]
  assert (teacher["num_layers"], teacher["norm"], teacher["attention"]["num_global"]) == (
      2, "rmsnorm", 0)


def _save_run(workdir, recorded: dict, model_cfg: ModelConfig):
  """A one-step run at `workdir` whose checkpoint records `recorded` as its config."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(Transformer(model_cfg).init(jax.random.PRNGKey(0), tokens)["params"])
  ckpt = checkpoint_lib.Checkpointer(str(workdir), every=1, keep=1, async_save=False)
  try:
    ckpt.save(0, {"params": params}, None, {"config": recorded, "params": 1}, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return params


def test_an_old_run_opens_with_todays_defaults(tmp_path):
  """A checkpoint whose recorded config predates newer keys: open_run upgrades it, and the
  model builds and restores from it."""
  recorded = _old_recorded_config()
  upgraded = ml_collections.ConfigDict(common.upgrade(recorded)["model"])
  model_cfg = ModelConfig.from_config(upgraded, 256)
  params = _save_run(tmp_path, recorded, model_cfg)
  run = loading.open_run(str(tmp_path))
  _check_up_to_date(run.meta["config"])
  assert run.config.model.norm == "rmsnorm" and run.lora is None and run.kind == "pretrain"
  assert run.model_config() == model_cfg
  restored = loading.restore_params(run, Transformer(run.model_config()))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restored, params))


def test_a_run_from_a_newer_schema_is_a_load_error(tmp_path):
  recorded = dict(common.base_config().to_dict(), schema_version=common.SCHEMA_VERSION + 1)
  recorded["model"].update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                           mlp_dim=64)
  _save_run(tmp_path, recorded, ModelConfig.from_config(recorded["model"], 256))
  newer = common.SCHEMA_VERSION + 1
  with pytest.raises(loading.LoadError, match=rf"{tmp_path}: config.schema_version={newer}: "):
    loading.open_run(str(tmp_path))


def test_model_config_of_a_config_missing_keys_names_them():
  model = common.base_config().model.to_dict()
  del model["causal"], model["attention"]["window"]
  with pytest.raises(ValueError, match=r"config.model lacks causal, attention.window: .*"
                                       "open_run"):
    ModelConfig.from_config(ml_collections.ConfigDict(model), 256)
