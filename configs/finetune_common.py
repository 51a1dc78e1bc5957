"""What the fine-tuning configs share: where the datasets live and fine-tuning defaults.

Dataset paths are configuration, never code: the local copies resolve under $LEGAL_LM_DATA
(default ../shared/data, beside the repository; README "Datasets: where they come from" says
where each comes from and the layout) and every one can be overridden with a local JSONL/CSV/TSV
file or a prepared TFDS dataset, e.g. `--config.data.train_file=my.csv` or
`--config.data.train_file=tfds:imdb_reviews:train` (train/data/sources.py).
"""
import os

import ml_collections

from configs import common


def data_path(relative: str) -> str:
  """`relative` under $LEGAL_LM_DATA (default ../shared/data): where the presets' local copies
  live."""
  return os.path.join(os.environ.get("LEGAL_LM_DATA", "../shared/data"), relative)


def finetune_config(task: str) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.task = task
  config.data.use_licensedcode = False       # examples come from data.train_file, not the corpus
  config.data.validation_fraction = 0.05
  config.data.vocab_size = 8192
  config.data.tokenizer_sentences = 300_000
  config.data.prefetch = 2
  # The 2.1M-parameter architecture of configs/legal_pretrain.py:imdb_lm; with
  # train.init_from set, the pre-trained run's architecture is used whatever these say.
  config.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
                      mlp_dim=512, dropout_rate=0.1, dtype="bfloat16")
  config.optim.update(schedule="linear", lr=1e-3, min_lr_ratio=0.0, weight_decay=0.01,
                      warmup_steps=50, z_loss=0.0)
  config.train.update(num_epochs=2.0, early_stopping=2, log_every=25, checkpoint_every=200,
                      keep_checkpoints=2)
  return config


def check_preset(name: str, arg: str, presets: dict) -> str:
  preset = arg or next(iter(presets))
  if preset not in presets:
    raise ValueError(f"configs/{name}: unknown preset {preset!r}; expected one of "
                     f"{sorted(presets)}")
  return preset
