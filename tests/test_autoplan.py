"""The planner's search without a compiler: candidate meshes, the memory floor, the order it
compiles in, the ranking and the command it prints."""
import pytest

from bench import autoplan
from configs import legal_pretrain
from model.config import ModelConfig
from train import topologies


@pytest.fixture(name="llama")
def _llama():
  config = legal_pretrain.get_config("llama3_8b")
  return config, ModelConfig.from_config(config.model, config.data.vocab_size)


def test_meshes_respect_divisibility_and_list_every_axis(llama):
  config, model_cfg = llama
  limits = autoplan.axis_divides(config, model_cfg)
  assert limits["tensor"] == 8            # gcd(32 heads, 8 kv heads, 14336)
  found = [dict(m) for m in autoplan.meshes(("data", "fsdp", "tensor"), 256, 1, limits,
                                            batch=256, max_tensor=8)]
  assert {"data": 1, "fsdp": 256, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1} in found
  assert all(m["tensor"] in (1, 2, 4, 8) for m in found)
  assert all(256 % (m["data"] * m["fsdp"]) == 0 for m in found)
  assert len(found) == sum(1 for t in (1, 2, 4, 8) for d in range(1, 257)
                           if (256 // t) % d == 0)
  # Another axis is searched by listing it: a "context" axis splits the sequence.
  with_context = [dict(m) for m in autoplan.meshes(("data", "fsdp", "tensor", "context"), 16,
                                                   1, dict(limits, context=4096), 16, 8)]
  assert any(m["context"] == 4 for m in with_context)
  # An axis with no rule stays 1.
  assert all(m["other"] == 1 for m in map(dict, autoplan.meshes(
      ("data", "fsdp", "other"), 8, 1, {}, 8, 8)))


def test_multi_slice_meshes_put_data_or_fsdp_over_dcn(llama):
  config, model_cfg = llama
  found = [dict(m) for m in autoplan.meshes(("data", "fsdp", "tensor"), 64, 2,
                                            autoplan.axis_divides(config, model_cfg), 256, 8)]
  assert {"data": 1, "fsdp": 64, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1} in found
  assert {"data": 1, "fsdp": 64, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 2} in found


def test_memory_floor_drops_what_cannot_fit(llama):
  config, model_cfg = llama
  params = autoplan.param_count(model_cfg, config.data.vocab_size)
  assert abs(params - 8.03e9) / 8.03e9 < 0.01
  tokens = 256 * 4096
  mesh = (("data", 1), ("fsdp", 256), ("tensor", 1), ("dcn_data", 1), ("dcn_fsdp", 1))
  full = autoplan.memory_floor(autoplan.Plan(mesh, "full", 1), model_cfg, params, tokens, 256)
  none = autoplan.memory_floor(autoplan.Plan(mesh, "none", 1), model_cfg, params, tokens, 256)
  state = 16 * params / 256
  assert full == pytest.approx(state + 32 * 4096 * 4096 * 3)
  assert none > 16 * 2**30 > full       # the compiles: none needs 45 GiB, full 7.5
  replicated = (("data", 256), ("fsdp", 1), ("tensor", 1), ("dcn_data", 1), ("dcn_fsdp", 1))
  floor = autoplan.memory_floor(autoplan.Plan(replicated, "full", 1), model_cfg, params,
                                tokens, 256)
  assert floor > 16 * params         # unsharded AdamW state alone: 128 GB


def test_search_order_and_ranking():
  mesh_a, mesh_b = (("fsdp", 8),), (("fsdp", 4), ("tensor", 2))
  plans = [autoplan.Plan(m, r, 1) for m in (mesh_a, mesh_b) for r in ("none", "full")]
  cost = {(mesh_a, "none"): 3.0, (mesh_a, "full"): 4.0, (mesh_b, "none"): 1.0,
          (mesh_b, "full"): 2.0}
  order = autoplan.search_order(plans, lambda p: cost[(p.mesh, p.remat)])
  assert [m for m, _ in order] == [mesh_b, mesh_a]
  assert [p.remat for p in order[0][1]] == ["none", "full"]
  rows = [dict(fits=True, predicted_step_s=2.0, name="slow"),
          dict(fits=False, predicted_step_s=0.5, name="too big"),
          dict(fits=True, predicted_step_s=1.0, name="fast"), dict(error="timeout"),
          dict(fits=True, predicted_step_s=1.0002, total_bytes=5, name="as fast, less memory")]
  rows[2]["total_bytes"] = 9
  assert [r["name"] for r in autoplan.rank(rows)] == ["as fast, less memory", "fast", "slow"]


def test_report_prints_the_best_command():
  row = dict(fits=True, predicted_step_s=1.5, predicted_step_no_overlap_s=2.0, bound="compute",
             mfu_bound=0.7, remat="full", grad_accum_steps=2, total_bytes=8 * 2**30,
             mesh={"data": 1, "fsdp": 256, "tensor": 1},
             plan_mesh={"data": 1, "fsdp": 256, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1})
  text = autoplan.report([row], "llama3_8b", "v5e-256", {"seq_len": 0, "batch_size": 0}, 5)
  assert "1 of 5 compiled plans fit" in text
  assert "| fsdp 256 | full | 2 | 8.00 | 1500 / 2000 | compute | 70% |" in text
  assert ("best: python -m train.main --config=configs/legal_pretrain.py:llama3_8b "
          "--config.mesh.data=1 --config.mesh.fsdp=256 --config.mesh.tensor=1 "
          "--config.mesh.dcn_data=1 --config.mesh.dcn_fsdp=1 --config.model.remat=full "
          "--config.optim.grad_accum_steps=2") in text


def test_estimate_prefers_less_recompute():
  chip = topologies.CHIPS["v5e"]
  config = legal_pretrain.get_config("llama3_8b")
  model_cfg = ModelConfig.from_config(config.model, config.data.vocab_size)
  mesh = (("data", 1), ("fsdp", 256), ("tensor", 1), ("dcn_data", 1), ("dcn_fsdp", 1))
  est = {r: autoplan.estimate_s(autoplan.Plan(mesh, r, 1), chip, 5e16, 8e9, 2**20, 256,
                                model_cfg) for r in ("none", "dots", "full")}
  assert est["none"] < est["dots"] < est["full"]
  assert est["full"] - est["none"] == pytest.approx(5e16 / 3 / 256 / 197e12)
