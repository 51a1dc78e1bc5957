"""Export: this codebase's model config -> the Hugging Face family it exports as, that
family's config.json and the safetensors files (train/hf/convert.py export; the tensor maps are
train/hf/families.py's)."""
import json
import os

from train.hf.families import ENCODERS, ConvertError


def _labels(n: int, labels: dict | None) -> dict:
  id2label = {str(i): (labels or {}).get(str(i), f"LABEL_{i}") for i in range(n)}
  return {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()},
          "problem_type": "single_label_classification"}


def architecture(family: str, m: dict) -> str:
  """The transformers class a run exports as: the family's base model (encoders), its causal LM
  (decoders) or its sequence classifier."""
  base = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma",
          "gpt2": "GPT2", "bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}[family]
  if m["num_classes"]:
    return base + "ForSequenceClassification"
  return base + ("Model" if family in ENCODERS else
                 "LMHeadModel" if family == "gpt2" else "ForCausalLM")


def _encoder_config(family: str, m: dict, vocab_size: int) -> dict:
  act = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}[m["mlp_activation"]]
  if family == "distilbert":
    return {"model_type": family, "vocab_size": vocab_size, "dim": m["d_model"],
            "n_layers": m["num_layers"], "n_heads": m["num_heads"], "hidden_dim": m["mlp_dim"],
            "activation": act, "max_position_embeddings": m["max_len"],
            "sinusoidal_pos_embds": False, "dropout": 0.1, "attention_dropout": 0.1,
            "seq_classif_dropout": 0.2, "qa_dropout": 0.1, "tie_weights_": True}
  cfg = {"model_type": family, "vocab_size": vocab_size, "hidden_size": m["d_model"],
         "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
         "intermediate_size": m["mlp_dim"], "hidden_act": act,
         "max_position_embeddings": m["max_len"], "type_vocab_size": m["type_vocab_size"],
         "layer_norm_eps": m["norm_eps"], "hidden_dropout_prob": 0.1,
         "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
         "classifier_dropout": None, "is_decoder": False}
  return cfg


def hf_config(family: str, m: dict, vocab_size: int, extra: dict,
              labels: dict | None = None) -> dict:
  """config.json for `family` from config.model `m` (a plain dict); extra: token ids etc.;
  labels: a classifier's id2label (default LABEL_i)."""
  cfg = _hf_config(family, m, vocab_size, extra)
  cfg["architectures"] = [architecture(family, m)]
  if m["num_classes"]:
    cfg.update(_labels(m["num_classes"], labels))
  return cfg


def _hf_config(family: str, m: dict, vocab_size: int, extra: dict) -> dict:
  if family in ENCODERS:
    cfg = _encoder_config(family, m, vocab_size)
    if family == "roberta":   # positions start after padding_idx (pad_token_id)
      extra = {**extra, "pad_token_id": m["position_offset"] - 1}
  elif family == "gpt2":
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
    if m["rope_scaling"] != "none":
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
      cfg["attention_bias"] = m["out_bias"]
    if family == "llama":
      cfg["mlp_bias"] = m["mlp_bias"]
    if family == "mistral":
      attn = m["attention"]
      cfg["sliding_window"] = attn["window"] if attn["kind"] == "local" else None
    if family == "qwen2":
      cfg["use_sliding_window"] = False
  cfg.update({k: v for k, v in extra.items() if v is not None})
  cfg["torch_dtype"] = cfg["dtype"] = "float32"
  return cfg


def check_exportable(family: str, m: dict):
  """ConvertError when a model (config.model dict, with num_classes) has a part the family's
  transformers class cannot hold: the classifier's pooling and head shape."""
  n = m["num_classes"]
  if not n:
    return
  pooling, pooler = m["pooling"], m["pooler"]
  hidden, bias = m["cls_hidden"], m["cls_bias"]
  if family in ENCODERS:
    want = {"bert": ("tanh", "none"), "roberta": ("none", "tanh"),
            "distilbert": ("none", "relu")}[family]
    if pooling != "cls" or (pooler, hidden) != want or not bias:
      raise ConvertError(f"a {family} classifier exports with its own head only (pooling=cls, "
                         f"pooler={want[0]}, cls_hidden={want[1]}, cls_bias=True); this one has "
                         f"pooling={pooling}, pooler={pooler}, cls_hidden={hidden}, "
                         f"cls_bias={bias}")
  elif pooling != "last" or pooler != "none" or hidden != "none" or bias:
    raise ConvertError(
        f"a decoder classifier exports as {architecture(family, m)} only with its head: the "
        f"last token's state -> one linear layer without bias (model.pooling=last, pooler=none, "
        f"cls_hidden=none, cls_bias=False); this one has pooling={pooling}, pooler={pooler}, "
        f"cls_hidden={hidden}, cls_bias={bias} (fine-tune with --config.model.pooling=last)")


