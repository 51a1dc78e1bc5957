"""Position encodings: rotary (RoPE, default) and a learned absolute table."""
import flax.linen as nn
import jax.numpy as jnp


def scaled_inv_freq(inv_freq, scaling: str, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_len: int):
  """Frequencies stretched for a longer context: "linear" divides them all by `factor`;
  "llama3" (Llama 3.1) divides only the low frequencies, leaves the high ones and blends
  between the two bands."""
  if scaling == "none":
    return inv_freq
  if scaling == "linear":
    return inv_freq / factor
  if scaling != "llama3":
    raise ValueError(f"model.rope_scaling={scaling!r}; expected none, linear or llama3")
  low_wavelen = original_max_len / low_freq_factor
  high_wavelen = original_max_len / high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  out = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * out / factor + smooth * out
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return jnp.where(medium, smoothed, out)


def rope(x, positions, theta: float = 10_000.0, scaling: tuple | None = None):
  """Rotates channel pairs of x [B, T, H, D] by angles positions * theta^(-2i/D).

  Uses the "half split" pairing (channel i with i + D/2). The dot product of two rotated vectors
  depends only on their position difference, which is what makes it relative. `scaling`:
  the arguments of `scaled_inv_freq` after the frequencies, or None.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {d}")
  inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  if scaling is not None and scaling[0] != "none":
    inv_freq = scaled_inv_freq(inv_freq, *scaling)
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
