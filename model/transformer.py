"""Decoder-only transformer: attention + MLP blocks, pre-norm, tied or separate LM head.

Config switches (model/config.py) cover the imported families (train/hf/convert.py): RMSNorm or
LayerNorm, pre- or post-norm, projection biases, scaled RoPE or learned positions, embedding
scale, logit soft-cap, causal or bidirectional; for the encoders (BERT, RoBERTa, DistilBERT)
token-type embeddings, an embedding norm, a position offset, [CLS] pooling, BERT's pooler and
a classifier hidden layer. The defaults are the original decoder.

With config.mesh.context > 1 the sequence is split over devices: the embeddings, positions and
segment ids are put in the context-parallel layout once, attention runs
model/attention/context_parallel.py, and the layout is undone after the last block."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from model import attention as attention_lib
from model import layers
from model import positions as positions_lib
from model.attention import context_parallel, masks
from model.config import ModelConfig

_ACT = ("activation_batch", "activation_length", "activation_embed")


def mask_spec(c: ModelConfig) -> masks.MaskSpec:
  window = c.attention_window if c.attention_kind == "local" else None
  return masks.MaskSpec(causal=c.causal, window=window, num_global=c.attention_num_global)


def context_parallelism(module: nn.Module, cache_mode) -> int:
  """The number of devices the sequence is split over where `module` runs (1: not split).
  Initialisation only needs shapes and runs unsplit, as does a batch with no mesh around it."""
  context = context_parallel.context_size()
  if context == 1 or module.is_initializing():
    return 1
  if cache_mode is not None:
    raise ValueError(f"decoding runs with config.mesh.context=1 (got a mesh with context "
                     f"{context}); rebuild the mesh for inference")
  return context


class MultiHeadAttention(nn.Module):
  """Projections + RoPE around a pluggable kernel; K/V may have fewer heads (GQA/MQA)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask_inputs: masks.MaskInputs, rope_positions, cache_mode=None):
    """cache_mode (autoregressive decoding, see infer/decode.py): "prefill" also writes this
    layer's keys/values for every position of x into the "cache" collection; "step" takes one
    new token per row at `rope_positions` [B, 1], writes its key/value there and attends to
    the cached keys (window and causality from the same MaskSpec as training)."""
    c = self.cfg
    dt = c.compute_dtype
    std = c.d_model ** -0.5
    qb = c.qkv_bias
    q = layers.dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "query", dt, std,
                     qb)(x)
    k = layers.dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "key", dt,
                     std, qb)(x)
    v = layers.dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "value", dt,
                     std, qb)(x)
    if c.positions == "rope":
      scaling = (c.rope_scaling, c.rope_scaling_factor, c.rope_low_freq_factor,
                 c.rope_high_freq_factor, c.rope_original_max_len)
      q = positions_lib.rope(q, rope_positions, c.rope_theta, scaling)
      k = positions_lib.rope(k, rope_positions, c.rope_theta, scaling)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads",
                                       None))
    spec = mask_spec(c)
    window = spec.window
    if cache_mode == "step":
      out = self._decode_step(q, k, v, rope_positions, spec)
    elif context_parallelism(self, cache_mode) > 1:
      # Any kind: the ring's blocks already skip what the mask hides (the module docstring).
      out = context_parallel.attend(q, k, v, spec=spec, mask_inputs=mask_inputs,
                                    block_size=c.attention_block_size)
    else:
      if cache_mode == "prefill":
        self._fill_cache(k, v, mask_inputs, window)
      kernel = attention_lib.get_kernel(c.attention_kind)
      out = kernel(q, k, v, spec=spec, mask_inputs=mask_inputs,
                   implementation=c.attention_implementation, block_size=c.attention_block_size)
    out_std = (c.num_heads * c.head_dim) ** -0.5 / c.num_layers ** 0.5   # scaled residual init
    return layers.Projection((c.d_model,), ("heads", "head_dim", "embed"), out_std, dt,
                             use_bias=c.out_bias, name="out")(out)

  def _fill_cache(self, k, v, mask_inputs, window):
    """Stores keys/values for decoding. Slot p % size holds position p, with size = the
    prefill length, or the window for local attention: a ring holding the last `window`
    positions of each row's prompt (rows are right-padded; segment ids mark the prompt)."""
    b, t = k.shape[:2]
    if window is None or window >= t:
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      if self.cfg.attention_num_global:
        raise ValueError("decoding with local attention keeps a window-sized cache, which "
                         "would drop the global tokens; use model.attention.num_global=0")
      length = (jnp.sum(mask_inputs.q_seg > 0, axis=1) if mask_inputs.q_seg is not None
                else jnp.full((b,), t))[:, None]
      slot = jnp.arange(window, dtype=jnp.int32)[None]
      # The newest prompt position in each slot, or -1 (slot not used yet).
      pos = slot + window * ((length - 1 - slot) // window)
      pos = jnp.where(slot <= length - 1, pos, -1)
      take = lambda x: jnp.take_along_axis(x, jnp.maximum(pos, 0)[:, :, None, None], axis=1)
      k, v = take(k), take(v)
    self.variable("cache", "cached_key", lambda: k)
    self.variable("cache", "cached_value", lambda: v)
    self.variable("cache", "cached_pos", lambda: pos)

  def _decode_step(self, q, k, v, positions, spec):
    """q/k/v [B, 1, ., D] of the token at positions [B, 1]: write, then attend to the cache."""
    cached_k = self.variable("cache", "cached_key")
    cached_v = self.variable("cache", "cached_value")
    cached_pos = self.variable("cache", "cached_pos")
    size = cached_k.value.shape[1]
    index = positions[:, 0] % size
    slot = jax.nn.one_hot(index, size, dtype=k.dtype)[:, :, None, None]
    cached_k.value = cached_k.value * (1 - slot) + k * slot
    cached_v.value = cached_v.value * (1 - slot) + v * slot
    cached_pos.value = jnp.where(jnp.arange(size)[None] == index[:, None], positions,
                                 cached_pos.value)
    # Slots after the current position (padding, or not written yet) are hidden by causality,
    # unused ring slots by their position -1.
    kv_pos = cached_pos.value
    mask = (masks.allowed(spec, positions, kv_pos) & (kv_pos >= 0)[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, cached_k.value, cached_v.value, mask=mask)


class DecoderBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask_inputs, rope_positions, deterministic: bool = True,
               cache_mode=None):
    c = self.cfg
    dt = c.compute_dtype
    pre = c.norm_placement == "pre"
    attn_norm, mlp_norm = layers.norm(c, "attn_norm"), layers.norm(c, "mlp_norm")
    h = attn_norm(x) if pre else x
    h = MultiHeadAttention(c, name="attn")(h, mask_inputs, rope_positions, cache_mode)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    if not pre:
      x = attn_norm(x)
    h = mlp_norm(x) if pre else x
    h = layers.Mlp(c.d_model, c.mlp_dim, c.mlp_activation, c.dropout_rate, dt,
                   use_bias=c.mlp_bias, name="mlp")(h, deterministic=deterministic)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    if not pre:
      x = mlp_norm(x)
    return nn.with_logical_constraint(x, _ACT)


class _ScannedBlock(DecoderBlock):
  """A block as nn.scan's body: (carry, broadcast args) -> (carry, no per-layer output)."""

  def __call__(self, x, mask_inputs, rope_positions, deterministic: bool = True,
               cache_mode=None):
    return super().__call__(x, mask_inputs, rope_positions, deterministic, cache_mode), None


def stack_blocks(params: dict) -> dict:
  """Per-layer params {block_0, ..., block_N-1} -> model.scan_layers' {"blocks": [N, ...]}."""
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  layers_ = [params[f"block_{i}"] for i in range(len(params) - len(rest))]
  return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers_)}


