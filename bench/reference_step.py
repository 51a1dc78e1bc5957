"""A minimal plain-JAX train step of the project's shape: the yardstick for its step time.

What a competent person writes in ~90 lines: params in a dict, one jit'd function, optax.adamw
with the project's schedule, donated buffers. It has no clipping, z-loss or extra metrics, so a
gap to the project's step is overhead to explain. Params come from the project's own init via
`from_project`, so both steps start from the same values and their losses can be compared.
"""
import jax
import jax.numpy as jnp
import optax

from train import optim


def _rms_norm(x, scale, dt):
  x = x.astype(jnp.float32)
  return (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale).astype(dt)


def _mm(x, w, dt):
  # Inputs in the compute dtype, float32 accumulation.
  return jnp.dot(x, w.astype(dt), preferred_element_type=jnp.float32).astype(dt)


def _rope(x, pos, theta):
  half = x.shape[-1] // 2
  angles = pos[..., None].astype(jnp.float32) * theta ** (-jnp.arange(half) / half)
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def loss_fn(params, batch, c):
  """Mean next-token NLL. batch: tokens [B, T], optionally segment_ids/positions (packed)."""
  tokens, seg = batch["tokens"], batch.get("segment_ids")
  b, t = tokens.shape
  dt = c.compute_dtype
  pos = batch["positions"] if "positions" in batch else jnp.broadcast_to(jnp.arange(t), (b, t))
  # Packed rows: causal within a document (positions restart at each document's start).
  mask = None if seg is None else (seg[:, None, :, None] == seg[:, None, None, :])
  x = params["embed"][tokens].astype(dt)
  for p in params["layers"]:
    h = _rms_norm(x, p["attn_norm"], dt)
    q = _rope(_mm(h, p["wq"], dt).reshape(b, t, c.num_heads, c.head_dim), pos, c.rope_theta)
    k = _rope(_mm(h, p["wk"], dt).reshape(b, t, c.num_kv_heads, c.head_dim), pos, c.rope_theta)
    v = _mm(h, p["wv"], dt).reshape(b, t, c.num_kv_heads, c.head_dim)
    a = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    x = x + _mm(a.reshape(b, t, -1), p["wo"], dt)
    h = _rms_norm(x, p["mlp_norm"], dt)
    up = _mm(h, p["wi"], dt)
    h = jax.nn.silu(_mm(h, p["wg"], dt)) * up if "wg" in p else jax.nn.gelu(up)
    x = x + _mm(h, p["w_out"], dt)
  x = _rms_norm(x, params["final_norm"], dt)
  if c.tie_embeddings:
    head = params["embed"].astype(dt).T
    x = x * jnp.asarray(c.d_model ** -0.5, dt)   # keeps tied logits ~N(0, 1), as the project
  else:
    head = params["lm_head"].astype(dt)
  logits = jnp.dot(x, head, preferred_element_type=jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  if seg is None:
    return jnp.mean(nll)
  weights = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)).astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(c, optim_cfg, num_steps: int):
  """(optax transform, jit'd step((params, opt_state), batch) -> (new state, loss))."""
  tx = optax.adamw(optim.make_schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                   eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay,
                   mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))

  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, c))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return tx, jax.jit(step, donate_argnums=0)


def from_project(params, c):
  """The project's Flax param tree (model/transformer.py) -> this module's dict, same values."""
  if c.positions != "rope":
    raise ValueError(f"the reference step supports rope positions only, got {c.positions!r}")
  def flat_in(w):   # [d_model, heads, head_dim] -> [d_model, heads * head_dim]
    return w.reshape(w.shape[0], -1)

  layers = []
  for i in range(c.num_layers):
    blk = params[f"block_{i}"]
    attn, mlp = blk["attn"], blk["mlp"]
    layer = {"attn_norm": blk["attn_norm"]["scale"], "mlp_norm": blk["mlp_norm"]["scale"],
             "wq": flat_in(attn["query"]["kernel"]), "wk": flat_in(attn["key"]["kernel"]),
             "wv": flat_in(attn["value"]["kernel"]),
             "wo": attn["out"]["kernel"].reshape(-1, c.d_model),
             "wi": mlp["wi"]["kernel"], "w_out": mlp["wo"]["kernel"]}
    if "wg" in mlp:
      layer["wg"] = mlp["wg"]["kernel"]
    layers.append(layer)
  out = {"embed": params["embed"]["embedding"], "final_norm": params["final_norm"]["scale"],
         "layers": layers}
  if "lm_head" in params:
    out["lm_head"] = params["lm_head"]["kernel"]
  return out
