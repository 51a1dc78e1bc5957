"""Orbax checkpoints: train state, per-process data-iterator state and run metadata.

The data-iterator state is saved by grain's own Orbax handler (grain.checkpoint: one JSON file
per process, each reading its own shard), so the iterator is a grain DatasetIterator.

One CheckpointManager under <workdir>/checkpoints. Saves are asynchronous (the step loop goes on
while arrays are written) and atomic (Orbax writes to a temporary directory and renames it), so a
run killed mid-save still restores the previous step. Restoring takes target shardings, so a
checkpoint written on one mesh loads onto another.

A damaged step must never be trained on silently. Each save records a checksum of every array
(computed on device, independent of the mesh), and restoring compares against it; a step that
cannot be read or does not match is skipped with a warning naming it and why, for the newest
older step that restores intact. The skipped step is set aside (renamed `<step>.unusable-<time>`,
never deleted) when the run saves that step again. A checkpoint written for a different model
(another vocabulary or width) is a CheckpointError naming the array, not a reason to fall back.

This module imports nothing above model/: eval/ and infer/ use it to restore.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from model import errors


class CheckpointError(errors.UserError):
  """No usable checkpoint, or one written for a different model; the message says which."""


def _leaf_name(path) -> str:
  """'params/embed/embedding' for a key path through dicts, dataclasses and tuples alike."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_checksum(x):
  """A position-weighted wrapping sum of the array's bits: exact, so the same values give the
  same number on any mesh; the weights are odd, so any single changed element changes it."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  weights = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * 2 + 1
  return jnp.sum(bits * weights * jnp.uint32(0x9E3779B1), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def host_checksum(x: np.ndarray, chunk: int = 1 << 20) -> int:
  """`_leaf_checksum` of a host array, computed with numpy `chunk` elements at a time: no
  device work and no array-sized temporaries (train/hf/convert.py checksums each parameter as it
  converts it, instead of the whole tree at once when saving)."""
  flat = np.ascontiguousarray(x).reshape(-1)
  if flat.dtype == np.bool_:
    flat = flat.astype(np.uint8)
  unsigned = {1: np.uint8, 2: np.uint16}.get(flat.dtype.itemsize, np.uint32)
  total = 0
  for start in range(0, flat.size, chunk):
    bits = flat[start:start + chunk].view(unsigned).astype(np.uint32)
    weights = np.arange(start, start + bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    total += int(np.sum(bits * weights * np.uint32(0x9E3779B1), dtype=np.uint32))
  return total & 0xFFFFFFFF


def state_checksums(state) -> dict[str, int]:
  """{leaf name: checksum} of a (sharded) pytree; a collective: every process calls it."""
  sums = jax.device_get(_checksums(state))
  return {_leaf_name(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _unreadable_because(error: Exception) -> str:
  first_line = (str(error).splitlines() or [""])[0]
  return f"unreadable: {type(error).__name__}: {first_line[:200]}"


def _iterator_file(directory):
  """This process's saved iterator state, named as grain.checkpoint.CheckpointHandler names it;
  FileNotFoundError if the process count changed (grain's own error does not say why)."""
  path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} is missing: the checkpoint was written by a different number of processes "
        f"({jax.process_count()} now); the data position cannot be resumed exactly")
  return path


def upgrade_meta(meta: dict) -> dict:
  """A checkpoint's metadata in today's layout (the run config inside is brought up to date by
  infer.loading.open_run): a best state recorded before train.select_by existed was chosen by
  validation loss."""
  if not meta.get("best"):
    return meta
  loss = meta["best"]["loss"]
  return {**meta, "best": {"select_by": "loss", "value": loss, "score": -loss, **meta["best"]}}


