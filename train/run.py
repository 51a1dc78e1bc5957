"""Wires a training run together: workdir, data, model, mesh, state (fresh or resumed), loop."""
import itertools
import json
import os

import jax
from absl import logging
from jax.experimental import multihost_utils

from model import sharding as sharding_lib
from model.config import ModelConfig
from model.transformer import Transformer
from train import checkpoint as checkpoint_lib
from train import loop as loop_lib
from train import metrics as metrics_lib
from train import optim, tasks
from train import state as state_lib
from train.config_check import ConfigError
from train.data import pipeline
from train.data import tokenizer as tokenizer_lib


def prepare_workdir(workdir: str, config) -> None:
  """Creates the run directory and records the config beside it; fails early if unwritable."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror}") from None
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_data(config, resumed_meta):
  """(tokenizer, dataset). Process 0 builds what is missing; the others wait, then read."""
  if jax.process_index() == 0:
    tokenizer, dataset = pipeline.prepare(config.data)
  multihost_utils.sync_global_devices("data prepared")
  if jax.process_index() != 0:
    tokenizer, dataset = pipeline.prepare(config.data)
  if resumed_meta:
    saved = resumed_meta.get("tokenizer_path")
    if saved and os.path.exists(saved):
      tokenizer = tokenizer_lib.load_tokenizer(saved)
    if resumed_meta.get("vocab_size") != tokenizer.vocab_size:
      raise ConfigError(
          f"the checkpoint was trained with vocab_size={resumed_meta.get('vocab_size')} "
          f"(tokenizer {saved}) but the tokenizer now has {tokenizer.vocab_size}; use the "
          "original config.data or a new --workdir")
  return tokenizer, dataset


def train(config, workdir: str) -> dict:
  prepare_workdir(workdir, config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, every=config.train.checkpoint_every,
                                             keep=config.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  resumed_meta = checkpointer.restore_meta(latest) if latest is not None else None
  tokenizer, dataset = load_data(config, resumed_meta)

  # The embedding is sized by config (shardable, stable across corpora); a tokenizer trained on
  # a small corpus may have fewer pieces, never more.
  if tokenizer.vocab_size > config.data.vocab_size:
    raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than "
                      f"config.data.vocab_size={config.data.vocab_size}")
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  model = Transformer(model_cfg)
  task = tasks.get_task(config.task)(model, config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding_lib.make_mesh(config.mesh)
  pi, pc = jax.process_index(), jax.process_count()
  train_iter = pipeline.make_lm_iterator(config.data, tokenizer, "train", process_index=pi,
                                         process_count=pc, shuffle=True, repeat=True,
                                         seed=config.seed, dataset=dataset)

  def make_eval_iter():
    # Repeating, unshuffled: every process yields exactly eval_batches batches, the same ones
    # at every evaluation.
    it = pipeline.make_lm_iterator(config.data, tokenizer, "validation", process_index=pi,
                                   process_count=pc, shuffle=False, repeat=True, seed=0,
                                   dataset=dataset)
    return itertools.islice(it, config.train.eval_batches)

  dummy = task.dummy_batch(1, config.data.seq_len)
  if latest is not None:
    abstract, shardings = state_lib.state_shardings(model, tx, dummy, mesh)
    state, _ = checkpointer.restore(
        latest, state_lib.abstract_with_shardings(abstract, shardings), train_iter)
    logging.info("resumed from step %d in %s", latest, workdir)
  else:
    state, abstract, shardings = state_lib.create_state(model, tx, dummy, mesh, config.seed)

  n_params = state_lib.param_count(abstract.params)
  peak, peak_source = metrics_lib.peak_flops_per_device(config.train.peak_flops)
  logging.info("model: %.2fM params; mesh %s on %d devices (%d processes); peak %.3g FLOP/s "
               "per device from %s", n_params / 1e6, dict(mesh.shape), jax.device_count(), pc,
               peak, peak_source)
  meta = {"config": json.loads(config.to_json_best_effort()), "tokenizer_path": tokenizer.path,
          "vocab_size": tokenizer.vocab_size, "dataset": dataset.dir, "params": n_params}
  writer = metrics_lib.MetricWriter(workdir, enabled=pi == 0)
  try:
    result = loop_lib.run(loop_lib.LoopParts(
        config=config, mesh=mesh, task=task, tx=tx, schedule=schedule, state=state,
        state_shardings=shardings, train_iter=train_iter, make_eval_iter=make_eval_iter,
        checkpointer=checkpointer, writer=writer, meta=meta,
        flops_per_token=metrics_lib.train_flops_per_token(model_cfg, config.data.seq_len),
        peak_flops_total=peak * jax.device_count()))
  finally:
    writer.close()
    checkpointer.close()
  if pi == 0:
    from eval import plot_run
    logging.info("loss curve: %s", plot_run.plot(workdir))
  return result
