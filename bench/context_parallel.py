r"""Context-parallel attention: compiled per-device memory and the causal work balance.

  python -m bench.context_parallel [--length=8192] [--contexts=1,2,4,8] [--heads=8] \
      [--kv_heads=8,1] [--head_dim=64] [--block_size=128]

Runs on fake CPU devices (it sets --xla_force_host_platform_device_count to the largest
context): nothing is timed, since fake devices share one host's cores. For each context size
and kv-head count it compiles causal attention fwd+bwd (a scalar of the output, d/dq, d/dk,
d/dv) on one row of `length` tokens, split over the context axis by each method (context 1:
blocked.py on one device), and prints XLA's per-device argument + temporary bytes. Then, per
context size, the visible (query block, key block) pairs of each device under the contiguous
and the zig-zag layout.
"""
import os
import sys

from absl import app, flags

_LENGTH = flags.DEFINE_integer("length", 8192, "Sequence length (one row).")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4", "8"], "Context axis sizes.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_list("kv_heads", ["8", "1"], "Key/value heads (GQA/MQA below heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block_size", 128, "Attention block size.")


def _compiled_mib(context: int, kv_heads: int, method: str) -> float:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from model import sharding as sharding_lib
  from model.attention import blocked, context_parallel as cp, masks

  t, h, d = _LENGTH.value, _HEADS.value, _HEAD_DIM.value
  spec = masks.MaskSpec()
  pos = masks.default_positions(1, t)
  shapes = [jax.ShapeDtypeStruct((1, t, n, d), jnp.float32) for n in (h, kv_heads, kv_heads)]

  def loss(q, k, v):
    mi = masks.MaskInputs(q_pos=pos, kv_pos=pos)
    if context == 1:
      out = blocked.attend(q, k, v, spec=spec, mask_inputs=masks.MaskInputs(),
                           block_size=_BLOCK.value)
    else:
      out = cp.attend(q, k, v, spec=spec, mask_inputs=mi, block_size=_BLOCK.value, method=method)
    return jnp.sum(out)
  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  devices = np.asarray(jax.devices()[:context]).reshape(1, 1, context, 1)
  mesh = Mesh(devices, sharding_lib.MESH_AXES)
  split = NamedSharding(mesh, P(None, "context"))
  with jax.set_mesh(mesh):
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=split) for s in shapes]
    stats = fn.lower(*args).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.temp_size_in_bytes) / 2**20


def main(argv):
  del argv
  from model.attention import context_parallel as cp
  import numpy as np
  contexts = [int(c) for c in _CONTEXTS.value]
  print("| context | kv heads | method | MiB per device (args + temp), fwd+bwd |")
  print("| --- | --- | --- | --- |")
  for kv_heads in map(int, _KV_HEADS.value):
    for context in contexts:
      for method in (["blocked (1 device)"] if context == 1 else ["ring", "allgather"]):
        mib = _compiled_mib(context, kv_heads, method)
        print(f"| {context} | {kv_heads} | {method} | {mib:,.1f} |")
  print("\n| context | layout | visible block pairs per device (min..max) |")
  print("| --- | --- | --- |")
  for context in contexts[1:] if contexts[0] == 1 else contexts:
    block, t = _BLOCK.value, _LENGTH.value
    for zigzag in (False, True):
      pos = np.asarray(cp.to_layout(np.arange(t)[None], context, zigzag)[0]).reshape(-1, block)
      visible = pos.min(1)[None, :] <= pos.max(1)[:, None]
      counts = visible.reshape(context, -1, visible.shape[1]).sum((1, 2))
      print(f"| {context} | {'zig-zag' if zigzag else 'contiguous'} | "
            f"{counts.min():,}..{counts.max():,} |")


if __name__ == "__main__":
  flags.FLAGS(sys.argv, known_only=True)
  count = max(int(c) for c in _CONTEXTS.value)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={count}")
  app.run(main)
