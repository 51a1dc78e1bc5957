"""Wires a training run together: workdir, data, model, mesh, state (fresh or resumed), loop."""
import itertools
import json
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from model import sharding as sharding_lib
from model.config import ModelConfig
from model.transformer import Transformer
from model import checkpoint as checkpoint_lib
from train import final_eval, finetune
from train import loop as loop_lib
from train import metrics as metrics_lib
from train import optim, tasks
from train import state as state_lib
from train.config_check import ConfigError
from train.data import examples as examples_lib
from train.data import pipeline
from model import tokenizer as tokenizer_lib


def prepare_workdir(workdir: str, config) -> None:
  """Creates the run directory; fails early if it is not writable or has no room for the
  checkpoints."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror}") from None
  # Room for keep_checkpoints checkpoints plus the one being written, at 12 bytes per parameter
  # (f32 params and two Adam moments; train_flops_per_token at seq_len 0 is 6 x the matmul
  # parameters, nearly all of them) and 64 MiB of logs, less what this run's checkpoints hold.
  params = metrics_lib.train_flops_per_token(
      ModelConfig.from_config(config.model, config.data.vocab_size), 0) / 6
  held = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in
             os.walk(os.path.join(workdir, "checkpoints")) for name in names)
  copies = config.train.keep_checkpoints + 1
  needed = int(copies * 12 * params + (64 << 20) - held)
  disk = os.statvfs(workdir)
  free = disk.f_bavail * disk.f_frsize
  if free < needed:
    raise ConfigError(
        f"--workdir={workdir} has {free:,} bytes free but the run needs about {needed:,} "
        f"({copies} checkpoints of {12 * params / 2**30:.2f} GiB and logs); free space, lower "
        "config.train.keep_checkpoints or use another --workdir")


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


def _pretrain_inputs(config, resumed_meta, pi: int, pc: int):
  """(tokenizer, train iterator, eval-iterator factory, data description) from the corpus."""
  tokenizer, dataset = load_data(config, resumed_meta)
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
  return tokenizer, train_iter, make_eval_iter, dataset.dir


def _finetune_inputs(config, tokenizer, rows, pi: int, pc: int):
  """Train iterator and eval-iterator factory over JSONL examples (see train/finetune.py)."""
  ident = {"data": examples_lib.fingerprint(config.data), "tokenizer": tokenizer.fingerprint,
           "max_examples": config.data.max_examples}
  train_iter = examples_lib.make_iterator(
      rows["train"], config.data, split="train", shuffle=True, repeat=True, seed=config.seed,
      process_index=pi, process_count=pc, identity=ident)
  # The whole validation split every time; processes with fewer rows pad with empty batches so
  # every process runs the same number of eval steps.
  num_batches = -(-len(rows["validation"]) // config.data.batch_size)
  blank = examples_lib.pad_batch(rows["validation"][:1], config.data.batch_size // pc)
  blank = {k: np.zeros_like(v) for k, v in blank.items()}

  def make_eval_iter():
    it = examples_lib.make_iterator(rows["validation"], config.data, split="validation",
                                    shuffle=False, repeat=False, seed=0, process_index=pi,
                                    process_count=pc, identity=ident)
    return itertools.islice(itertools.chain(it, itertools.repeat(blank)), num_batches)
  return train_iter, make_eval_iter


def build_task(config, model, teacher):
  """The task object; distillation wraps the student's own task around a frozen teacher."""
  if config.task != "distill":
    return tasks.get_task(config.task)(model, config)
  from train.tasks import distill
  return distill.DistillTask(model, config, tasks.get_task(config.distill.task),
                             teacher.model_config())


