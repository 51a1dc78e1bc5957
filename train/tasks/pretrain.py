"""Causal language modelling on packed rows: predict token t+1 from tokens <= t.

A target is scored only when it belongs to the same (non-padding) document as its input, so
packing never teaches the model to predict across a document boundary.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from train.tasks.base import Task


def lm_targets(tokens, segment_ids=None):
  """(targets, weights) [B, T]: next token, and 1.0 where it should be scored."""
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  if segment_ids is None:
    weights = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
  else:
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    weights = jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)
  return targets, weights


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """Summed weighted cross-entropy (+ z_loss * log(Z)^2), in float32; returns (loss, metrics)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jnp.sum((lse - target_logit) * weights)
  z = jnp.sum(jnp.square(lse) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  # Sums; the step divides by the total weight, so "loss" is the mean NLL per scored token.
  return nll + z_loss * z, {"loss": nll, "z_loss": z, "accuracy": correct,
                            "weight": jnp.sum(weights)}


AUTO_CHUNK_LOGITS_BYTES = 2**30
AUTO_CHUNK_ROWS = 1024


def auto_loss_chunk(batch_size: int, seq_len: int, vocab_size: int, num_devices: int) -> int:
  """optim.loss_chunk=-1: chunks of 1,024 rows on one device when its float32 [B, T, vocab]
  logits would pass 1 GiB - they are held with their softmax and their gradient, 3 x 3.1 GiB
  for a 50k vocabulary at 8 x 2048 tokens (docs/results/gpu.md, "Memory") - else 0 (plain).
  Sharded runs stay plain: a chunk of consecutive rows cuts across the batch shards, and the
  TPU compiler then needs far more per chip than the plain loss (Llama-3-8B on v5p-128:
  99.98 GiB of temporaries instead of 20.00; docs/results/tpu_compile.md)."""
  logits = batch_size * seq_len * vocab_size * 4
  return AUTO_CHUNK_ROWS if num_devices == 1 and logits > AUTO_CHUNK_LOGITS_BYTES else 0


def chunked_cross_entropy(head, head_params, x, targets, weights, z_loss: float, chunk: int):
  """cross_entropy(head(head_params, x), ...) without ever holding [B, T, V] logits.

  x [B, T, D] final hidden states; head(head_params, x [B', T', D]) -> logits [B', T', V]. Rows
  are taken `chunk` at a time (a lax.scan); each chunk's logits, log-sum-exp and target logit
  are formed, and since the loss is the end of the graph, so is the chunk's gradient: dlogits
  = weights * (softmax * (1 + 2 z_loss lse) - onehot), pulled back through the head right
  there (custom_vjp). The backward pass then only scales the stored dx and d(head_params) by
  the loss's cotangent: no logits are kept or recomputed. Returns what cross_entropy returns.
  """
  b, t, d = x.shape
  n = b * t
  pad = -n % chunk
  rows = lambda a: jnp.pad(a.reshape(n, *a.shape[2:]), [(0, pad)] + [(0, 0)] * (a.ndim - 2))
  xs = rows(x).reshape(-1, chunk, d)
  ts, ws = rows(targets).reshape(-1, chunk), rows(weights).reshape(-1, chunk)
  total, metrics = _fused_ce(head, z_loss, head_params, xs, ts, ws)
  return total, {**metrics, "weight": jnp.sum(weights)}


def _chunk_terms(head, head_params, xc, tc, wc):
  """One chunk's f32 logits, log-sum-exp and (nll, z, correct) sums, and the head's pullback."""
  logits, pull = jax.vjp(lambda p, x: head(p, x[None])[0], head_params, xc)
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
  sums = (jnp.sum((lse - target_logit) * wc), jnp.sum(jnp.square(lse) * wc),
          jnp.sum((jnp.argmax(logits, axis=-1) == tc) * wc))
  return logits, lse, sums, pull


def _totals(z_loss, nll, z, correct):
  nll, z, correct = nll.sum(), z.sum(), correct.sum()
  return nll + z_loss * z, {"loss": nll, "z_loss": z, "accuracy": correct}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_ce(head, z_loss, head_params, xs, ts, ws):
  # Without differentiation (evaluation) only the sums: no gradient is formed per chunk.
  def body(_, chunk):
    return None, _chunk_terms(head, head_params, *chunk)[2]

  _, sums = jax.lax.scan(body, None, (xs, ts, ws))
  return _totals(z_loss, *sums)


def _fused_ce_fwd(head, z_loss, head_params, xs, ts, ws):
  def body(dparams, chunk):
    xc, tc, wc = chunk
    logits, lse, sums, pull = _chunk_terms(head, head_params, xc, tc, wc)
    onehot = jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
    probs = jnp.exp(logits - lse[:, None])
    dlogits = wc[:, None] * (probs * (1.0 + 2.0 * z_loss * lse)[:, None] - onehot)
    dp, dx = pull(dlogits.astype(logits.dtype))
    return jax.tree.map(jnp.add, dparams, dp), (sums, dx)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), head_params)
  dparams, (sums, dxs) = jax.lax.scan(body, zeros, (xs, ts, ws))
  return _totals(z_loss, *sums), (dparams, dxs.astype(xs.dtype), head_params)


def _fused_ce_bwd(head, z_loss, res, cotangent):
  dparams, dxs, head_params = res
  g = cotangent[0]   # only the loss is differentiated; the metrics' cotangents are ignored
  scale = lambda tree, like: jax.tree.map(lambda a, p: (a * g).astype(p.dtype), tree, like)
  return scale(dparams, head_params), (dxs * g).astype(dxs.dtype), None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


class PretrainTask(Task):
  """Batches: tokens, segment_ids, positions (all int32 [B, T])."""

  @staticmethod
  def dummy_batch(batch_size: int, seq_len: int):
    shape = (batch_size, seq_len)
    return {"tokens": np.zeros(shape, np.int32), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()}

  def inputs(self, batch):
    return batch["tokens"], {"positions": batch.get("positions"),
                             "segment_ids": batch.get("segment_ids")}

  def weights(self, batch):
    return lm_targets(batch["tokens"], batch.get("segment_ids"))[1]

  def score(self, logits, batch, train: bool):
    targets, weights = lm_targets(batch["tokens"], batch.get("segment_ids"))
    return cross_entropy(logits, targets, weights, self.z_loss if train else 0.0)

  def loss(self, params, batch, rng, train: bool):
    """With loss_chunk > 0 (config.optim.loss_chunk), the LM head and the loss run fused
    over chunks of rows (chunked_cross_entropy); otherwise logits, then score."""
    if not self.loss_chunk:
      return super().loss(params, batch, rng, train)
    hidden = self.forward(params, batch, rng, train, return_hidden=True)
    return self.head_loss(params, hidden, batch, train)

  def head_loss(self, params, hidden, batch, train: bool):
    """(loss_sum, metric_sums) from the final (normed) hidden states [B, T, D]."""
    head = lambda p, x: self.model.apply({"params": p}, x, method=lambda m, x: m.head(x))
    if not self.loss_chunk:
      return self.score(head(params, hidden), batch, train)
    targets, weights = lm_targets(batch["tokens"], batch.get("segment_ids"))
    head_params = {k: params[k] for k in ("embed", "lm_head") if k in params}
    return chunked_cross_entropy(head, head_params, hidden, targets, weights,
                                 self.z_loss if train else 0.0, self.loss_chunk)
