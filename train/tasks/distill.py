"""Knowledge distillation: a small student learns from a frozen teacher on the student's task.

  loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * task loss on the labels
         + hidden_weight * relation loss (optional)

The KL is per example for a classifier and per scored token for an LM or summarizer
(token-level KD), weighted exactly like the task's own loss. The relation loss matches the
token-to-token cosine-similarity matrices of the two models' final hidden states (as in
MiniLM's relation distillation): it needs no projection between different widths.

Several teachers (distill.teacher="runs/a,runs/b,..."; one architecture and tokenizer) teach
as an ensemble: the teacher distribution is the mean of their tempered class/token
probabilities - at T=1 exactly the rule train/ensemble.py and infer/ensemble.py score - and the
relation target the mean of their similarity matrices. One student then carries what the
ensemble knows at one forward pass per example (Hinton et al. 2015's "distilling an ensemble").

A classifier may also have an offline teacher (distill.offline_teacher: probabilities per
example, made before training, e.g. TF-IDF + logistic regression; train/data/soft_targets.py):
the rows carry them as `teacher_probs`, tempered like the networks', and the target is
(1 - w) * the networks' mean + w * theirs (w = distill.offline_weight). At w = 1 (and no
relation loss) the networks are not run: one teacher's own predictions on the train rows
(`train.redecode --split=train`) then teach exactly as the online teacher would (tempering its
probabilities is tempering its logits), without its forward pass in every step - for sweeping
alpha and T. For several teachers the offline target is their mean probability tempered, not
the mean of their tempered probabilities (equal at T = 1).

A classifier's student may also learn from unlabelled texts (distill.transfer_file, Hinton et
al.'s "transfer set"): they join the train rows labelled -1, where the task's cross-entropy
and hits are zero (train/tasks/classify.py) and the KL to the teachers - online, or the offline
teacher's probabilities for them - is the whole lesson.

Teacher and student live in one parameter tree {"student", "teacher"} (`StudentTeacher`), so
the teachers are sharded by the same logical axis rules as the student and their logits are
computed on the fly in the same jit'd step. "teacher" holds every teacher stacked on a leading
(unsharded) axis, one teacher too; they run one after another (a scan into running sums), so
memory holds one teacher's logits and activations whatever their number (a checkpoint whose
"teacher" is one unstacked teacher does not resume; its student still loads).
They are frozen by stop_gradient (zero gradients) and excluded from weight decay
(train/optim.py `frozen`); Adam's moments for them stay zero, which costs memory, not
correctness.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import Transformer
from train.tasks.base import Task


class StudentTeacher(nn.Module):
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig
  num_teachers: int = 1

  def setup(self):
    self.student = Transformer(self.student_cfg)
    # Each teacher parameter gets a leading [num_teachers] axis, replicated (None) by the
    # logical axis rules.
    stacked = nn.vmap(Transformer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, axis_size=self.num_teachers,
                      metadata_params={nn.PARTITION_NAME: None})
    self.teacher = stacked(self.teacher_cfg)

  def __call__(self, tokens):
    """Both models' outputs: what initialises both (the loss applies each on its own)."""
    return self.student(tokens), self.teacher(tokens)


def _relation(hidden, valid):
  """Cosine similarities [B, T, T] between a row's tokens, zero outside valid pairs."""
  h = hidden.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.sum(h * h, axis=-1, keepdims=True) + 1e-6)
  pair = valid[:, :, None] * valid[:, None, :]
  return jnp.einsum("btd,bsd->bts", h, h) * pair, pair


