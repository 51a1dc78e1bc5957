"""Hugging Face model families <-> this codebase's Transformer: config keys and tensor maps.

Each family turns an HF config.json into `config.model` keys (model/config.py switches) and
lists its tensors as `Entry`s: the HF tensor names, the parameter paths they become, and the
two layout changes (HF -> ours on import, ours -> HF on export). One entry may split one HF
tensor into several parameters (GPT-2's fused c_attn). train/hf/convert.py reads and writes
tensors entry by entry, so at most one entry's tensors are in host memory at a time.

Layouts: HF nn.Linear weights are [out, in]; our kernels are [in, *out] with heads split
([d_model, heads, head_dim]); GPT-2's Conv1D weights are already [in, out].
"""
import dataclasses
from typing import Callable

import numpy as np

from model import errors

DECODERS = ("llama", "mistral", "qwen2", "gemma", "gpt2")
ENCODERS = ("bert", "roberta", "distilbert")
FAMILIES = DECODERS + ENCODERS
# The prefix of the base model's tensors inside a task model (BertForSequenceClassification:
# bert.*); a base model saved alone (BertModel, LlamaModel) has none.
PREFIX = {"gpt2": "transformer.", "bert": "bert.", "roberta": "roberta.",
          "distilbert": "distilbert."}
# Checkpoint tensors no supported model reads: pre-training heads (BERT's MLM/NSP `cls.*`,
# RoBERTa's `lm_head.*`, DistilBERT's vocab_*), RoBERTa's pooler (its classifier has its own
# dense layer, as in transformers), buffers saved by old versions.
_IGNORED = {"bert": ("cls.", "bert.embeddings.position_ids", "embeddings.position_ids"),
            "roberta": ("lm_head.", "roberta.pooler.", "pooler.", "roberta.embeddings.position_ids",
                        "embeddings.position_ids"),
            "distilbert": ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.",
                           "distilbert.embeddings.position_ids", "embeddings.position_ids")}


class ConvertError(errors.UserError):
  """One line naming what cannot be converted (family, tensor, shapes)."""


@dataclasses.dataclass
class Entry:
  hf: tuple            # HF tensor names
  ours: tuple          # parameter paths, "block_0/attn/query/kernel"
  to_ours: Callable    # list of HF arrays -> list of our arrays
  to_hf: Callable      # list of our arrays -> list of HF arrays
  # How one HF tensor's rows land in the parameter, so that train/hf/convert.py converts it a
  # block of rows at a time: "same" (row i is row i), "linear" (row i of [out, in] is column i
  # of the kernel [in, out...]), "linear_in" (row i of [out, in] is the last-axis index i of the
  # kernel [in..., out]); None: converted whole with to_ours.
  layout: str | None = None


def _one(fn):
  return lambda xs: [fn(xs[0])]


def _same(hf, ours):
  return Entry((hf,), (ours,), _one(lambda x: x), _one(lambda x: x), "same")


def _linear(hf, ours, in_dim, out_shape):
  """nn.Linear [out, in] <-> kernel [in, *out_shape]."""
  n = int(np.prod(out_shape))
  return Entry((hf,), (ours,), _one(lambda w: w.T.reshape((in_dim,) + tuple(out_shape))),
               _one(lambda k: k.reshape(in_dim, n).T), "linear")


def _linear_in(hf, ours, in_shape, out_dim):
  """nn.Linear [out, in] <-> kernel [*in_shape, out] (the attention output projection)."""
  n = int(np.prod(in_shape))
  return Entry((hf,), (ours,), _one(lambda w: w.T.reshape(tuple(in_shape) + (out_dim,))),
               _one(lambda k: k.reshape(n, out_dim).T), "linear_in")


def hf_shape(layout: str, ours_shape: tuple) -> tuple:
  """The HF tensor's shape for a parameter of `ours_shape` converted with `layout`."""
  if layout == "same":
    return tuple(ours_shape)
  if layout == "linear":
    return (int(np.prod(ours_shape[1:])), ours_shape[0])
  return (ours_shape[-1], int(np.prod(ours_shape[:-1])))


