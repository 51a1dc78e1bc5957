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


def make_hf(family: str, out: str):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family),
                                                        attn_implementation="eager")
  with torch.no_grad():   # random norms and biases, so every parameter matters
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "weight" in name and family != "gemma"
                                             else 0.0))
  model.eval()
  model.save_pretrained(out, safe_serialization=True)
  train_tokenizer(out, "bytelevel" if family in ("gpt2", "qwen2") else "metaspace")
  return model