class Checkpointer:

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True,
               save_limit_bytes: int | None = None):
    """save_limit_bytes: write the state at most this many bytes at a time, uncompressed (at
    least the largest array). Orbax's default writes every array at once and keeps each one's
    compressed copy until written, a second copy of the state in host memory; the limit bounds
    that copy, for writers that must stay near the state's own size (train/hf/convert.py import).
    Readers need nothing special: the layout is the same."""
    self.directory = os.path.join(workdir, "checkpoints")
    self.every = every
    self._limited = save_limit_bytes is not None
    registry = None
    if self._limited:
      # Orbax takes GB and multiplies back: a margin keeps the largest array under the limit.
      handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=(save_limit_bytes + 4096) / 1e9,
                                            use_compression=False)
      registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
      registry.add("state", ocp.args.PyTreeSave, handler)
      registry.add("state", ocp.args.PyTreeRestore, handler)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1), create=True,
            enable_async_checkpointing=async_save),
        **({"handler_registry": registry} if registry is not None else {}))
    self._unusable: dict[int, str] = {}   # step -> why it was skipped

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _skip(self, step: int, reason: str):
    if step not in self._unusable:
      logging.warning("checkpoint step %d in %s is unusable (%s); falling back to an older "
                      "step", step, self.directory, reason)
      self._unusable[step] = reason

  def _unreadable(self, step: int) -> str | None:
    """Why the step's metadata cannot be read, or None: a cheap check before restoring."""
    try:
      self.restore_meta(step)
      ocp.StandardCheckpointHandler().metadata(self._step_dir(step) / "state")
    except Exception as e:   # a damaged file can fail in any library's way
      return _unreadable_because(e)
    return None

  def latest_step(self):
    """The newest step whose metadata reads back (damaged newer ones are logged and skipped)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = self._unusable.get(step) or self._unreadable(step)
      if reason is None:
        return step
      self._skip(step, reason)
    return None

  def should_save(self, step: int) -> bool:
    # Every `every` steps, plus when Orbax sees a multi-host preemption notice.
    return step % self.every == 0 or self.manager.reached_preemption(step)

  def _set_aside_unusable(self):
    """Renames skipped steps out of Orbax's way (it refuses to save over an existing step)."""
    if jax.process_index() == 0:
      for step in self._unusable:
        target = f"{self._step_dir(step)}.unusable-{int(time.time())}"
        os.rename(self._step_dir(step), target)
        logging.warning("checkpoint step %d set aside as %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint: unusable steps set aside")
    self._unusable.clear()
    self.manager.reload()

  def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False,
           checksums: dict | None = None) -> bool:
    """checksums: the state's `state_checksums`, if the caller computed them already (e.g.
    leaf by leaf with `host_checksum`)."""
    if self._unusable:
      self._set_aside_unusable()
    if not (force or self.manager.should_save(step)):
      return False
    save_state = ocp.args.PyTreeSave(state) if self._limited else ocp.args.StandardSave(state)
    args = {"state": save_state, "meta": ocp.args.JsonSave(meta),
            "integrity": ocp.args.JsonSave({"checksums": checksums if checksums is not None
                                            else state_checksums(state)})}
    if data_iter is not None:
      args["data"] = grain_checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def restore_meta(self, step: int) -> dict:
    return upgrade_meta(self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); data_iter in place.

    Falls back from a damaged `step` to the newest older step that restores intact (the state
    carries its own step number); raises CheckpointError when none does.
    """
    for candidate in sorted((s for s in self.manager.all_steps() if s <= step), reverse=True):
      reason = self._unusable.get(candidate) or self._unreadable(candidate)
      if reason is None:
        self._check_matches(candidate, abstract_state)
        if data_iter is not None:
          _iterator_file(self._step_dir(candidate) / "data")
        restored, reason = self._restore_verified(candidate, abstract_state, data_iter)
      if _all_processes_agree(reason is None):
        if candidate != step:
          logging.warning("checkpoint: restored step %d instead of %d", candidate, step)
        logging.info("checkpoint: restored step %d from %s", candidate, self.directory)
        return restored.state, restored.meta
      self._skip(candidate, reason or "another process could not restore it")
    raise CheckpointError(
        f"no usable checkpoint in {self.directory} at or before step {step}: " +
        "; ".join(f"step {s}: {r}" for s, r in sorted(self._unusable.items())) +
        "; move the folder away to start afresh")

  def _check_matches(self, step: int, abstract_state):
    """CheckpointError naming the first array whose saved shape or dtype differs from the
    target's: the config changed, which no older step of this run can fix."""
    saved = ocp.StandardCheckpointHandler().metadata(self._step_dir(step) / "state")
    saved = {_leaf_name(p): (tuple(m.shape), np.dtype(m.dtype))
             for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    for path, want in jax.tree_util.tree_leaves_with_path(abstract_state):
      name = _leaf_name(path)
      have = saved.get(name, "missing")
      if have != (tuple(want.shape), np.dtype(want.dtype)):
        shown = have if have == "missing" else f"{have[1]}{list(have[0])}"
        raise CheckpointError(
            f"checkpoint step {step} does not fit the model (the config changed since it was "
            f"written, e.g. data.vocab_size or model.*): {name} is {shown} there but "
            f"{np.dtype(want.dtype)}{list(want.shape)} now; resume with the original config "
            f"or use a new --workdir (checkpoints: {self.directory})")

  def _restore_verified(self, step: int, abstract_state, data_iter):
    """(restored, None), or (None, why) when the arrays are unreadable or fail the checksums
    recorded at save (older checkpoints without checksums are only read)."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data"] = grain_checkpoint.CheckpointRestore(data_iter)
    recorded = (self._step_dir(step) / "integrity").exists()
    if recorded:
      args["integrity"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:   # a damaged file can fail in any library's way
      return None, _unreadable_because(e)
    if recorded:
      now = state_checksums(restored.state)
      bad = sorted(k for k, v in restored.integrity["checksums"].items() if now.get(k) != v)
      if bad:
        return None, (f"{bad[0]}" + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else "")
                      + " differ from the checksums recorded when it was saved")
    return restored, None

  def restore_params(self, step: int, abstract_params):
    """Only the parameters of `abstract_params`' tree (ShapeDtypeStructs with shardings) from
    step's state: a pre-trained backbone for fine-tuning, without its optimizer state."""
    item = {"params": abstract_params}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return restored.state["params"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def folder_bytes(path: str) -> int:
  """Bytes of every file below `path` (a checkpoint's size on disk, as the CLIs report it)."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def split_step_path(path: str) -> tuple[str, int | None]:
  """(workdir, step) of `path`: a run's workdir or its checkpoints folder (step None: the run
  decides), or one checkpoint, <workdir>/checkpoints/<step> (a learning curve fine-tunes from
  each of a pre-training run's kept steps)."""
  path = os.path.expanduser(path).rstrip("/")
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(name)
  return (parent if name == "checkpoints" else path), None


def find_finished(path: str, prefer_best: bool = False):
  """(Checkpointer, step) of the finished run at `path` (its workdir or checkpoints folder):
  with prefer_best its best-validation state when it kept one, else its newest checkpoint;
  a <workdir>/checkpoints/<step> path names that step. None when there is none. Fine-tuning,
  distillation and inference all find runs this way."""
  workdir, step = split_step_path(path)
  if step is not None:
    checkpointer = Checkpointer(workdir, every=1, keep=1000, async_save=False)
    readable = step in checkpointer.manager.all_steps() and not checkpointer._unreadable(step)
    return (checkpointer, step) if readable else None
  for candidate in ([os.path.join(workdir, "best")] if prefer_best else []) + [workdir]:
    if os.path.isdir(os.path.join(candidate, "checkpoints")):
      checkpointer = Checkpointer(candidate, every=1, keep=1000, async_save=False)
      step = checkpointer.latest_step()
      if step is not None:
        return checkpointer, step
  return None