def _bias(hf, ours, shape):
  n = int(np.prod(shape))
  return Entry((hf,), (ours,), _one(lambda b: b.reshape(shape)), _one(lambda b: b.reshape(n)))


def _get(cfg: dict, *keys, default=None):
  for key in keys:
    if cfg.get(key) is not None:
      return cfg[key]
  return default


def _rope(cfg: dict) -> dict:
  """rope_theta and scaling from a config of either transformers generation (v5 nests them in
  rope_parameters; v4 has rope_theta and rope_scaling)."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or {})
  theta = _get(params, "rope_theta", default=_get(cfg, "rope_theta", default=10_000.0))
  kind = _get(params, "rope_type", "type", default=_get(scaling, "rope_type", "type",
                                                         default="default"))
  src = params if params.get("factor") is not None else scaling
  out = {"rope_theta": float(theta)}
  if kind in ("default", None):
    return out
  if kind not in ("linear", "llama3"):
    raise ConvertError(f"rope scaling type {kind!r} is not supported (supported: default, "
                       "linear, llama3)")
  out.update(rope_scaling=kind, rope_scaling_factor=float(src["factor"]))
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(src.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(src.get("high_freq_factor", 4.0)),
               rope_original_max_len=int(src.get("original_max_position_embeddings", 8192)))
  return out


def _act(name: str, gated: bool) -> str:
  gelu_tanh = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
  if gated:
    if name in ("silu", "swish"):
      return "swiglu"
    if name in gelu_tanh:
      return "geglu"
  else:
    if name in gelu_tanh:
      return "gelu"
    if name == "gelu":
      return "gelu_exact"
    if name == "relu":
      return "relu"
  raise ConvertError(f"activation {name!r} ({'gated' if gated else 'plain'} MLP) is not "
                     "supported")


def family_of(cfg: dict) -> str:
  family = cfg.get("model_type")
  if family not in FAMILIES:
    raise ConvertError(f"model_type {family!r} (architectures {cfg.get('architectures')}) is "
                       f"not supported; supported families: {', '.join(FAMILIES)}")
  return family


def ignored(family: str, name: str) -> bool:
  """True for a checkpoint tensor the model does not use by design (see _IGNORED)."""
  if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
    return True
  if family in DECODERS and name == "lm_head.weight":   # tied: the embedding is the head
    return True
  return name.startswith(_IGNORED.get(family, ()))


def num_classes(cfg: dict) -> int:
  """Classes of a *ForSequenceClassification checkpoint; 0 for any other architecture (every
  config.json has id2label, base models too)."""
  if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or ()):
    return 0
  if cfg.get("problem_type") in ("regression", "multi_label_classification"):
    raise ConvertError(f"problem_type {cfg['problem_type']!r}: only single-label "
                       "classification converts (the classify task's softmax)")
  n = len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2))
  if n < 2:
    raise ConvertError(f"a classifier with {n} label (regression) does not convert")
  return n


def _encoder_keys(family: str, cfg: dict) -> dict:
  """The encoders: bidirectional post-LN blocks with biases everywhere, learned positions, an
  embedding LayerNorm, and the family's classifier head on the first token's state."""
  if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
    raise ConvertError(f"{family}: is_decoder / add_cross_attention checkpoints are not "
                       "supported (encoders only)")
  if family == "distilbert":
    d, heads = cfg["dim"], cfg["n_heads"]
    keys = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["n_layers"], d_model=d,
                num_heads=heads, mlp_dim=cfg["hidden_dim"],
                mlp_activation=_act(cfg.get("activation", "gelu"), False),
                max_len=cfg["max_position_embeddings"], norm_eps=1e-12,
                type_vocab_size=0, pooler="none", cls_hidden="relu")
  else:
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ConvertError(f"{family}: position_embedding_type "
                         f"{cfg['position_embedding_type']!r} is not supported (absolute only)")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    keys = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], d_model=d,
                num_heads=heads, mlp_dim=cfg["intermediate_size"],
                mlp_activation=_act(cfg.get("hidden_act", "gelu"), False),
                max_len=cfg["max_position_embeddings"],
                norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)))
    if family == "bert":
      keys.update(pooler="tanh", cls_hidden="none")
    else:   # positions count from padding_idx + 1 (transformers' create_position_ids...)
      keys.update(pooler="none", cls_hidden="tanh",
                  position_offset=int(cfg.get("pad_token_id", 1)) + 1)
  if d % heads:
    raise ConvertError(f"{family}: hidden size {d} is not a multiple of {heads} heads")
  keys.update(num_kv_heads=heads, head_dim=d // heads, positions="learned", tie_embeddings=True,
              tied_head_rescale=False, norm="layernorm", norm_bias=True,
              norm_placement="post", qkv_bias=True, out_bias=True, mlp_bias=True, causal=False,
              embed_norm=True, pooling="cls", cls_bias=True)
  return keys


def model_keys(cfg: dict) -> dict:
  """config.model keys (and data.vocab_size under 'vocab_size', num_classes for a
  *ForSequenceClassification checkpoint) for an HF config.json."""
  keys = _model_keys(cfg)
  n = num_classes(cfg)
  if n:
    keys["num_classes"] = n
    if keys.get("causal", True):   # transformers' decoder classifiers read the last token
      keys["pooling"] = "last"
  return keys


def _model_keys(cfg: dict) -> dict:
  family = family_of(cfg)
  if family in ENCODERS:
    return _encoder_keys(family, cfg)
  if family == "gpt2":
    d, heads = cfg["n_embd"], cfg["n_head"]
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
      raise ConvertError("gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are "
                         "not supported")
    return dict(vocab_size=cfg["vocab_size"], num_layers=cfg["n_layer"], d_model=d,
                num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                mlp_dim=cfg.get("n_inner") or 4 * d,
                mlp_activation=_act(cfg.get("activation_function", "gelu_new"), False),
                positions="learned", max_len=cfg["n_positions"], tie_embeddings=True,
                norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                norm_bias=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                tied_head_rescale=False)
  d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
  keys = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], d_model=d,
              num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
              head_dim=cfg.get("head_dim") or d // heads, mlp_dim=cfg["intermediate_size"],
              positions="rope", max_len=cfg.get("max_position_embeddings", 8192),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma")),
              norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
              tied_head_rescale=False, **_rope(cfg))
  act = _get(cfg, "hidden_activation", "hidden_act", default="silu")
  if family == "gemma":
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"   # Gemma's own default
    keys.update(norm_plus_one=True, embed_scale=True, tie_embeddings=True)
  keys["mlp_activation"] = _act(act, True)
  bias = bool(cfg.get("attention_bias", False))
  keys.update(qkv_bias=bias or family == "qwen2", out_bias=bias,
              mlp_bias=bool(cfg.get("mlp_bias", False)))
  window = cfg.get("sliding_window")
  if family == "qwen2" and not cfg.get("use_sliding_window", False):
    window = None
  if family == "qwen2" and window is not None:
    raise ConvertError("qwen2 with use_sliding_window=true (a window on some layers only) is "
                       "not supported")
  if window is not None and family == "mistral":
    keys["attention"] = {"kind": "local", "window": int(window)}
  if cfg.get("final_logit_softcapping"):
    keys["logit_softcap"] = float(cfg["final_logit_softcapping"])
  return keys


def _encoder_entries(family: str, m: dict) -> list[Entry]:
  d, h, hd, f = m["d_model"], m["num_heads"], m["head_dim"], m["mlp_dim"]
  p = PREFIX[family]
  e = p + "embeddings."
  out = [_same(e + "word_embeddings.weight", "embed/embedding"),
         _same(e + "position_embeddings.weight", "pos_embed/pos_embedding")]
  if m.get("type_vocab_size"):
    out.append(_same(e + "token_type_embeddings.weight", "type_embed/embedding"))
  out += [_same(e + "LayerNorm.weight", "embed_norm/scale"),
          _same(e + "LayerNorm.bias", "embed_norm/bias")]
  if family == "distilbert":
    names = dict(layer="transformer.layer.", q="attention.q_lin", k="attention.k_lin",
                 v="attention.v_lin", o="attention.out_lin", attn_norm="sa_layer_norm",
                 wi="ffn.lin1", wo="ffn.lin2", mlp_norm="output_layer_norm")
  else:
    names = dict(layer="encoder.layer.", q="attention.self.query", k="attention.self.key",
                 v="attention.self.value", o="attention.output.dense",
                 attn_norm="attention.output.LayerNorm", wi="intermediate.dense",
                 wo="output.dense", mlp_norm="output.LayerNorm")
  for i in range(m["num_layers"]):
    hp, bp = f"{p}{names['layer']}{i}.", f"block_{i}/"
    for ours in ("query", "key", "value"):
      hf = hp + names[ours[0]]
      out += [_linear(hf + ".weight", bp + f"attn/{ours}/kernel", d, (h, hd)),
              _bias(hf + ".bias", bp + f"attn/{ours}/bias", (h, hd))]
    out += [_linear_in(hp + names["o"] + ".weight", bp + "attn/out/kernel", (h, hd), d),
            _same(hp + names["o"] + ".bias", bp + "attn/out/bias"),
            _linear(hp + names["wi"] + ".weight", bp + "mlp/wi/kernel", d, (f,)),
            _same(hp + names["wi"] + ".bias", bp + "mlp/wi/bias"),
            _linear(hp + names["wo"] + ".weight", bp + "mlp/wo/kernel", f, (d,)),
            _same(hp + names["wo"] + ".bias", bp + "mlp/wo/bias")]
    for norm in ("attn_norm", "mlp_norm"):
      out += [_same(hp + names[norm] + ".weight", bp + f"{norm}/scale"),
              _same(hp + names[norm] + ".bias", bp + f"{norm}/bias")]
  if m["pooler"] != "none":
    out += [_linear(p + "pooler.dense.weight", "pooler/kernel", d, (d,)),
            _same(p + "pooler.dense.bias", "pooler/bias")]
  n = m["num_classes"]
  if n:
    hidden, head = {"bert": (None, "classifier"),
                    "roberta": ("classifier.dense", "classifier.out_proj"),
                    "distilbert": ("pre_classifier", "classifier")}[family]
    if hidden:
      out += [_linear(hidden + ".weight", "cls_hidden/kernel", d, (d,)),
              _same(hidden + ".bias", "cls_hidden/bias")]
    out += [_linear(head + ".weight", "cls_head/kernel", d, (n,)),
            _same(head + ".bias", "cls_head/bias")]
  return out


def _gpt2_entries(m: dict) -> list[Entry]:
  """GPT-2's tensors (fused q/k/v in c_attn, Conv1D weights already [in, out]), head aside."""
  d, h, hd = m["d_model"], m["num_heads"], m["head_dim"]
  out = []
  p = "transformer."
  out += [_same(p + "wte.weight", "embed/embedding"),
          _same(p + "wpe.weight", "pos_embed/pos_embedding")]
  for i in range(m["num_layers"]):
    hp, bp = f"{p}h.{i}.", f"block_{i}/"
    split_w = lambda w: [w[:, j * d:(j + 1) * d].reshape(d, h, hd) for j in range(3)]
    split_b = lambda b: [b[j * d:(j + 1) * d].reshape(h, hd) for j in range(3)]
    out += [
        _same(hp + "ln_1.weight", bp + "attn_norm/scale"),
        _same(hp + "ln_1.bias", bp + "attn_norm/bias"),
        Entry((hp + "attn.c_attn.weight",),
              tuple(bp + f"attn/{n}/kernel" for n in ("query", "key", "value")),
              lambda xs, f=split_w: f(xs[0]),
              lambda xs: [np.concatenate([x.reshape(d, d) for x in xs], axis=1)]),
        Entry((hp + "attn.c_attn.bias",),
              tuple(bp + f"attn/{n}/bias" for n in ("query", "key", "value")),
              lambda xs, f=split_b: f(xs[0]),
              lambda xs: [np.concatenate([x.reshape(d) for x in xs])]),
        Entry((hp + "attn.c_proj.weight",), (bp + "attn/out/kernel",),
              _one(lambda w: w.reshape(h, hd, d)), _one(lambda k: k.reshape(d, d))),
        _same(hp + "attn.c_proj.bias", bp + "attn/out/bias"),
        _same(hp + "ln_2.weight", bp + "mlp_norm/scale"),
        _same(hp + "ln_2.bias", bp + "mlp_norm/bias"),
        _same(hp + "mlp.c_fc.weight", bp + "mlp/wi/kernel"),
        _same(hp + "mlp.c_fc.bias", bp + "mlp/wi/bias"),
        _same(hp + "mlp.c_proj.weight", bp + "mlp/wo/kernel"),
        _same(hp + "mlp.c_proj.bias", bp + "mlp/wo/bias"),
    ]
  out += [_same(p + "ln_f.weight", "final_norm/scale"), _same(p + "ln_f.bias", "final_norm/bias")]
  return out