def unstack_blocks(params: dict) -> dict:
  """model.scan_layers' {"blocks": [N, ...]} -> per-layer {block_0, ..., block_N-1}, the layout
  fine-tuning, LoRA, int8, pruning and export read."""
  if "blocks" not in params:
    return params
  rest = {k: v for k, v in params.items() if k != "blocks"}
  n = jax.tree.leaves(params["blocks"])[0].shape[0]
  return {**rest, **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
                     for i in range(n)}}


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # save matmul outputs: XLA's dots (f32) and the bf16 projections, whose dots sit inside a
    # custom VJP that the dots policy cannot see (layers.low_precision_matmul)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(layers.PROJECTION_NAME)),
}


def pool(x, valid, how: str):
  """[B, T, D] states -> [B, D]: the mean over valid tokens, the last valid token's state
  (which, under causal attention, is the only one that has seen the whole input), or the first
  token's ([CLS] / <s> of a bidirectional encoder)."""
  if how == "cls":
    return x[:, 0].astype(jnp.float32)
  valid = valid.astype(jnp.float32)
  if how == "mean":
    total = jnp.einsum("btd,bt->bd", x.astype(jnp.float32), valid)
    return total / jnp.maximum(valid.sum(axis=1, keepdims=True), 1.0)
  last = jnp.maximum(valid.sum(axis=1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, vocab] (float32), or final hidden states; with
  cfg.num_classes > 0, a classifier: tokens -> class logits [B, num_classes]."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    self.embed = layers.Embed(c.vocab_size, c.d_model, c.compute_dtype, name="embed")
    if c.positions == "learned":
      self.pos_embed = positions_lib.LearnedPositions(c.max_len, c.d_model, c.compute_dtype)
    if c.type_vocab_size:
      self.type_embed = layers.Embed(c.type_vocab_size, c.d_model, c.compute_dtype,
                                     axes=("types", "embed"), stddev=0.02, name="type_embed")
    if c.embed_norm:
      self.embed_norm = layers.norm(c, "embed_norm")
      self.embed_dropout = nn.Dropout(c.dropout_rate)
    block = _ScannedBlock if c.scan_layers else DecoderBlock
    if c.remat != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[c.remat], static_argnums=(4, 5))
    if c.scan_layers:
      # One traced block for every layer: compile time does not grow with depth (MaxText's
      # scan_layers). Each param gains a leading "layers" axis (replicated by the rules).
      self.blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})(c, name="blocks")
    else:
      self.blocks = [block(c, name=f"block_{i}") for i in range(c.num_layers)]
    if c.norm_placement == "pre":
      self.final_norm = layers.norm(c, "final_norm")
    if not c.tie_embeddings:
      self.lm_head = layers.Projection((c.vocab_size,), ("embed", "vocab"), c.d_model ** -0.5,
                                       c.compute_dtype, output_f32=True, name="lm_head")
    std = c.d_model ** -0.5
    if c.pooler != "none":   # part of the encoder (BERT's checkpoints carry it), used by a classifier
      self.pooler = layers.dense(c.d_model, ("embed", "pooled"), "pooler", jnp.float32, std, True)
    if c.num_classes:
      self.classifier_dropout = nn.Dropout(c.dropout_rate)
      if c.cls_hidden != "none":
        self.cls_hidden = layers.dense(c.d_model, ("embed", "pooled"), "cls_hidden", jnp.float32,
                                       std, True)
      self.cls_head = layers.Projection((c.num_classes,), ("embed", "classes"), std,
                                        jnp.float32, output_f32=True, use_bias=c.cls_bias,
                                        name="cls_head")

  def __call__(self, tokens, *, positions=None, segment_ids=None, prefix_len=None,
               pool_mask=None, deterministic: bool = True, return_hidden: bool = False,
               with_hidden: bool = False, cache_mode=None):
    """positions/segment_ids [B, T] (None: one document per row), prefix_len [B] (prefix-LM).

    A classifier pools over `pool_mask` [B, T] (default: segment_ids > 0, else every token).
    with_hidden: return (logits, final hidden states), e.g. for distillation.
    Right-padded rows need no segment_ids: under causal attention no real token sees the pads,
    so passing only pool_mask keeps the faster plain-causal attention path. A bidirectional
    model (causal=False) would see them: there pool_mask also masks attention."""
    c = self.cfg
    b, t = tokens.shape
    if not c.causal and segment_ids is None and pool_mask is not None:
      segment_ids = pool_mask.astype(jnp.int32)   # pads (0) attend only to pads
    x = self.embed(tokens)   # N(0, 1) rows: unit-scale inputs for the pre-norm blocks
    if c.embed_scale:
      x = x * jnp.asarray(c.d_model ** 0.5, x.dtype)
    pos = masks.default_positions(b, t) if positions is None else positions
    if c.positions == "learned":
      x = x + self.pos_embed(pos + c.position_offset if c.position_offset else pos)
    if c.type_vocab_size:   # every token is type 0 (one segment per input)
      x = x + self.type_embed.embedding[0].astype(x.dtype)
    if c.embed_norm:
      x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic)
    context = context_parallelism(self, cache_mode)
    zigzag = context_parallel.uses_zigzag(mask_spec(c))
    attn_pos, attn_seg = positions, segment_ids
    if context > 1:
      context_parallel.check_length(t, context, zigzag)
      layout = lambda a: None if a is None else context_parallel.to_layout(a, context, zigzag)
      x, pos, attn_seg = layout(x), layout(pos), layout(segment_ids)
      attn_pos = pos
    x = nn.with_logical_constraint(x, _ACT)
    mask_inputs = masks.MaskInputs(q_pos=attn_pos, kv_pos=attn_pos, q_seg=attn_seg,
                                   kv_seg=attn_seg, prefix_len=prefix_len)
    if cache_mode == "step":   # one token per row at `positions`; the cache holds the rest
      mask_inputs = None
    if c.scan_layers:
      x, _ = self.blocks(x, mask_inputs, pos, deterministic, cache_mode)
    else:
      for block in self.blocks:
        x = block(x, mask_inputs, pos, deterministic, cache_mode)
    if context > 1:
      x = nn.with_logical_constraint(context_parallel.from_layout(x, context, zigzag), _ACT)
    if c.norm_placement == "pre":
      x = self.final_norm(x)
    if c.pooler != "none" and not c.num_classes and self.is_initializing():
      self.pooler(x[:, 0].astype(jnp.float32))   # an encoder's pooler exists without a classifier
    if return_hidden:
      return x
    if c.num_classes:
      valid = pool_mask
      if valid is None:
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids > 0
      pooled = pool(x, valid, c.pooling)
      if c.pooler != "none":
        pooled = jnp.tanh(self.pooler(pooled))
      pooled = self.classifier_dropout(pooled, deterministic=deterministic)
      if c.cls_hidden != "none":
        hidden = self.cls_hidden(pooled)
        hidden = jnp.tanh(hidden) if c.cls_hidden == "tanh" else nn.relu(hidden)
        pooled = self.classifier_dropout(hidden, deterministic=deterministic)
      out = self.cls_head(pooled)
    else:
      out = self.head(x)
    return (out, x) if with_hidden else out

  def head(self, x):
    """Final hidden states [B, T, D] -> vocabulary logits [B, T, vocab] (float32)."""
    c = self.cfg
    if c.tie_embeddings:
      # Unit-rms states against N(0, 1) rows: scale by d^-1/2 so initial logits are ~N(0, 1).
      logits = self.embed.attend(x * jnp.asarray(c.d_model ** -0.5, x.dtype)
                                 if c.tied_head_rescale else x)
    else:
      logits = self.lm_head(x)
    if c.logit_softcap > 0:
      logits = c.logit_softcap * jnp.tanh(logits / c.logit_softcap)
    return nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                               "activation_vocab"))
