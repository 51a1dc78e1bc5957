"""Orbax checkpoints: train state, per-process data-iterator state and run metadata.

One CheckpointManager under <workdir>/checkpoints. Saves are asynchronous (the step loop goes on
while arrays are written) and atomic (Orbax writes to a temporary directory and renames it), so a
run killed mid-save still restores the previous step. Restoring takes target shardings, so a
checkpoint written on one mesh loads onto another.

This module imports nothing above model/: eval/ and infer/ use it to restore.
"""
import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves each process's input-iterator state (any object with JSON get_state/set_state).

  Every process writes its own file, because each reads a different shard of the data.
  """

  def _file(self, directory):
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory, args):
    self._file(directory).write_text(json.dumps(args.iterator.get_state()))

  def restore(self, directory, args):
    path = self._file(directory)
    if not path.exists():
      raise FileNotFoundError(
          f"{path} is missing: the checkpoint was written by a different number of processes "
          f"({jax.process_count()} now); the data position cannot be resumed exactly")
    args.iterator.set_state(json.loads(path.read_text()))
    return args.iterator

  def metadata(self, directory):
    del directory
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class Checkpointer:

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(workdir, "checkpoints")
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1), create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self):
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    # Every `every` steps, plus when Orbax sees a multi-host preemption notice.
    return step % self.every == 0 or self.manager.reached_preemption(step)

  def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data"] = DataIteratorSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); data_iter in place."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data"] = DataIteratorRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored.state, restored.meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
