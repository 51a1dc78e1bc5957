"""Hugging Face import/export (train/hf/convert.py) and tokenizers (model/tokenizer.HFTokenizer)
against transformers itself, on small random models built from configs (nothing downloaded).

Per family (f32): logits equal transformers' (max abs diff <= 1e-4, KL <= 1e-6) on unpacked and
packed rows; 32 greedy tokens identical (infer/decode.py vs generate(do_sample=False)); the
export loads in transformers with identical logits; import -> export -> import is bit-identical.
Needs requirements-hf.txt (transformers, torch); skipped without it.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip(
    "transformers", reason="transformers is a test-only requirement: pip install -r "
    "requirements-hf.txt")
torch = pytest.importorskip("torch", reason="torch: pip install -r requirements-hf.txt")
tokenizers = pytest.importorskip("tokenizers")

from infer import decode, loading  # noqa: E402
from model import tokenizer as tokenizer_lib  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train.hf import convert  # noqa: E402
from hf_models import (TEXT, VOCAB, make_hf, make_hf_encoder, train_encoder_tokenizer,  # noqa: E402
                       train_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 48
pytestmark = pytest.mark.slow   # builds, converts and runs models in two frameworks

def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _compare(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  diff = float(np.max(np.abs(ours - theirs)))
  lp = lambda x: x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1,
                                   keepdims=True)) - x.max(-1, keepdims=True)
  p_log, q_log = lp(theirs), lp(ours)
  kl = float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))
  return diff, kl


def _params(workdir):
  run = loading.open_run(workdir)
  model = Transformer(run.model_config())
  return run, model, loading.restore_params(run, model)


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gemma")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family, tmp_path):
  hf_dir = str(tmp_path / "hf")
  hf_model = make_hf(family, hf_dir)
  summary = convert.import_hf(hf_dir, str(tmp_path / "run"), seq_len=64)
  assert summary["family"] == family
  run, model, params = _params(str(tmp_path / "run"))
  rng = np.random.default_rng(1)

  # Unpacked: two full rows.
  ids = rng.integers(4, VOCAB, size=(2, SEQ))
  ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
  diff, kl = _compare(ours, _hf_logits(hf_model, ids))
  print(f"{family} unpacked: max|diff| {diff:.2e}, KL {kl:.2e}")
  assert diff <= 1e-4 and kl <= 1e-6, (diff, kl)

  # Packed: two documents in one row (positions restart, segments keep them apart).
  a, b = ids[0, :20], ids[1, :28]
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1] * 20 + [2] * 28])
  pos = np.array([list(range(20)) + list(range(28))])
  ours = model.apply({"params": params}, jnp.asarray(packed, jnp.int32),
                     positions=jnp.asarray(pos, jnp.int32), segment_ids=jnp.asarray(seg, jnp.int32))
  theirs = np.concatenate([_hf_logits(hf_model, a[None]), _hf_logits(hf_model, b[None])], 1)
  diff, kl = _compare(ours, theirs)
  print(f"{family} packed: max|diff| {diff:.2e}, KL {kl:.2e}")
  assert diff <= 1e-4 and kl <= 1e-6, (diff, kl)

  # 32 greedy tokens: the KV-cache decoder vs transformers' generate.
  prompt = [int(x) for x in rng.integers(4, VOCAB, size=8)]
  tokens, prompt_len = decode.pack_prompts([prompt], 32)
  mine = np.asarray(decode.greedy(model, params, tokens, prompt_len, max_new=32, eos_id=3,
                                  prefix_lm=False))[0].tolist()
  with torch.no_grad():
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                               eos_token_id=3, pad_token_id=0)[0, 8:].tolist()
  n = len(decode.strip(mine, 3)) + (1 if 3 in mine else 0)
  assert mine[:n] == theirs[:n] and n == min(len(theirs), 32), (mine, theirs)

  # Export -> transformers loads it, identical logits.
  out = str(tmp_path / "export")
  convert.export_hf(str(tmp_path / "run"), out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf_model, ids))
  auto_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert auto_tok(TEXT)["input_ids"] == transformers.AutoTokenizer.from_pretrained(hf_dir)(
      TEXT)["input_ids"]

  # Import the export: bit-identical parameters.
  convert.import_hf(out, str(tmp_path / "run2"), seq_len=64)
  _, _, params2 = _params(str(tmp_path / "run2"))
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_imported_run_loads_everywhere(tmp_path):
  """The imported run is a run: LoadedModel (its HF tokenizer), generate, and the metadata."""
  hf_dir = str(tmp_path / "hf")
  make_hf("llama", hf_dir)
  convert.import_hf(hf_dir, str(tmp_path / "run"), seq_len=64)
  loaded = loading.LoadedModel.from_workdir(str(tmp_path / "run"))
  assert isinstance(loaded.tokenizer, tokenizer_lib.HFTokenizer)
  assert loaded.kind == "pretrain"
  (text,) = loaded.generate(["The licensee"], max_new=8)
  assert isinstance(text, str)
  meta = loading.open_run(str(tmp_path / "run")).meta
  assert meta["tokenizer"]["kind"] == "hf" and meta["tokenizer"]["chat_template"]
  assert meta["tokenizer"]["special_tokens"]["eos_token"] == "</s>"
  assert meta["imported_from"]["family"] == "llama"


def test_native_run_exports_as_llama(tmp_path):
  """A model trained here (tied head with its d^-1/2 scale) exports as Llama-style with the
  same logits in transformers."""
  from configs import common
  import ml_collections
  from model import checkpoint as checkpoint_lib
  from model.config import ModelConfig
  config = common.base_config()
  config.data.vocab_size = VOCAB
  config.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
  cfg = ModelConfig.from_config(config.model, VOCAB)
  model = Transformer(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  workdir = str(tmp_path / "native")
  tok_dir = str(tmp_path / "tok")
  train_tokenizer(tok_dir, "metaspace")
  meta = {"config": json.loads(ml_collections.ConfigDict(config).to_json_best_effort()),
          "tokenizer_path": os.path.join(tok_dir, "tokenizer.json"), "vocab_size": VOCAB}
  ckpt = checkpoint_lib.Checkpointer(workdir, every=1, keep=1, async_save=False)
  ckpt.save(5, {"params": params}, None, meta, force=True)
  ckpt.close()
  out = str(tmp_path / "export")
  assert convert.export_hf(workdir, out)["family"] == "llama"
  hf = transformers.AutoModelForCausalLM.from_pretrained(out)
  ids = np.random.default_rng(0).integers(4, VOCAB, size=(2, 24))
  diff, kl = _compare(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)),
                      _hf_logits(hf, ids))
  assert diff <= 1e-4 and kl <= 1e-6, (diff, kl)


ENCODERS = ("bert", "roberta", "distilbert")


def _padded(ids: list[list[int]], pad: int):
  """Right-padded [B, T] ids with `pad` and the attention mask, as AutoTokenizer pads."""
  t = max(len(r) for r in ids)
  mask = np.array([[1] * len(r) + [0] * (t - len(r)) for r in ids])
  return np.array([r + [pad] * (t - len(r)) for r in ids]), mask


def _check_close(ours, theirs, what):
  diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
  print(f"{what}: max|diff| {diff:.2e}")
  assert diff <= 1e-4, (what, diff)


def _import_one_device(hf_dir, workdir):
  """import_hf onto one device: Orbax writes a parameter replicated over the 8 test devices in
  8 compiled slices, which made the save most of an encoder test's time (the decoder tests
  cover placement over the 8-device mesh)."""
  from configs import common
  from model import sharding as sharding_lib
  mesh = sharding_lib.make_mesh(common.base_config().mesh, jax.devices()[:1])
  return convert.import_hf(hf_dir, workdir, seq_len=64, mesh=mesh)


def _round_trip(tmp_path, params, auto, reference, inputs):
  """Export -> `auto` loads it with outputs equal to `reference`'s on `inputs` (and the same
  tokenizer ids) -> import again: bit-identical parameters."""
  out = str(tmp_path / "export")
  convert.export_hf(str(tmp_path / "run"), out)
  reloaded = auto.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    got, want = reloaded(**inputs), reference(**inputs)
  key = "logits" if hasattr(want, "logits") else "last_hidden_state"
  np.testing.assert_array_equal(getattr(got, key).numpy(), getattr(want, key).numpy())
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert transformers.AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == hf_tok(
      TEXT)["input_ids"]
  _import_one_device(out, str(tmp_path / "run2"))
  _, _, params2 = _params(str(tmp_path / "run2"))
  jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_matches_transformers(family, tmp_path):
  """Final hidden states of an imported BertModel / RobertaModel / DistilBertModel: full rows,
  right-padded rows (pads masked), packed documents; export -> AutoModel; round trip."""
  hf_model = make_hf_encoder(family, str(tmp_path / "hf"))
  summary = _import_one_device(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert (summary["family"], summary["task"]) == (family, "pretrain")
  run, model, params = _params(str(tmp_path / "run"))
  assert run.model_config().causal is False
  pad = hf_model.config.pad_token_id
  rng = np.random.default_rng(1)
  rows = [[int(x) for x in rng.integers(5, VOCAB, size=n)] for n in (40, 23)]
  ids, mask = _padded(rows, pad)
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
                      ).last_hidden_state.numpy()
  ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                     pool_mask=jnp.asarray(mask > 0), return_hidden=True)
  _check_close(np.asarray(ours)[mask > 0], theirs[mask > 0], f"{family} padded rows")

  # Packed: both documents in one row (positions restart, segments keep them apart).
  packed = np.array([rows[0] + rows[1]])
  seg = np.array([[1] * 40 + [2] * 23])
  pos = np.array([list(range(40)) + list(range(23))])
  ours = model.apply({"params": params}, jnp.asarray(packed, jnp.int32),
                     positions=jnp.asarray(pos, jnp.int32), segment_ids=jnp.asarray(seg, jnp.int32),
                     return_hidden=True)
  with torch.no_grad():
    alone = [hf_model(input_ids=torch.tensor([r])).last_hidden_state[0].numpy() for r in rows]
  _check_close(ours[0], np.concatenate(alone), f"{family} packed")
  _round_trip(tmp_path, params, transformers.AutoModel, hf_model,
              {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})
  if family == "bert":   # bert-base-uncased's own file names LayerNorm weights gamma / beta
    from safetensors.numpy import load_file, save_file
    path = str(tmp_path / "hf" / "model.safetensors")
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"): v for k, v in load_file(path).items()}, path)
    _import_one_device(str(tmp_path / "hf"), str(tmp_path / "run3"))
    jax.tree.map(np.testing.assert_array_equal, params, _params(str(tmp_path / "run3"))[2])


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_classifier_matches_transformers(family, tmp_path):
  """An imported *ForSequenceClassification (3 labels) is a classifier run whose LoadedModel
  gives AutoModelForSequenceClassification's probabilities on texts its AutoTokenizer frames
  and pads; its export loads there with identical logits; round trip bit-identical."""
  hf_model = make_hf_encoder(family, str(tmp_path / "hf"), num_labels=3)
  summary = _import_one_device(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert (summary["family"], summary["task"]) == (family, "classify")
  run, model, params = _params(str(tmp_path / "run"))
  loaded = loading.LoadedModel.from_workdir(str(tmp_path / "run"))
  assert loaded.kind == "classify"
  # A run fine-tuned or distilled from it (no imported_from record) exports as the family too.
  from train.hf import export as hf_export
  assert hf_export.export_family(dict(run.meta["config"]["model"])) == family
  texts = [TEXT[:60], "naïve café 東京", TEXT[40:90].upper(), "x"]   # each fits in 64 ids
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  batch = hf_tok(texts, padding=True, return_tensors="pt")
  assert [loaded.tokenizer.encode_framed(t, 64, "head") for t in texts] == [
      hf_tok(t)["input_ids"] for t in texts]
  with torch.no_grad():
    logits = hf_model(**batch).logits.numpy()
  _check_close(loaded.classify(texts), jax.nn.softmax(logits), f"{family} classifier probs")
  ours = model.apply({"params": params}, jnp.asarray(batch["input_ids"].numpy(), jnp.int32),
                     pool_mask=jnp.asarray(batch["attention_mask"].numpy() > 0))
  _check_close(ours, logits, f"{family} classifier logits")
  _round_trip(tmp_path, params, transformers.AutoModelForSequenceClassification, hf_model,
              dict(batch))


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_decoder_classifier_matches_transformers(family, tmp_path):
  """Qwen2ForSequenceClassification / GPT2ForSequenceClassification: the last real token's state
  through `score` (pooling=last); right-padded rows; export and round trip."""
  hf_model = make_hf(family, str(tmp_path / "hf"), num_labels=3)
  summary = _import_one_device(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert (summary["task"], loading.open_run(str(tmp_path / "run")).config.model.pooling) == (
      "classify", "last")
  _, model, params = _params(str(tmp_path / "run"))
  rng = np.random.default_rng(2)
  ids, mask = _padded([[int(x) for x in rng.integers(4, VOCAB, size=n)] for n in (30, 17)], 0)
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(ids)).logits.numpy()   # finds the last non-pad
  ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                     pool_mask=jnp.asarray(mask > 0))
  _check_close(ours, logits, f"{family} classifier logits")
  _round_trip(tmp_path, params, transformers.AutoModelForSequenceClassification, hf_model,
              {"input_ids": torch.tensor(ids)})
  # A classifier fine-tuned with this codebase's mean pooling has no transformers equivalent.
  from train.hf import export as hf_export
  m = dict(loading.open_run(str(tmp_path / "run")).meta["config"]["model"], pooling="mean")
  with pytest.raises(hf_export.ConvertError, match="pooling=last"):
    hf_export.check_exportable(family, m)


def _strings(n: int) -> list[str]:
  rng = np.random.default_rng(0)
  pieces = TEXT.split(" ") + ["\u00a0", "\u200b", "\t\t", "\n", "   ", "", "ß", "İ", "ﬁ",
                               "𝔘𝔫𝔦", "한국어", "عربى", "<s>", "</s>", "<pad>"]
  out = []
  for i in range(n):
    k = int(rng.integers(1, 40))
    seps = rng.choice([" ", "  ", "\n", "\t", "", " \n "], size=k)
    out.append("".join(str(p) + str(s) for p, s in zip(rng.choice(pieces, size=k), seps)))
  out += [TEXT * 50, " " * 300, "\n" * 20 + "x", ""]   # long documents, whitespace runs
  return out


@pytest.mark.parametrize("style", ["bytelevel", "metaspace", "bert", "roberta"])
def test_tokenizer_ids_match_autotokenizer(style, tmp_path):
  """bytelevel / metaspace: BPEs trained here (GPT-2 / Llama 2 styles); bert: a WordPiece
  vocabulary (uncased, accents stripped, CJK split) and roberta: a byte-level BPE, each turned
  into tokenizer.json by transformers' own BertTokenizer / RobertaTokenizer, as downloaded."""
  encoder = style in ("bert", "roberta")
  if encoder:
    train_encoder_tokenizer(str(tmp_path), style)
  else:
    train_tokenizer(str(tmp_path), style)
  ours = tokenizer_lib.load_tokenizer(str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  strings = _strings(3000)
  for text in strings:
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), repr(text)
    assert ours.encode_with_specials(text) == theirs(text)["input_ids"], repr(text)
    if encoder:   # the classify framing ([CLS] text [SEP] / <s> text </s>) is the family's own
      assert ours.encode_framed(text, 10**6, "head") == theirs(text)["input_ids"], repr(text)
  sample = strings[:200]
  assert [ours.decode(ours.encode(t)) for t in sample] == [
      theirs.decode(theirs.encode(t, add_special_tokens=False), skip_special_tokens=True)
      for t in sample]
  if encoder:
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.cls_token_id, theirs.sep_token_id,
                                                       theirs.pad_token_id)
  else:
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                       theirs.pad_token_id)
  assert ours.chat_template == theirs.chat_template


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "train.hf.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_import_errors_are_one_line_and_leave_nothing(tmp_path):
  from safetensors.numpy import load_file, save_file
  hf_dir = str(tmp_path / "hf")
  make_hf("qwen2", hf_dir)
  work = tmp_path / "runs"
  work.mkdir()

  def check(expect: str):
    result = _cli("import", f"--hf_dir={hf_dir}", f"--workdir={work / 'x'}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and expect in last[0], result.stderr[-2000:]
    assert os.listdir(work) == []

  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  missing = dict(tensors)
  del missing["model.layers.1.self_attn.k_proj.bias"]
  save_file(missing, os.path.join(hf_dir, "model.safetensors"))
  check("model.layers.1.self_attn.k_proj.bias is missing")
  wrong = dict(tensors)
  wrong["model.layers.0.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
  save_file(wrong, os.path.join(hf_dir, "model.safetensors"))
  check("model.layers.0.mlp.up_proj.weight has shape [95, 64]")
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  json.dump(dict(cfg, model_type="falcon"), open(os.path.join(hf_dir, "config.json"), "w"))
  check("supported families: llama, mistral, qwen2, gemma, gpt2")


def test_sharded_checkpoint_and_bf16(tmp_path):
  """Sharded safetensors with an index, stored in bfloat16, import like one f32 file."""
  hf_dir = str(tmp_path / "hf")
  model = make_hf("llama", hf_dir)
  sharded = str(tmp_path / "sharded")
  model.to(torch.bfloat16).save_pretrained(sharded, safe_serialization=True,
                                           max_shard_size="100KB")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.link(os.path.join(hf_dir, name), os.path.join(sharded, name))
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  convert.import_hf(sharded, str(tmp_path / "run"), seq_len=64)
  _, _, params = _params(str(tmp_path / "run"))
  want = model.state_dict()["model.layers.1.self_attn.q_proj.weight"].float().numpy()
  got = np.asarray(params["block_1"]["attn"]["query"]["kernel"]).reshape(64, -1).T
  np.testing.assert_array_equal(got, want)
  # ... and export shards above the size asked for.
  out = str(tmp_path / "export")
  assert convert.export_hf(str(tmp_path / "run"), out, shard_size_mb=0)["shards"] > 1
  transformers.AutoModelForCausalLM.from_pretrained(out)



def _train_steps(config, steps: int) -> tuple[list[float], dict]:
  """(losses, parameters) of `steps` train steps on the first batch of `config`'s data, built
  through the one factory and started as train.main starts a run (train.init_from restored,
  the teacher added), on one device."""
  from model import sharding as sharding_lib
  from train import build, run as run_lib
  from train import inputs as inputs_lib
  config, sources = build.resolve(config)
  parts = build.build(config, sharding_lib.make_mesh(config.mesh, jax.devices()[:1]))
  state = run_lib._start_state(parts, sources, None, None, None)
  batch = next(inputs_lib.make(config, sources, None).train_iter)
  batch = jax.device_put(batch, sharding_lib.batch_sharding(parts.mesh))
  step, out = parts.compile_train_step(batch), []
  for _ in range(steps):
    state, metrics = step(state, batch)
    out.append(float(metrics["loss"]))
  return out, parts.eval_params(state.params)


def _encoders(tmp_path, *names):
  """Imported random encoders, one layer each, weights of std 0.2 (not 0.02) so the random
  [CLS] states of different inputs differ enough to fit: name -> workdir."""
  specs = {"bert": ("bert", 0), "teacher": ("bert", 2), "distilbert": ("distilbert", 0)}
  for name in names:
    family, labels = specs[name]
    make_hf_encoder(family, str(tmp_path / f"hf_{name}"), num_labels=labels, init_range=0.2,
                    layers=1)
    _import_one_device(str(tmp_path / f"hf_{name}"), str(tmp_path / name))


def test_imported_bert_fine_tunes_on_classify(sentiment_files, tmp_path):
  """"Fine-tune bert-base": a classifier started from an imported BERT (its architecture,
  pooler, [CLS] pooling and tokenizer adopted by train.init_from) learns on the classify task:
  the loss falls over six steps on one batch (32-token rows: compiling is most of the time)."""
  from helpers import _sentiment_config
  _encoders(tmp_path, "bert")
  config = _sentiment_config(sentiment_files, tmp_path / "cache")
  config.train.init_from = str(tmp_path / "bert")
  config.model.dropout_rate = 0.0   # one batch, repeated: dropout's noise would hide the trend
  config.data.seq_len = 32
  config.optim.update(lr=1e-3, warmup_steps=1)
  losses, params = _train_steps(config, 6)
  print("BERT fine-tune losses", np.round(losses, 3))
  assert losses[-1] < 0.85 * losses[0], losses
  assert {"pooler", "type_embed", "embed_norm", "cls_head"} <= set(params)


def test_imported_bert_distils_into_imported_distilbert(sentiment_files, tmp_path):
  """"... distil into DistilBERT": a student started from an imported DistilBERT
  (train.init_from) learns from an imported BERT classifier (distill.teacher) on the distill
  task: the loss falls over six steps on one batch."""
  from configs import sentiment_distill
  _encoders(tmp_path, "teacher", "distilbert")
  config = sentiment_distill.get_config("tiny")
  config.data.update(train_file=str(sentiment_files / "train.jsonl.gz"),
                     data_dir=str(tmp_path / "cache"), seq_len=32)
  config.distill.teacher = str(tmp_path / "teacher")
  config.train.init_from = str(tmp_path / "distilbert")
  config.model.dropout_rate = 0.0
  config.optim.update(lr=1e-3, warmup_steps=1)
  losses, params = _train_steps(config, 6)
  print("DistilBERT student losses", np.round(losses, 3))
  assert losses[-1] < 0.85 * losses[0], losses
  assert {"cls_hidden", "cls_head", "embed_norm"} <= set(params) and "type_embed" not in params


def test_init_from_adopts_mistral_window(sentiment_files, tmp_path):
  """A fine-tune started from an imported Mistral computes what Mistral computes: its sliding
  window (attention kind local + window) is adopted like the rest of the architecture; a full /
  blocked choice of the fine-tuning config stands for a model without a window."""
  from helpers import _sentiment_config
  from train import build
  make_hf("mistral", str(tmp_path / "hf"))
  _import_one_device(str(tmp_path / "hf"), str(tmp_path / "mistral"))
  config = _sentiment_config(sentiment_files, tmp_path / "cache")
  config.train.init_from = str(tmp_path / "mistral")
  resolved, _ = build.resolve(config)
  assert (resolved.model.attention.kind, resolved.model.attention.window) == ("local", 16)
  assert resolved.model.num_kv_heads == 1 and resolved.model.pooling == "mean"
  make_hf("qwen2", str(tmp_path / "hf_qwen"))
  _import_one_device(str(tmp_path / "hf_qwen"), str(tmp_path / "qwen"))
  config.train.init_from = str(tmp_path / "qwen")
  config.model.attention.kind = "blocked"
  resolved, _ = build.resolve(config)
  assert resolved.model.attention.kind == "blocked"
