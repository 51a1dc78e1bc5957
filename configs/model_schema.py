"""The model's config keys, declared once: name, default, allowed values and one line of help.

Everything else reads this table: configs/common.py builds `config.model` from it,
model/config.py builds ModelConfig's fields and checks, train/build.py derives the keys a
fine-tune adopts from its `train.init_from` run (and the teachers of one distillation share),
and the Hugging Face converter fills an imported model's keys through the same schema. Plain
data: configs/ imports nothing outside itself.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Key:
  name: str
  default: object              # its type is the key's type (ml_collections checks overrides)
  help: str
  choices: tuple = ()          # allowed values; () = any value of the default's type
  minimum: int | None = None   # smallest allowed value of a number
  # True: part of what the model computes, so a fine-tune adopts it from its train.init_from
  # run; False: the fine-tune's own choice (precision, memory, regularisation, its head).
  architecture: bool = True


MODEL_KEYS = (
    Key("num_layers", 6, "decoder (or encoder) blocks", minimum=1),
    Key("d_model", 512, "width of the residual stream", minimum=1),
    Key("num_heads", 8, "query heads", minimum=1),
    Key("num_kv_heads", 8, "key/value heads: < num_heads is GQA, 1 is MQA", minimum=1),
    Key("head_dim", 64, "width of one head", minimum=1),
    Key("mlp_dim", 2048, "hidden width of the MLP", minimum=1),
    # gelu = tanh-approximate GELU (GPT-2's gelu_new); gelu_exact = erf GELU (BERT);
    # geglu = gated tanh-GELU (Gemma); swiglu = gated SiLU (Llama).
    Key("mlp_activation", "swiglu", "MLP activation",
        ("swiglu", "gelu", "gelu_exact", "geglu", "relu")),
    Key("positions", "rope", "position encoding", ("rope", "learned")),
    Key("rope_theta", 10_000.0, "RoPE base frequency"),
    Key("max_len", 8192, "table size for learned positions", minimum=1),
    Key("tie_embeddings", True, "the LM head reuses the token embedding"),
    Key("dtype", "float32", "compute dtype (params stay float32)", ("float32", "bfloat16"),
        architecture=False),
    Key("remat", "none", "rematerialisation: dots saves matmul outputs only",
        ("none", "full", "dots"), architecture=False),
    # Checkpoints of a scanned model hold "blocks", not block_0..N-1
    # (model.transformer.unstack_blocks converts).
    Key("scan_layers", False, "stack the blocks' params [layers, ...] and run them under one "
        "nn.scan: compile time and program size do not grow with depth", architecture=False),
    Key("dropout_rate", 0.0, "dropout on the residual branches", architecture=False),
    Key("num_classes", 0, "> 0 adds a classifier head on the pooled final state", minimum=0,
        architecture=False),
    Key("pooling", "mean", "classifier pooling: mean (over tokens) | last | cls (first)",
        ("mean", "last", "cls"), architecture=False),
    # Switches for the families the HF converter imports (Llama, Mistral, Qwen2, GPT-2, Gemma,
    # BERT, RoBERTa, DistilBERT); the defaults are this codebase's own decoder.
    Key("norm", "rmsnorm", "normalisation layer", ("rmsnorm", "layernorm")),
    Key("norm_eps", 1e-6, "epsilon of every norm"),
    Key("norm_bias", False, "layernorm with a bias (GPT-2, BERT)"),
    Key("norm_plus_one", False, "RMSNorm scales by (1 + w), w initialised at 0 (Gemma)"),
    Key("norm_placement", "pre", "pre: x + f(norm(x)) | post: norm(x + f(x)) (BERT)",
        ("pre", "post")),
    Key("qkv_bias", False, "biases on the query/key/value projections (Qwen2, GPT-2)"),
    Key("out_bias", False, "bias on the attention output projection (GPT-2)"),
    Key("mlp_bias", False, "biases on the MLP projections (GPT-2)"),
    Key("rope_scaling", "none", "RoPE frequency scaling (llama3: Llama 3.1 frequency bands)",
        ("none", "linear", "llama3")),
    Key("rope_scaling_factor", 1.0, "rope_scaling: the context extension factor"),
    Key("rope_low_freq_factor", 1.0, "rope_scaling=llama3: low-frequency band edge"),
    Key("rope_high_freq_factor", 4.0, "rope_scaling=llama3: high-frequency band edge"),
    Key("rope_original_max_len", 8192, "rope_scaling=llama3: the pre-extension context"),
    Key("embed_scale", False, "multiply embeddings by sqrt(d_model) (Gemma)"),
    Key("tied_head_rescale", True, "tied head scales states by d_model^-1/2 (ours; HF: False)"),
    Key("logit_softcap", 0.0, "> 0: logits = cap * tanh(logits / cap)"),
    Key("causal", True, "False: bidirectional attention (encoders)"),
    # The encoders (BERT, RoBERTa, DistilBERT): embeddings and the family's classifier head.
    Key("type_vocab_size", 0, "> 0: token-type embeddings (inputs are all type 0)", minimum=0),
    Key("embed_norm", False, "norm (+ dropout) after the embedding sum (BERT family)"),
    Key("position_offset", 0, "learned positions start at this row (RoBERTa: pad id + 1)",
        minimum=0),
    Key("pooler", "none", "tanh: BERT's pooler (dense + tanh) on the pooled state",
        ("none", "tanh")),
    Key("cls_hidden", "none", "classifier hidden layer (dense + act): tanh (RoBERTa) | relu "
        "(DistilBERT)", ("none", "tanh", "relu")),
    Key("cls_bias", False, "bias on the classifier's output projection"),
)

# config.model.attention.*; ModelConfig holds them as attention_<name>. Which of them a
# fine-tune adopts is decided by kind (train/build.py: a sliding window is architecture, the
# choice between the exact kernels is not), so none is adopted as a plain key.
ATTENTION_KEYS = (
    Key("kind", "full", "the attention kernel registry key (model/attention KERNELS)",
        ("full", "local", "blocked"), architecture=False),
    Key("implementation", "auto", "auto (per backend) | xla | cudnn (model/attention/full.py)",
        ("auto", "xla", "cudnn"), architecture=False),
    Key("block_size", 128, "query/key block of the block-wise kernels", minimum=1,
        architecture=False),
    Key("window", 512, "kind=local: keys within this many positions", minimum=1,
        architecture=False),
    Key("num_global", 0, "first positions of each document seen by all", minimum=0,
        architecture=False),
)

ARCHITECTURE_KEYS = tuple(k.name for k in MODEL_KEYS if k.architecture)