class DistillTask(Task):
  """`base`: the student's own task (classify, summarize or pretrain) on the student model."""

  def __init__(self, base: Task, teacher_cfg: ModelConfig, distill_cfg, num_teachers: int = 1):
    super().__init__(StudentTeacher(base.model.cfg, teacher_cfg, num_teachers))
    self.student = base.model
    self.teacher = Transformer(teacher_cfg)
    self.base = base
    d = distill_cfg
    self.alpha, self.temperature, self.hidden_weight = d.alpha, d.temperature, d.hidden_weight
    self.offline = bool(d.offline_teacher) and base.model.cfg.num_classes > 0
    self.offline_weight = d.offline_weight

  def dummy_batch(self, batch_size: int, seq_len: int):
    """The student task's batch, plus the offline teacher's probabilities if there is one."""
    batch = self.base.dummy_batch(batch_size, seq_len)
    if self.offline:
      batch["teacher_probs"] = np.zeros((batch_size, self.student.cfg.num_classes), np.float32)
    return batch

  def loss(self, params, batch, rng, train: bool):
    tokens, kwargs = self.base.inputs(batch)
    kwargs.update(with_hidden=True, deterministic=not train)
    rngs = {"dropout": rng} if train else None
    s_logits, s_hidden = self.student.apply({"params": params["student"]}, tokens, rngs=rngs,
                                            **kwargs)
    task_loss, sums = self.base.score(s_logits, batch, train)
    weights = self.base.weights(batch)
    t = self.temperature
    # The rows' own mask where they have one (id 0 is a real token in HF vocabularies).
    valid = (batch["mask"] > 0 if "mask" in batch else tokens > 0).astype(jnp.float32)
    offline = None
    if "teacher_probs" in batch:   # an offline teacher's (train/data/soft_targets.py)
      offline = jax.nn.log_softmax(jnp.log(jnp.maximum(batch["teacher_probs"], 1e-12)) / t)
    if offline is not None and self.offline_weight == 1 and not self.hidden_weight:
      t_logp = offline   # the networks would get no weight: their forward passes are skipped
    else:
      t_logp, t_rel = self._teachers(jax.lax.stop_gradient(params["teacher"]), tokens, kwargs,
                                     valid, s_logits.shape)
      if offline is not None:
        t_logp = jnp.logaddexp(jnp.log1p(-self.offline_weight) + t_logp,
                               jnp.log(self.offline_weight) + offline)
    s_logp = jax.nn.log_softmax(s_logits.astype(jnp.float32) / t)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    kd = jnp.sum(kl * weights) * t * t
    total = self.alpha * kd + (1 - self.alpha) * task_loss
    sums = {**sums, "task_loss": task_loss, "kd": kd}
    if self.hidden_weight:
      s_rel, pair = _relation(s_hidden, valid)
      # Per row: mean squared difference over its valid pairs, weighted like the task.
      row = jnp.sum(jnp.square(s_rel - t_rel), axis=(1, 2)) / jnp.maximum(pair.sum((1, 2)), 1.0)
      row_weight = weights if weights.ndim == 1 else weights.sum(-1)
      relation = jnp.sum(row * row_weight)
      total = total + self.hidden_weight * relation
      sums["relation"] = relation
    sums["loss"] = total
    return total, sums

  def _teachers(self, teachers, tokens, kwargs, valid, logits_shape):
    """(log of the teachers' mean tempered probabilities, their mean relation matrix or None).
    One teacher at a time (a scan over the stacked axis) into running sums - a log-sum-exp for
    the probabilities, stable where a probability underflows - so memory holds one teacher's
    logits and activations whatever their number."""
    def add(carry, p):
      logp_sum, rel_sum = carry
      logits, hidden = self.teacher.apply({"params": p}, tokens,
                                          **{**kwargs, "deterministic": True})
      logp = jax.nn.log_softmax(logits.astype(jnp.float32) / self.temperature)
      if self.hidden_weight:
        rel_sum = rel_sum + _relation(hidden, valid)[0]
      return (jnp.logaddexp(logp_sum, logp), rel_sum), None

    count = jax.tree.leaves(teachers)[0].shape[0]
    rows, length = tokens.shape[:2]
    start = (jnp.full(logits_shape, -jnp.inf, jnp.float32),
             jnp.zeros((rows, length, length), jnp.float32) if self.hidden_weight else None)
    (logp_sum, rel_sum), _ = jax.lax.scan(add, start, teachers)
    return logp_sum - jnp.log(count), None if rel_sum is None else rel_sum / count

  def student_params(self, params):
    return params["student"]
