"""What fine-tuning and distillation add to a freshly initialised state.

`train.init_from` names a finished run: the fine-tuning run has already adopted its
architecture and tokenizer (train/build.py `finish`), and `load_backbone` replaces the fresh
parameters wherever the trees match, so the new parts (the classifier head) keep their
initialisation. Distillation restores the frozen teacher(s) into the state's "teacher" half and can
start the student from the (first) teacher's blocks (`distill.init_student=teacher_layers`).
Runs are found and restored through infer/loading.py, like every other reader of a run.
"""
import flax
import jax
import jax.numpy as jnp
from absl import logging

from infer import loading
from model.transformer import Transformer
from train.config_check import ConfigError


def load_backbone(pretrained: loading.Run, state, mesh, student: bool = False):
  """`state` with every parameter the pre-trained model also has replaced by its value (by
  path, so a LoRA state keeps its fresh adapters beside the restored kernels). student: the
  state is a distillation's {"student", "teacher"}; the student starts from the pre-trained
  model (e.g. an imported DistilBERT taught by a fine-tuned BERT)."""
  if student:
    inner = load_backbone(pretrained, state.replace(params=state.params["student"]), mesh)
    return state.replace(params={**state.params, "student": inner.params})
  # In the state's layout: a scanned checkpoint unstacks into per-layer params and back.
  restored = loading.restore_params(
      pretrained, Transformer(pretrained.model_config(scan_layers="blocks" in state.params)), mesh)
  params = flax.traverse_util.flatten_dict(state.params)
  source = flax.traverse_util.flatten_dict(restored)
  new = sorted({"/".join(k) for k in set(params) - set(source)})
  unused = sorted({"/".join(k) for k in set(source) - set(params)})
  shared = set(params) & set(source)
  for key in shared:
    params[key] = jax.device_put(source[key], params[key].sharding)
  logging.info("restored %d pre-trained parameters; newly initialised: %s; unused: %s",
               len(shared), new or "none", unused or "none")
  return state.replace(params=flax.traverse_util.unflatten_dict(params))


def add_teachers(state, teachers: list[loading.Run], task, mesh):
  """`state` with the frozen teachers' parameters restored into its "teacher" half, stacked on
  a leading axis in distill.teacher's order (train/tasks/distill.py)."""
  restored = [loading.restore_params(run, task.teacher, mesh) for run in teachers]
  target = jax.tree.map(lambda a: a.sharding, state.params["teacher"])
  stack = jax.jit(lambda *trees: jax.tree.map(lambda *x: jnp.stack(x), *trees),
                  out_shardings=target)
  return state.replace(params={**state.params, "teacher": stack(*restored)})


def teacher_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
  """The teacher block each student block starts from: evenly spaced, first and last kept (the
  last feeds the head the student also inherits)."""
  if student_layers == 1:
    return [teacher_layers - 1]
  return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def init_student_from_teacher(state, student_layers: int, teacher_layers: int):
  """`state` with the student's parameters copied from the (restored) teacher's: every group
  but the blocks by name, block i from teacher block teacher_layer_map()[i]. Shapes must match:
  the student may be shallower than the teacher, not narrower. With several teachers, from the
  first one distill.teacher names."""
  student = state.params["student"]
  teacher = jax.tree.map(lambda x: x[0], state.params["teacher"])
  layer_map = teacher_layer_map(student_layers, teacher_layers)
  source = {name: (f"block_{layer_map[int(name[6:])]}" if name.startswith("block_") else name)
            for name in student}
  copied = {}
  for name, origin in source.items():
    if origin not in teacher:
      raise ConfigError(f"config.distill.init_student='teacher_layers': the teacher has no "
                        f"parameter group {origin!r} for the student's {name!r}")
    for (path, s), t in zip(jax.tree_util.tree_leaves_with_path(student[name]),
                            jax.tree.leaves(teacher[origin])):
      if s.shape != t.shape:
        raise ConfigError(
            f"config.distill.init_student='teacher_layers' needs the teacher's width: student "
            f"{name}{jax.tree_util.keystr(path)} is {s.shape}, the teacher's is {t.shape}")
    # Copies (may_alias=False): the train step donates the student's buffers, never the
    # teacher's, so the two must not share one.
    copied[name] = jax.tree.map(lambda t, s: jax.device_put(t, s.sharding, may_alias=False),
                                teacher[origin], student[name])
  logging.info("student initialised from the teacher: blocks %s", layer_map)
  return state.replace(params={**state.params, "student": copied})
