"""Position encodings: rotary (RoPE, default) and a learned absolute table."""
import flax.linen as nn
import jax.numpy as jnp


def rope(x, positions, theta: float = 10_000.0):
  """Rotates channel pairs of x [B, T, H, D] by angles positions * theta^(-2i/D).

  Uses the "half split" pairing (channel i with i + D/2). The dot product of two rotated vectors
  depends only on their position difference, which is what makes it relative.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {d}")
  inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class LearnedPositions(nn.Module):
  """Absolute position embeddings added to the token embeddings."""
  max_len: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions):
    table = self.param(
        "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed")),
        (self.max_len, self.features), jnp.float32)
    return jnp.take(table, positions, axis=0).astype(self.dtype)
