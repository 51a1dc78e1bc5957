"""A frozen, hashable view of `config.model` (Flax module attributes must be hashable)."""
import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CHOICES = {
    # gelu = tanh-approximate GELU (GPT-2's gelu_new); gelu_exact = erf GELU (BERT);
    # geglu = gated tanh-GELU (Gemma); swiglu = gated SiLU (Llama).
    "mlp_activation": ("swiglu", "gelu", "gelu_exact", "geglu", "relu"),
    "norm": ("rmsnorm", "layernorm"),
    "norm_placement": ("pre", "post"),
    "rope_scaling": ("none", "linear", "llama3"),
    "positions": ("rope", "learned"),
    "remat": ("none", "full", "dots"),
    "dtype": tuple(_DTYPES),
    "pooling": ("mean", "last", "cls"),
    "pooler": ("none", "tanh"),
    "cls_hidden": ("none", "tanh", "relu"),
}


# Keys a config may lack (runs written before they existed): their defaults apply.
_OPTIONAL = ("norm", "norm_eps", "norm_bias", "norm_plus_one", "norm_placement", "qkv_bias",
             "out_bias", "mlp_bias", "rope_scaling", "rope_scaling_factor",
             "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
             "embed_scale", "tied_head_rescale", "logit_softcap", "causal",
             "type_vocab_size", "embed_norm", "position_offset", "pooler", "cls_hidden",
             "cls_bias", "scan_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str = "swiglu"
  positions: str = "rope"
  rope_theta: float = 10_000.0
  max_len: int = 8192
  tie_embeddings: bool = True
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False        # blocks' params stacked [layers, ...], run under one scan
  dropout_rate: float = 0.0
  attention_kind: str = "full"
  attention_implementation: str = "auto"
  attention_block_size: int = 128
  attention_window: int = 512      # used by attention_kind="local" only
  attention_num_global: int = 0
  num_classes: int = 0             # > 0: the model is a classifier (pooled state -> classes)
  pooling: str = "mean"
  # Switches for imported families (train/convert.py); the defaults are this codebase's own
  # decoder, so existing configs build the same parameter tree and the same numbers.
  norm: str = "rmsnorm"            # rmsnorm | layernorm
  norm_eps: float = 1e-6
  norm_bias: bool = False          # layernorm with a bias (GPT-2, BERT)
  norm_plus_one: bool = False      # RMSNorm scales by (1 + w), w initialised at 0 (Gemma)
  norm_placement: str = "pre"      # pre (x + f(norm(x))) | post (norm(x + f(x)), BERT)
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  rope_scaling: str = "none"       # none | linear | llama3
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  embed_scale: bool = False        # multiply embeddings by sqrt(d_model) (Gemma)
  tied_head_rescale: bool = True   # tied head scales states by d_model^-1/2 (ours; HF: False)
  logit_softcap: float = 0.0       # > 0: logits = cap * tanh(logits / cap)
  causal: bool = True              # False: bidirectional (encoders)
  # The encoder families (BERT, RoBERTa, DistilBERT): embeddings and classifier head.
  type_vocab_size: int = 0         # > 0: token-type embeddings (every token type 0)
  embed_norm: bool = False         # norm (+ dropout) after the embedding sum (BERT family)
  position_offset: int = 0         # learned positions start at this row (RoBERTa: pad id + 1)
  pooler: str = "none"             # tanh: BERT's pooler (dense + tanh) on the pooled state
  cls_hidden: str = "none"         # classifier hidden layer (dense + act): RoBERTa tanh,
                                   # DistilBERT relu
  cls_bias: bool = False           # bias on the classifier's output projection

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> "ModelConfig":
    m = model_cfg
    attn = m.attention
    out = cls(vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
              num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
              mlp_dim=m.mlp_dim, mlp_activation=m.mlp_activation, positions=m.positions,
              rope_theta=m.rope_theta, max_len=m.max_len, tie_embeddings=m.tie_embeddings,
              dtype=m.dtype, remat=m.remat, dropout_rate=m.dropout_rate,
              attention_kind=attn.kind, attention_implementation=attn.implementation,
              attention_block_size=attn.block_size, attention_window=attn.window,
              attention_num_global=attn.num_global, num_classes=m.num_classes,
              pooling=m.pooling,
              **{f.name: m.get(f.name, f.default) for f in dataclasses.fields(cls)
                 if f.name in _OPTIONAL})
    out.validate()
    return out

  def validate(self):
    for key, choices in _CHOICES.items():
      if getattr(self, key) not in choices:
        raise ValueError(f"config.model.{key}={getattr(self, key)!r}; expected one of {choices}")
    if self.norm_plus_one and self.norm != "rmsnorm":
      raise ValueError("config.model.norm_plus_one needs config.model.norm='rmsnorm'")
    if self.norm_bias and self.norm != "layernorm":
      raise ValueError("config.model.norm_bias needs config.model.norm='layernorm'")
    if self.type_vocab_size < 0 or self.position_offset < 0:
      raise ValueError("config.model.type_vocab_size and position_offset must be >= 0")
    if self.position_offset and self.positions != "learned":
      raise ValueError("config.model.position_offset needs config.model.positions='learned'")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} must be a multiple of "
                       f"config.model.num_kv_heads={self.num_kv_heads}")
    if self.num_classes < 0 or self.num_classes == 1:
      raise ValueError(f"config.model.num_classes={self.num_classes}: expected 0 (language "
                       "model) or at least 2 classes")
    for key, low in (("block_size", 1), ("window", 1), ("num_global", 0)):
      if getattr(self, f"attention_{key}") < low:
        raise ValueError(f"config.model.attention.{key}={getattr(self, f'attention_{key}')} "
                         f"must be >= {low}")
    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim"):
      if getattr(self, key) <= 0:
        raise ValueError(f"config.model.{key}={getattr(self, key)} must be positive")
