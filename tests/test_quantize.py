"""infer/ptq.py (quantization) on a tiny Transformer classifier with random parameters.

Why these checks: a quantized model must (1) stay close to the float one, (2) really hold int8
(not a float model that only rounds), (3) in w8a8, run its projections as int8 x int8 -> int32
matmuls, where weight-only dequantizes first, and (4) come back from disk bit for bit, since
serving runs what was saved.
"""
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import ptq as quantize_lib
from model.transformer import Transformer
from tests import helpers

# qwix 0.1.8 checks for nnx.VariableState, which this Flax deprecates, on every parameter.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

INT8_MODES = ("int8_weight_only", "w8a8")
# Per layer (SwiGLU): query, key, value, out, wi, wg, wo.
PROJECTIONS_PER_LAYER = 7


@pytest.fixture(scope="module")
def setup():
  cfg = helpers.tiny_model_cfg(num_classes=2)
  model = Transformer(cfg)
  tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, (64, 24)).astype(np.int32)
  params = helpers.numpy_params(model, tokens)
  reference = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))
  return model, params, tokens, reference


@pytest.fixture(scope="module")
def quantized(setup):
  """{mode: (model to apply, params)} for every mode, built once."""
  model, params, tokens, _ = setup
  return {mode: quantize_lib.quantize(model, params, mode, tokens[:1])
          for mode in quantize_lib.MODES}


def _forward(qmodel, qparams, tokens):
  return np.asarray(jax.jit(lambda p, t: qmodel.apply({"params": p}, t))(qparams, tokens))


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mode, max_rel_error", [("f32", 1e-6), ("bf16", 0.02),
                                                 ("int8_weight_only", 0.05), ("w8a8", 0.05)])
def test_outputs_close_to_float32(setup, quantized, mode, max_rel_error):
  _, _, tokens, reference = setup
  out = _forward(*quantized[mode], tokens)
  assert out.shape == reference.shape == (64, 2) and out.dtype == np.float32
  rel_error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
  assert rel_error < max_rel_error, (mode, rel_error)
  assert np.mean(out.argmax(-1) == reference.argmax(-1)) >= 0.95
  if mode != "f32":   # reduced precision did take effect: not the float model unchanged
    assert rel_error > 1e-4, (mode, rel_error)


def test_projection_kernels_are_int8_and_4x_smaller(setup, quantized):
  model, params, _, _ = setup
  num_layers = model.cfg.num_layers
  float_leaves = _flat(params)
  for mode in INT8_MODES:
    leaves = _flat(quantized[mode][1])
    qvalues = {k: v for k, v in leaves.items() if k.endswith(".qvalue")}
    scales = {k: v for k, v in leaves.items() if k.endswith(".scale")
              and "norm" not in k}
    assert len(qvalues) == len(scales) == PROJECTIONS_PER_LAYER * num_layers
    assert all(v.dtype == jnp.int8 for v in qvalues.values())
    assert all(v.dtype == jnp.float32 for v in scales.values())
    # One scale per output channel: the contracted (first) axis is reduced to 1.
    wo = "['block_0']['mlp']['wo']['kernel'].array"
    assert scales[wo + ".scale"].shape == (1, model.cfg.d_model)
    # The float leaves (embedding, norms, classifier head) are untouched.
    for name in ("['embed']['embedding']", "['cls_head']['kernel']",
                 "['block_1']['attn_norm']['scale']"):
      np.testing.assert_array_equal(leaves[name], float_leaves[name])
    kernel_f32 = sum(v.nbytes for k, v in float_leaves.items()
                     if re.search(quantize_lib.QUANTIZED_MODULES, k.replace("']['", "/")))
    kernel_int8 = sum(v.nbytes for v in qvalues.values())
    kernel_scales = sum(v.nbytes for v in scales.values())
    assert kernel_int8 * 4 == kernel_f32
    # d_model 32: a float32 scale per output channel costs 4/32 of the int8 bytes.
    assert 3.5 < kernel_f32 / (kernel_int8 + kernel_scales) < 4
  # Both int8 modes store the same weights; they differ only in how they multiply.
  jax.tree.map(np.testing.assert_array_equal, quantized["w8a8"][1],
               quantized["int8_weight_only"][1])