def train(config, workdir: str) -> dict:
  prepare_workdir(workdir, config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, every=config.train.checkpoint_every,
                                             keep=config.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  resumed_meta = checkpointer.restore_meta(latest) if latest is not None else None
  pi, pc = jax.process_index(), jax.process_count()
  distilling = config.task == "distill"
  base_task = config.distill.task if distilling else config.task
  finetuning = base_task in ("classify", "summarize")
  teacher = finetune.open_teacher(config) if distilling else None
  pretrained = finetune.open_pretrained(config) if finetuning else None
  if finetuning:
    tokenizer, splits, rows = finetune.load_data(config, base_task, pretrained or teacher,
                                                 resumed_meta)
    train_iter, make_eval_iter = _finetune_inputs(config, tokenizer, rows, pi, pc)
    data_source = config.data.train_file
    if config.train.num_epochs > 0:
      epoch = -(-len(rows["train"]) // config.data.batch_size)
      config.train.num_steps = max(1, round(config.train.num_epochs * epoch))
      config.train.eval_every = epoch
      logging.info("%g epochs of %d steps: num_steps=%d, validation every epoch",
                   config.train.num_epochs, epoch, config.train.num_steps)
  else:
    tokenizer, train_iter, make_eval_iter, data_source = _pretrain_inputs(
        config, resumed_meta or (teacher.meta if teacher else None), pi, pc)

  # The embedding is sized by config (shardable, stable across corpora); a tokenizer trained on
  # a small corpus may have fewer pieces, never more.
  if tokenizer.vocab_size > config.data.vocab_size:
    raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than "
                      f"config.data.vocab_size={config.data.vocab_size}")
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  model = Transformer(model_cfg)
  task = build_task(config, model, teacher)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps,
                                     frozen=("teacher",) if distilling else ())
  mesh = sharding_lib.make_mesh(config.mesh)

  dummy = task.dummy_batch(1, config.data.seq_len)
  if latest is not None:
    abstract, shardings = state_lib.state_shardings(task.model, tx, dummy, mesh)
    state, _ = checkpointer.restore(
        latest, state_lib.abstract_with_shardings(abstract, shardings), train_iter)
    logging.info("resumed from step %d in %s", int(jax.device_get(state.step)), workdir)
  else:
    state, abstract, shardings = state_lib.create_state(task.model, tx, dummy, mesh, config.seed)
    if pretrained is not None:
      state = finetune.load_backbone(pretrained, state, mesh)
    if teacher is not None:
      state = state.replace(params={**state.params, "teacher": finetune.restore_model_params(
          teacher, task.teacher, mesh)})
      if config.distill.init_student == "teacher_layers":
        state = finetune.init_student_from_teacher(state, config.model.num_layers,
                                                   teacher.model_config().num_layers)
  # What is evaluated and served: the student alone when distilling.
  eval_task, eval_params = (task.base, task.student_params) if distilling else (
      task, lambda p: p)
  best_checkpointer, best, eval_hooks = None, None, {}
  if finetuning:
    if pc == 1:   # the evaluators predict on whole splits from one process
      eval_hooks = final_eval.validation_hooks(
          config, task=eval_task, model=model, tokenizer=tokenizer, splits=splits, rows=rows,
          mesh=mesh, select_params=eval_params)
    best_checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"), every=1,
                                                    keep=1)
    if best_checkpointer.latest_step() is not None:
      best = best_checkpointer.restore_meta(best_checkpointer.latest_step()).get("best")

  n_params = state_lib.param_count(eval_params(abstract.params))
  peak, peak_source = metrics_lib.peak_flops_per_device(config.train.peak_flops)
  logging.info("model: %.2fM params; mesh %s on %d devices (%d processes); peak %.3g FLOP/s "
               "per device from %s", n_params / 1e6, dict(mesh.shape), jax.device_count(), pc,
               peak, peak_source)
  meta = {"config": json.loads(config.to_json_best_effort()), "tokenizer_path": tokenizer.path,
          "vocab_size": tokenizer.vocab_size, "dataset": data_source, "params": n_params}
  if pi == 0:   # only now: a run that fails to start leaves an existing record untouched
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = metrics_lib.MetricWriter(workdir, enabled=pi == 0)
  t0 = time.perf_counter()
  try:
    result = loop_lib.run(loop_lib.LoopParts(
        config=config, mesh=mesh, task=task, tx=tx, schedule=schedule, state=state,
        state_shardings=shardings, train_iter=train_iter, make_eval_iter=make_eval_iter,
        checkpointer=checkpointer, writer=writer, meta=meta,
        flops_per_token=metrics_lib.train_flops_per_token(model_cfg, config.data.seq_len),
        peak_flops_total=peak * jax.device_count(), best_checkpointer=best_checkpointer,
        best=best, eval_hooks=eval_hooks))
    finished = not result["preempted"] and (result["stopped_early"] or
                                            result["step"] >= config.train.num_steps)
    if finetuning and finished:
      if pc > 1:
        logging.warning("the test evaluation runs single-process: rerun this command with one "
                        "process to write report.md")
      else:
        params = result["state"].params
        if result["best"]:
          restored, _ = best_checkpointer.restore(
              result["best"]["step"], state_lib.abstract_with_shardings(abstract, shardings))
          params = restored.params
          logging.info("test evaluation with the best validation state (step %d)",
                       result["best"]["step"])
        result["test"] = final_eval.run(
            config, workdir, task=eval_task, model=model, params=eval_params(params),
            tokenizer=tokenizer,
            splits=splits, rows=rows, mesh=mesh, writer=writer, step=result["step"],
            facts={"parameters": n_params, "init_from": config.train.init_from or "scratch",
                   "best validation": result["best"], "final step": result["step"],
                   "train examples": len(rows["train"]),
                   "session seconds (train + eval)": round(time.perf_counter() - t0, 1)})
  finally:
    writer.close()
    checkpointer.close()
    if best_checkpointer is not None:
      best_checkpointer.close()
  if pi == 0:
    from eval import plot_run
    logging.info("loss curve: %s", plot_run.plot(workdir))
  return result
