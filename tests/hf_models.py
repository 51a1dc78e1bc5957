"""Small random Hugging Face models and tokenizers built locally (nothing downloaded), shared by
tests/test_hf_convert.py and tests/test_harness.py. Needs requirements-hf.txt."""
import tokenizers
import torch
import transformers

VOCAB = 512

TEXT = ("The licensee shall indemnify the licensor against all claims, damages and costs. "
         "Ünïcödé façade — naïve café, 東京 とうきょう, Привет мир, emoji 🙂🚀, tabs\tand\n\nnew "
         "lines,   runs   of    spaces, numbers 12345 67.89, URLs https://example.com/a?b=c. ")


def train_tokenizer(out: str, style: str):
  """A small BPE trained here, saved as transformers saves a fast tokenizer."""
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
  if style == "bytelevel":   # GPT-2 / Llama 3 / Qwen2 style
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:                      # sentencepiece-like (Llama 2 / Mistral / Gemma): metaspace + bytes
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
  special = ["<pad>", "<unk>", "<s>", "</s>"]
  bytelevel = style == "bytelevel"
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB - 8 if bytelevel else 200,
                                           special_tokens=special,
                                           initial_alphabet=alphabet if bytelevel else [])
  tok.train_from_iterator([TEXT * 3, TEXT.lower(), TEXT.upper()] * 20, trainer)
  if not bytelevel:   # byte-fallback pieces, as in a converted sentencepiece model
    tok.add_tokens(alphabet)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>")
  fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  fast.save_pretrained(out)


def train_encoder_tokenizer(out: str, family: str):
  """A BERT WordPiece (uncased, [CLS] text [SEP]; built from TEXT) or RoBERTa byte-level BPE
  (<s> text </s>; trained here) vocabulary, saved by transformers' own tokenizer class as a
  download has it (tokenizer.json built by transformers from the vocabulary,
  tokenizer_config.json)."""
  from tokenizers import models, pre_tokenizers, trainers
  if family in ("bert", "distilbert"):
    cls = transformers.DistilBertTokenizer if family == "distilbert" else transformers.BertTokenizer
    cls(vocab=_wordpiece_vocab(TEXT)).save_pretrained(out)
    return
  corpus = [TEXT * 3, TEXT.lower(), TEXT.upper()] * 20
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=VOCAB - 8, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.model.save(out)
  transformers.RobertaTokenizer(vocab=f"{out}/vocab.json", merges=f"{out}/merges.txt"
                                ).save_pretrained(out)


def _wordpiece_vocab(text: str) -> dict[str, int]:
  """A BERT vocabulary built, not trained: the special tokens, every character of the uncased,
  accent-stripped text alone and as a "##" continuation, then its whole words, each group
  sorted. WordPieceTrainer breaks frequency ties in hash order, so its vocabulary (and every
  id, hence the models' embeddings rows) changed from one process to the next."""
  from tokenizers import normalizers, pre_tokenizers
  normalized = normalizers.BertNormalizer(lowercase=True).normalize_str(text)
  words = sorted({w for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalized)})
  chars = sorted({c for w in words for c in w})
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars),
            *(w for w in words if len(w) > 1)]
  return {t: i for i, t in enumerate(list(dict.fromkeys(tokens))[:VOCAB])}


def encoder_config(family: str, num_labels: int = 2, layers: int = 2):
  if family == "bert":
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=128, type_vocab_size=2, pad_token_id=0,
        num_labels=num_labels)
  if family == "roberta":   # positions 0, 1 unused: 128 + 2 rows, as roberta-base's 514
    return transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, num_labels=num_labels)
  if family == "distilbert":
    return transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=layers, n_heads=4, hidden_dim=96,
        max_position_embeddings=128, pad_token_id=0, num_labels=num_labels)
  raise ValueError(family)


def make_hf_encoder(family: str, out: str, num_labels: int = 0, init_range: float = 0.02,
                    layers: int = 2):
  """A random encoder (num_labels 0: the base model, e.g. BertModel) or sequence classifier,
  saved with its tokenizer. init_range: the std of its weights (transformers' 0.02 leaves the
  [CLS] states of different inputs nearly equal; fine-tuning tests want them apart)."""
  torch.manual_seed(0)
  cfg = encoder_config(family, max(num_labels, 2), layers)
  cfg.initializer_range = init_range
  model = _build_and_save(cfg, transformers.AutoModelForSequenceClassification if num_labels
                          else transformers.AutoModel, family, out)
  train_encoder_tokenizer(out, family)
  return model


def _build_and_save(cfg, auto, family: str, out: str):
  """`auto` built from `cfg` with random norms and biases, in eval mode, saved to `out`."""
  model = auto.from_config(cfg, attn_implementation="eager")
  _randomise_vectors(model, family)
  model.eval()
  model.save_pretrained(out, safe_serialization=True)
  return model


def _randomise_vectors(model, family):
  with torch.no_grad():   # random norms and biases, so every parameter matters
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "weight" in name and family != "gemma"
                                             else 0.0))


def hf_config(family: str):
  common = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=3, pad_token_id=0)
  if family == "llama":   # GQA, untied head, Llama 3.1 rope scaling
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}, **common)
  if family == "mistral":   # sliding window shorter than the sequence
    return transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=16,
        tie_word_embeddings=False, **common)
  if family == "qwen2":     # q/k/v biases, tied head
    return transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
  if family == "gemma":     # head_dim != d_model / heads, (1 + w) norms, geglu, embed scale
    return transformers.GemmaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, **common)
  if family == "gpt2":
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                   vocab_size=VOCAB, bos_token_id=2, eos_token_id=3)
  raise ValueError(family)


def make_hf(family: str, out: str, num_labels: int = 0):
  """A random decoder LM, or (num_labels > 0) its *ForSequenceClassification."""
  torch.manual_seed(0)
  cfg = hf_config(family)
  if num_labels:
    cfg.num_labels = num_labels
    cfg.pad_token_id = 0
  model = _build_and_save(cfg, transformers.AutoModelForSequenceClassification if num_labels
                          else transformers.AutoModelForCausalLM, family, out)
  train_tokenizer(out, "bytelevel" if family in ("gpt2", "qwen2") else "metaspace")
  return model
