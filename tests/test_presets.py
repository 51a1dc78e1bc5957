"""Every preset of every training config file passes the config checks `train.main` runs, and
the presets that pre-train for a downstream task never read that task's test split.

No data is read: the checks are the ones made before any file is opened (epoch-based presets
get one step, since their step count comes from the data).
"""
import importlib
import math

import pytest

from train import config_check

TRAINING_CONFIGS = ("legal_pretrain", "legal_summ_finetune", "sentiment_finetune",
                    "sentiment_distill", "legal_distill", "ablate_attention", "bench_step")


def _presets():
  for name in TRAINING_CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    for preset in module.PRESETS:
      yield name, preset


@pytest.mark.parametrize("name, preset", list(_presets()))
def test_preset_passes_the_config_checks(name, preset):
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  if "sweep" in config or "grid" in config:   # a sweep file: its base is the train config
    config = config.base
  if config.train.get("num_epochs"):
    config.train.num_steps = 1
  # As many devices as the preset's fixed mesh axes need (a context axis); -1 axes take one.
  devices = math.prod(max(int(s), 1) for s in config.mesh.values())
  config_check.validate(config, num_devices=devices, process_count=1)


@pytest.mark.parametrize("name, preset", [("legal_pretrain", "imdb_self"),
                                          ("legal_pretrain", "imdb_self_wide"),
                                          ("legal_pretrain", "imdb_self_wide512"),
                                          ("legal_pretrain", "in_abs_lm"),
                                          ("legal_pretrain", "imdb_lm")])
def test_pretraining_presets_read_no_test_split(name, preset):
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  sources = list(config.data.extra_dirs)
  assert sources and not any("test" in s.rsplit("/", 1)[-1] for s in sources), sources


def test_long_context_presets_fit_their_rows():
  from configs import legal_pretrain, legal_summ_finetune
  lm = legal_pretrain.get_config("in_abs_lm")
  summ = legal_summ_finetune.get_config("in_abs_4k")
  assert lm.data.seq_len == summ.data.seq_len == 4096
  assert lm.model.attention.kind == summ.model.attention.kind == "blocked"
  assert 4096 % lm.model.attention.block_size == 0
  assert summ.data.target_len == summ.eval.decode_len == 1024
  assert summ.data.truncation == "head_tail"


LONG_PRESETS = ("base_32k", "base_128k", "llama3_8b_32k", "llama3_8b_128k")


@pytest.mark.parametrize("preset", LONG_PRESETS)
def test_long_context_pretraining_presets(preset):
  """32k / 128k rows: blocked attention tiling the row, the sequence split over a context axis
  that fits the zig-zag layout, 2M tokens a step, IN-Abs train judgments and never test ones;
  they validate on the v5p-128 slice (64 chips) they are sized for."""
  from configs import legal_pretrain
  config = legal_pretrain.get_config(preset)
  assert config.data.seq_len == (32_768 if preset.endswith("32k") else 131_072)
  assert config.model.attention.kind == "blocked" and config.model.remat == "full"
  assert config.data.seq_len % config.model.attention.block_size == 0
  assert config.mesh.context > 1 and config.data.seq_len % (2 * config.mesh.context) == 0
  assert config.data.seq_len * config.data.batch_size == 2 ** 21
  assert config.data.batch_size // config.optim.grad_accum_steps == 64 // config.mesh.context
  assert any(s.endswith("in_abs_train.jsonl.gz") for s in config.data.extra_dirs)
  assert not any("test" in s.rsplit("/", 1)[-1] for s in config.data.extra_dirs)
  config_check.validate(config, num_devices=64, process_count=1)
