"""Hugging Face model families <-> this codebase's Transformer: config keys and tensor maps.

Each family turns an HF config.json into `config.model` keys (model/config.py switches) and
lists its tensors as `Entry`s: the HF tensor names, the parameter paths they become, and the
two layout changes (HF -> ours on import, ours -> HF on export). One entry may split one HF
tensor into several parameters (GPT-2's fused c_attn). train/convert.py reads and writes
tensors entry by entry, so at most one entry's tensors are in host memory at a time.

Layouts: HF nn.Linear weights are [out, in]; our kernels are [in, *out] with heads split
([d_model, heads, head_dim]); GPT-2's Conv1D weights are already [in, out].
"""
import dataclasses
from typing import Callable

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")


class ConvertError(ValueError):
  """One line naming what cannot be converted (family, tensor, shapes)."""


@dataclasses.dataclass
class Entry:
  hf: tuple            # HF tensor names
  ours: tuple          # parameter paths, "block_0/attn/query/kernel"
  to_ours: Callable    # list of HF arrays -> list of our arrays
  to_hf: Callable      # list of our arrays -> list of HF arrays
  # How one HF tensor's rows land in the parameter, so that train/convert.py converts it a
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


def model_keys(cfg: dict) -> dict:
  """config.model keys (and data.vocab_size under 'vocab_size') for an HF config.json."""
  family = family_of(cfg)
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


def entries(family: str, m: dict) -> list[Entry]:
  """Every tensor of the family for model keys `m` (as model_keys returns)."""
  d, h, kv, hd = m["d_model"], m["num_heads"], m["num_kv_heads"], m["head_dim"]
  out = []
  if family == "gpt2":
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
  if not m["tie_embeddings"]:
    out.append(_linear("lm_head.weight", "lm_head/kernel", d, (m["vocab_size"],)))
  return out


# --- export: our config -> an HF config.json -------------------------------------------------
def hf_config(family: str, m: dict, vocab_size: int, extra: dict) -> dict:
  """config.json for `family` from config.model `m` (a plain dict); extra: token ids etc."""
  if family == "gpt2":
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
           "n_embd": m["d_model"], "n_layer": m["num_layers"], "n_head": m["num_heads"],
           "n_positions": m["max_len"], "n_inner": m["mlp_dim"],
           "activation_function": {"gelu": "gelu_new", "gelu_exact": "gelu",
                                   "relu": "relu"}[m["mlp_activation"]],
           "layer_norm_epsilon": m["norm_eps"], "resid_pdrop": 0.0, "embd_pdrop": 0.0,
           "attn_pdrop": 0.0, "tie_word_embeddings": True}
  else:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[family]
    act = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}[m["mlp_activation"]]
    rope = {"rope_type": "default", "rope_theta": m["rope_theta"]}
    if m.get("rope_scaling", "none") != "none":
      rope.update(rope_type=m["rope_scaling"], factor=m["rope_scaling_factor"])
      if m["rope_scaling"] == "llama3":
        rope.update(low_freq_factor=m["rope_low_freq_factor"],
                    high_freq_factor=m["rope_high_freq_factor"],
                    original_max_position_embeddings=m["rope_original_max_len"])
    cfg = {"architectures": [arch], "model_type": family, "vocab_size": vocab_size,
           "hidden_size": m["d_model"], "intermediate_size": m["mlp_dim"],
           "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
           "num_key_value_heads": m["num_kv_heads"], "head_dim": m["head_dim"],
           "max_position_embeddings": m["max_len"], "rms_norm_eps": m["norm_eps"],
           "tie_word_embeddings": m["tie_embeddings"], "attention_dropout": 0.0,
           # both spellings: transformers v5 reads rope_parameters, v4 rope_theta/rope_scaling
           "rope_parameters": rope, "rope_theta": m["rope_theta"]}
    if rope["rope_type"] != "default":
      cfg["rope_scaling"] = rope
    if family == "gemma":
      cfg["hidden_activation"] = act
    else:
      cfg["hidden_act"] = act
    if family in ("llama", "gemma"):
      cfg["attention_bias"] = m.get("out_bias", False)
    if family == "llama":
      cfg["mlp_bias"] = m.get("mlp_bias", False)
    if family == "mistral":
      attn = m.get("attention", {})
      cfg["sliding_window"] = attn.get("window") if attn.get("kind") == "local" else None
    if family == "qwen2":
      cfg["use_sliding_window"] = False
  cfg.update({k: v for k, v in extra.items() if v is not None})
  cfg["torch_dtype"] = cfg["dtype"] = "float32"
  return cfg


def export_family(m: dict) -> str:
  """The HF family a model (config.model dict) exports as; ConvertError if none fits."""
  get = lambda k, default: m.get(k, default)
  attn = get("attention", {})
  if attn.get("num_global", 0):
    raise ConvertError("model.attention.num_global > 0 has no Hugging Face equivalent")
  if get("norm_placement", "pre") != "pre" or not get("causal", True):
    raise ConvertError("only causal pre-norm decoders export")
  if get("logit_softcap", 0.0):
    raise ConvertError("model.logit_softcap has no equivalent in the exported families")
  if get("positions", "rope") == "learned":
    if (get("norm", "rmsnorm") == "layernorm" and get("qkv_bias", False) and get("out_bias", False)
        and get("mlp_bias", False) and get("norm_bias", False) and get("tie_embeddings", True)
        and m["mlp_activation"] in ("gelu", "gelu_exact", "relu")
        and m["num_kv_heads"] == m["num_heads"] and m["head_dim"] * m["num_heads"] == m["d_model"]):
      return "gpt2"
    raise ConvertError("a model with learned positions exports as GPT-2 only (layernorm with "
                       "biases, biases on every projection, plain GELU MLP, tied head)")
  if get("norm", "rmsnorm") != "rmsnorm":
    raise ConvertError("a RoPE model exports with RMSNorm only (Llama / Mistral / Qwen2 / Gemma)")
  if get("norm_plus_one", False) or get("embed_scale", False):
    if (get("norm_plus_one", False) and get("embed_scale", False) and
        m["mlp_activation"] == "geglu" and get("tie_embeddings", True)):
      return "gemma"
    raise ConvertError("(1 + w) norms and embedding scale export as Gemma only (with geglu MLP "
                       "and a tied head)")
  if m["mlp_activation"] != "swiglu":
    raise ConvertError(f"model.mlp_activation={m['mlp_activation']!r} with RoPE exports only "
                       "as swiglu (Llama-style) or geglu (Gemma)")
  if attn.get("kind", "full") == "local":
    return "mistral"
  if get("qkv_bias", False) and not get("out_bias", False) and not get("mlp_bias", False):
    return "qwen2"
  if get("qkv_bias", False) != get("out_bias", False):
    raise ConvertError("q/k/v biases without an output bias export as Qwen2 only (no MLP bias)")
  return "llama"