def _encoder_family(m: dict) -> str:
  shape = (m["positions"] == "learned" and m["norm"] == "layernorm"
           and m["norm_bias"] and m["norm_placement"] == "post"
           and m["qkv_bias"] and m["out_bias"] and m["mlp_bias"]
           and m["embed_norm"] and m["tie_embeddings"]
           and m["mlp_activation"] in ("gelu", "gelu_exact", "relu")
           and m["num_kv_heads"] == m["num_heads"]
           and m["head_dim"] * m["num_heads"] == m["d_model"]
           and m["attention"]["kind"] != "local")
  if not shape:
    raise ConvertError("a bidirectional model exports as BERT / RoBERTa / DistilBERT only "
                       "(learned positions, post-LN LayerNorm with biases, biases on every "
                       "projection, embedding norm, plain MLP, tied embedding)")
  if m["position_offset"]:
    return "roberta"
  if m["type_vocab_size"]:
    return "bert"
  if m["norm_eps"] != 1e-12 or m["pooler"] != "none":
    raise ConvertError("an encoder without token-type embeddings exports as DistilBERT only "
                       "(LayerNorm eps 1e-12, no pooler)")
  return "distilbert"


def export_family(m: dict) -> str:
  """The HF family a model (config.model dict) exports as; ConvertError if none fits."""
  attn = m["attention"]
  if attn["num_global"]:
    raise ConvertError("model.attention.num_global > 0 has no Hugging Face equivalent")
  if not m["causal"]:
    return _encoder_family(m)
  if m["type_vocab_size"] or m["embed_norm"] or m["position_offset"]:
    raise ConvertError("token-type embeddings, an embedding norm and a position offset export "
                       "with the encoders (model.causal=False) only")
  if m["norm_placement"] != "pre" or not m["causal"]:
    raise ConvertError("only causal pre-norm decoders export")
  if m["logit_softcap"]:
    raise ConvertError("model.logit_softcap has no equivalent in the exported families")
  if m["positions"] == "learned":
    if (m["norm"] == "layernorm" and m["qkv_bias"] and m["out_bias"]
        and m["mlp_bias"] and m["norm_bias"] and m["tie_embeddings"]
        and m["mlp_activation"] in ("gelu", "gelu_exact", "relu")
        and m["num_kv_heads"] == m["num_heads"] and m["head_dim"] * m["num_heads"] == m["d_model"]):
      return "gpt2"
    raise ConvertError("a model with learned positions exports as GPT-2 only (layernorm with "
                       "biases, biases on every projection, plain GELU MLP, tied head)")
  if m["norm"] != "rmsnorm":
    raise ConvertError("a RoPE model exports with RMSNorm only (Llama / Mistral / Qwen2 / Gemma)")
  if m["norm_plus_one"] or m["embed_scale"]:
    if (m["norm_plus_one"] and m["embed_scale"] and
        m["mlp_activation"] == "geglu" and m["tie_embeddings"]):
      return "gemma"
    raise ConvertError("(1 + w) norms and embedding scale export as Gemma only (with geglu MLP "
                       "and a tied head)")
  if m["mlp_activation"] != "swiglu":
    raise ConvertError(f"model.mlp_activation={m['mlp_activation']!r} with RoPE exports only "
                       "as swiglu (Llama-style) or geglu (Gemma)")
  if attn["kind"] == "local":
    return "mistral"
  if m["qkv_bias"] and not m["out_bias"] and not m["mlp_bias"]:
    return "qwen2"
  if m["qkv_bias"] != m["out_bias"]:
    raise ConvertError("q/k/v biases without an output bias export as Qwen2 only (no MLP bias)")
  return "llama"


def write_safetensors(tensors: dict, out: str, shard_size_mb: int) -> int:
  """model.safetensors in `out`, or shards of at most shard_size_mb and their index; returns
  how many files."""
  from safetensors.numpy import save_file
  limit = shard_size_mb << 20
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > limit:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
      weight_map.update({name: file for name in shard})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": weight_map}, f, indent=2)
  return len(shards)