def entries(family: str, m: dict) -> list[Entry]:
  """Every tensor of the family for model keys `m` (as model_keys returns)."""
  if family in ENCODERS:
    return _encoder_entries(family, m)
  d, h, kv, hd = m["d_model"], m["num_heads"], m["num_kv_heads"], m["head_dim"]
  n = m["num_classes"]
  head = [_linear("score.weight", "cls_head/kernel", d, (n,))] if n else []
  if family == "gpt2":
    return _gpt2_entries(m) + head
  out = []
  p = "model."
  out.append(_same(p + "embed_tokens.weight", "embed/embedding"))
  for i in range(m["num_layers"]):
    hp, bp = f"{p}layers.{i}.", f"block_{i}/"
    a = hp + "self_attn."
    out += [_same(hp + "input_layernorm.weight", bp + "attn_norm/scale"),
            _linear(a + "q_proj.weight", bp + "attn/query/kernel", d, (h, hd)),
            _linear(a + "k_proj.weight", bp + "attn/key/kernel", d, (kv, hd)),
            _linear(a + "v_proj.weight", bp + "attn/value/kernel", d, (kv, hd)),
            _linear_in(a + "o_proj.weight", bp + "attn/out/kernel", (h, hd), d)]
    if m.get("qkv_bias"):
      out += [_bias(a + "q_proj.bias", bp + "attn/query/bias", (h, hd)),
              _bias(a + "k_proj.bias", bp + "attn/key/bias", (kv, hd)),
              _bias(a + "v_proj.bias", bp + "attn/value/bias", (kv, hd))]
    if m.get("out_bias"):
      out.append(_same(a + "o_proj.bias", bp + "attn/out/bias"))
    f = hp + "mlp."
    out += [_same(hp + "post_attention_layernorm.weight", bp + "mlp_norm/scale"),
            _linear(f + "gate_proj.weight", bp + "mlp/wg/kernel", d, (m["mlp_dim"],)),
            _linear(f + "up_proj.weight", bp + "mlp/wi/kernel", d, (m["mlp_dim"],)),
            _linear(f + "down_proj.weight", bp + "mlp/wo/kernel", m["mlp_dim"], (d,))]
    if m.get("mlp_bias"):
      out += [_same(f + "gate_proj.bias", bp + "mlp/wg/bias"),
              _same(f + "up_proj.bias", bp + "mlp/wi/bias"),
              _same(f + "down_proj.bias", bp + "mlp/wo/bias")]
  out.append(_same(p + "norm.weight", "final_norm/scale"))
  if not m["tie_embeddings"] and not n:
    out.append(_linear("lm_head.weight", "lm_head/kernel", d, (m["vocab_size"],)))
  return out + head