def test_w8a8_multiplies_in_int8_weight_only_in_float(setup, quantized):
  model, _, tokens, _ = setup
  int_dots = {}
  for mode in INT8_MODES:
    qmodel, qparams = quantized[mode]
    jaxpr = str(jax.make_jaxpr(lambda p, t: qmodel.apply({"params": p}, t))(qparams, tokens))
    int_dots[mode] = len(re.findall(r"i32\[[\d,]*\] = dot_general", jaxpr))
  assert int_dots == {"int8_weight_only": 0,
                      "w8a8": PROJECTIONS_PER_LAYER * model.cfg.num_layers}


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_language_model_head(tie_embeddings):
  """A tied LM head shares the embedding table, so it stays float; an untied one is int8.
  Either way the logits are float32, as the float model's, under bfloat16 compute too."""
  cfg = helpers.tiny_model_cfg(tie_embeddings=tie_embeddings)
  model = Transformer(cfg)
  tokens = np.random.default_rng(2).integers(1, cfg.vocab_size, (4, 16)).astype(np.int32)
  params = helpers.numpy_params(model, tokens)
  reference = _forward(model, params, tokens)
  bf16_model = Transformer(dataclasses.replace(cfg, dtype="bfloat16"))
  qmodel, qparams = quantize_lib.quantize(bf16_model, params, "w8a8", tokens[:1])
  leaves = _flat(qparams)
  assert leaves["['embed']['embedding']"].dtype == jnp.float32
  assert ("['lm_head']['kernel'].array.qvalue" in leaves) == (not tie_embeddings)
  out = _forward(qmodel, qparams, tokens)
  assert out.dtype == np.float32 and out.shape == reference.shape == (4, 16, cfg.vocab_size)
  rel_error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
  assert 1e-4 < rel_error < 0.05, rel_error


@pytest.mark.parametrize("mode", ["w8a8", "bf16"])
def test_save_load_round_trip_is_bit_identical(setup, quantized, tmp_path, mode):
  _, _, tokens, _ = setup
  qmodel, qparams = quantized[mode]
  meta = {"mode": mode, "model_config": dataclasses.asdict(qmodel.cfg), "note": "test"}
  quantize_lib.save(str(tmp_path / mode), qparams, meta)
  loaded_model, loaded_params, loaded_meta = quantize_lib.load(str(tmp_path / mode))
  assert loaded_meta == meta
  assert jax.tree.structure(loaded_params) == jax.tree.structure(qparams)
  saved, restored = _flat(qparams), _flat(loaded_params)
  assert saved.keys() == restored.keys()
  for name, value in saved.items():
    assert restored[name].dtype == value.dtype, name
    np.testing.assert_array_equal(restored[name], value, err_msg=name)
  np.testing.assert_array_equal(_forward(loaded_model, loaded_params, tokens),
                                _forward(qmodel, qparams, tokens))


def test_int8_checkpoint_is_smaller_on_disk(tmp_path):
  # Wide enough (1 layer, d_model 256) that Orbax's per-array metadata does not hide the data.
  model = Transformer(helpers.tiny_model_cfg(num_layers=1, d_model=256, num_heads=4,
                                             num_kv_heads=4, head_dim=64, mlp_dim=1024,
                                             num_classes=2))
  tokens = np.ones((1, 8), np.int32)
  params = helpers.numpy_params(model, tokens)
  sizes, in_memory = {}, {}
  for mode in ("f32", "w8a8"):
    qmodel, qparams = quantize_lib.quantize(model, params, mode, tokens)
    quantize_lib.save(str(tmp_path / mode), qparams,
                      {"mode": mode, "model_config": dataclasses.asdict(qmodel.cfg)})
    in_memory[mode] = quantize_lib.param_bytes(qparams)
    sizes[mode] = sum(os.path.getsize(os.path.join(root, name))
                      for root, _, names in os.walk(tmp_path / mode) for name in names)
  assert 3.7 < in_memory["f32"] / in_memory["w8a8"] < 4
  assert sizes["f32"] / sizes["w8a8"] > 3.5, sizes


def test_clear_errors(setup, tmp_path):
  model, params, tokens, _ = setup
  with pytest.raises(ValueError, match="'int4'.*expected one of"):
    quantize_lib.quantize(model, params, "int4", tokens[:1])
  with pytest.raises(ValueError, match="model_config"):
    quantize_lib.save(str(tmp_path / "x"), params, {"mode": "f32"})
  with pytest.raises(FileNotFoundError, match="not a quantized checkpoint"):
    quantize_lib.load(str(tmp_path))
