"""Per-row token choice for a batch whose rows belong to different requests (the in-flight
engine, infer/inflight.py). decode_controls takes its `Controls` as a static argument: one
compilation per distinct value, the same for every row. Here each row carries its own
temperature / top-k / top-p, minimum length and sampling key as traced arrays, so a new mix of
requests in the batch never recompiles, and a row's samples depend on its own seed and token
count only - never on its neighbours. The filters are decode_controls.filter_logits's, with the
thresholds per row.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from infer.decode_controls import Controls


@flax.struct.dataclass
class RowControls:
  """Each row's sampling controls ([S] arrays; row r is slot r's request)."""
  temperature: jax.Array   # float32; 0: greedy
  top_k: jax.Array         # int32; 0: off
  top_p: jax.Array         # float32; 1: off
  min_new: jax.Array       # int32; eos is banned before this many generated tokens
  key: jax.Array           # uint32 [S, 2]: the request's PRNGKey(seed)

  @classmethod
  def empty(cls, rows: int) -> "RowControls":
    return cls(jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32),
               jnp.ones(rows, jnp.float32), jnp.zeros(rows, jnp.int32),
               jnp.zeros((rows, 2), jnp.uint32))

  def set_row(self, index, row: "RowControls") -> "RowControls":
    """These controls with row `index` replaced by `row`'s (a one-row RowControls)."""
    return jax.tree.map(lambda all_, one: all_.at[index].set(one[0]), self, row)


def one_row(controls: Controls, seed: int) -> RowControls:
  """A request's controls as a one-row RowControls (numpy: nothing is placed on a device).
  The controls that read the row's history (no-repeat n-grams, repetition penalty) would need
  a per-row history buffer in the engine; they are refused rather than silently ignored."""
  if controls.uses_history:
    raise ValueError("the in-flight engine does not take no_repeat_ngram_size or "
                     "repetition_penalty; use infer.decode for those")
  key = np.asarray(jax.random.PRNGKey(seed), np.uint32)   # a raw [2] uint32 key
  return RowControls(np.array([controls.temperature], np.float32),
                     np.array([controls.top_k], np.int32), np.array([controls.top_p], np.float32),
                     np.array([controls.min_new], np.int32), key[None])


def _filter(logits, temperature, top_k, top_p):
  """filter_logits row by row: scale by 1/temperature, then -inf outside each row's top-k and
  nucleus (top_k 0 / top_p 1: that filter off)."""
  logits = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ordered = -jnp.sort(-logits, axis=-1)     # descending
  kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None],
                            axis=-1)
  use_k = (top_k > 0)[:, None]
  logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
  # The sorted top-k-filtered logits, without a second sort (ties with the k-th stay, as in
  # filter_logits).
  ordered = jnp.where(use_k & (ordered < kth), -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(before < top_p[:, None], ordered, jnp.inf), axis=-1,
                   keepdims=True)
  return jnp.where((top_p < 1.0)[:, None] & (logits < cutoff), -jnp.inf, logits)


def choose(logits, rows: RowControls, count, eos_id):
  """Each row's generated token number count[r] from its logits [S, vocab]: (token [S] int32,
  its log-probability [S] under the model's distribution, before any control or filter).
  Sampling keys are fold_in(row key, count): reproducible per request whatever else runs."""
  logits = logits.astype(jnp.float32)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  banned = (jnp.arange(logits.shape[-1]) == eos_id)[None] & (count < rows.min_new)[:, None]
  logits = jnp.where(banned, -jnp.inf, logits)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampling = rows.temperature > 0

  def sample():
    # The sort of the filters is the costly part: only batches with a filtering row pay it.
    filtered = jax.lax.cond(jnp.any(sampling & ((rows.top_k > 0) | (rows.top_p < 1.0))),
                            lambda: _filter(logits, rows.temperature, rows.top_k, rows.top_p),
                            lambda: logits / jnp.where(sampling, rows.temperature, 1.0)[:, None])
    keys = jax.vmap(jax.random.fold_in)(rows.key, count)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(sampling, drawn, greedy)

  token = jax.lax.cond(jnp.any(sampling), sample, lambda: greedy)
  return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
