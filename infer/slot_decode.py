"""The device side of in-flight batching (infer/inflight.py): a KV cache of `S` slots x
`max_len` positions, each slot (batch row) one request's, at its own position; `admit`
prefills one prompt and writes it into one slot, `decode_chunk` runs a few decode steps of
every slot at once. All of it is one pytree, `Slots`, carried from call to call and donated to
each, so the cache is updated in place.

Per-row positions need nothing new from the model: its "step" cache mode already writes each
row's key/value at that row's own position and masks by each row's cached positions
(model/transformer.py MultiHeadAttention._decode_step). What a reused slot needs is that the
previous request's keys stay hidden: `admit` marks every position past the new prompt unused
(cached position -1, which the step's mask hides), and the step re-marks a position as it
writes it. A free slot keeps stepping with the others (one batch shape, one compilation) but
its output is dropped and its position does not move.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp

from infer import decode
from infer import row_sampling

_POS = "cached_pos"   # the cache variable holding each cached key's position (-1: unused)


@flax.struct.dataclass
class Slots:
  """Every slot's decoding state ([S] arrays unless said otherwise)."""
  cache: dict                  # the model's "cache" collection, S rows of max_len positions
  token: jax.Array             # int32: the last chosen token, fed at `position` next step
  position: jax.Array          # int32
  count: jax.Array             # int32: tokens generated so far (`token` included)
  live: jax.Array              # bool: still decoding (False: free, or its request ended)
  limit: jax.Array             # int32: the request's max_new
  stop_eos: jax.Array          # bool: an eos ends the request
  rows: row_sampling.RowControls


def batch_axis(model) -> int:
  """The cache's batch axis: scanned layers (model.scan_layers) stack the layers in front."""
  return 1 if getattr(getattr(model, "cfg", None), "scan_layers", False) else 0


def check_model(model):
  """ValueError for a model whose cache cannot hold a slot of max_len positions."""
  cfg = getattr(model, "cfg", None)
  if cfg is not None and cfg.attention_kind == "local":
    raise ValueError("the in-flight engine keeps max_len positions per slot; local attention "
                     "caches a window-sized ring (use infer.decode)")


def _leaf_name(path) -> str:
  return getattr(path[-1], "key", str(path[-1]))


@functools.partial(jax.jit, static_argnames=("model", "slots", "max_len"))
def empty(model, params, *, slots: int, max_len: int) -> Slots:
  """`slots` free slots of `max_len` positions (zero keys, every position unused)."""
  tokens = jnp.zeros((slots, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: decode.prefill(model, params, tokens,
                                                 jnp.ones(slots, jnp.int32))[0])
  cache = jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.full(s.shape, -1 if _leaf_name(p) == _POS else 0, s.dtype), shapes)
  zeros = jnp.zeros(slots, jnp.int32)
  return Slots(cache, zeros, zeros, zeros, jnp.zeros(slots, bool), zeros,
               jnp.zeros(slots, bool), row_sampling.RowControls.empty(slots))


def _write_row(model, big, one, index, prompt_len, path):
  """Slot `index` of cache leaf `big` := `one` (a one-row prefill's leaf, its first L
  positions); for the positions leaf, 0..prompt_len-1 and -1 (unused) after."""
  axis = batch_axis(model)
  if _leaf_name(path) == _POS:
    shape = one.shape[:axis + 1] + big.shape[axis + 1:]
    pos = jnp.arange(big.shape[axis + 1], dtype=big.dtype)
    one = jnp.broadcast_to(jnp.where(pos < prompt_len, pos, -1), shape)
  start = (0,) * axis + (index,) + (0,) * (big.ndim - axis - 1)
  return jax.lax.dynamic_update_slice(big, one.astype(big.dtype), start)


@functools.partial(jax.jit, static_argnames=("model", "prefix_lm"), donate_argnames=("slots",))
def admit(model, params, slots: Slots, index, tokens, prompt_len, limit, stop_eos,
          rows: row_sampling.RowControls, eos_id, *, prefix_lm: bool = False):
  """Prefills one prompt (tokens [1, L] right-padded, prompt_len [1]) into slot `index` and
  chooses its first token. Returns (slots, token [1], logprob [1], live [1]); live is False
  when that token already ends the request (an eos, or max_new 1). One compilation per
  prompt bucket L (eos_id is traced, like every per-request value)."""
  cache, logits = decode.prefill(model, params, tokens, prompt_len, prefix_lm=prefix_lm)
  token, logprob = row_sampling.choose(logits, rows, jnp.zeros(1, jnp.int32), eos_id)
  live = (limit > 1) & ~(stop_eos & (token == eos_id))
  new_cache = jax.tree_util.tree_map_with_path(
      lambda p, big, one: _write_row(model, big, one, index, prompt_len[0], p),
      slots.cache, cache)
  put = lambda all_, one: all_.at[index].set(one[0])
  slots = Slots(new_cache, put(slots.token, token), put(slots.position, prompt_len),
                slots.count.at[index].set(1), put(slots.live, live), put(slots.limit, limit),
                put(slots.stop_eos, stop_eos), slots.rows.set_row(index, rows))
  return slots, token, logprob, live


def _step(model, params, slots: Slots, eos_id):
  """One decode step of every slot: feed each live row's token, choose its next one."""
  logits, variables = model.apply(
      {"params": params, "cache": slots.cache}, slots.token[:, None],
      positions=slots.position[:, None], cache_mode="step", mutable=["cache"])
  token, logprob = row_sampling.choose(logits[:, 0], slots.rows, slots.count, eos_id)
  live = slots.live
  count = slots.count + live
  ended = live & ((slots.stop_eos & (token == eos_id)) | (count >= slots.limit))
  slots = slots.replace(cache=variables["cache"], token=jnp.where(live, token, slots.token),
                        position=slots.position + live, count=count, live=live & ~ended)
  return slots, (token, logprob, live)


@functools.partial(jax.jit, static_argnames=("model", "steps"), donate_argnames=("slots",))
def decode_chunk(model, params, slots: Slots, eos_id, *, steps: int):
  """`steps` decode steps of every slot (a lax.scan: one dispatch, one host sync for the
  caller). Returns (slots, ids [S, steps], logprobs [S, steps], emitted [S, steps]): row r's
  new tokens are ids[r][emitted[r]]; once a row ends it emits nothing more."""
  slots, (ids, logprobs, emitted) = jax.lax.scan(
      lambda s, _: _step(model, params, s, eos_id), slots, None, length=steps)
  return slots, ids.T, logprobs.T, emitted.T
