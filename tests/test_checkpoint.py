"""Tests of model/checkpoint.py: bit-identical round trips of the sharded TrainState (same mesh
and a different one), metadata, retention and the data-iterator state.

The state has the real TrainState structure (tiny model, AdamW from train/optim.py) but its
values are numpy draws placed with the real shardings: that exercises every leaf kind (float
params/moments, int32 step and counts, uint32 rng) without compiling the random initialiser.
"""
import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest

from helpers import mesh_from, optim_cfg
from model.config import ModelConfig
from model.transformer import Transformer
from model import checkpoint as checkpoint_lib
from train import optim
from train import state as state_lib
from train.tasks import pretrain

SEQ = 16
META = {"config": {"model": {"d_model": 64, "dtype": "float32"}, "seed": 0},
        "tokenizer": "/tmp/tok/spm.model", "vocab_size": 256, "lr": 3e-4,
        "extra_dirs": ["a", "b"], "resumed": False, "note": None}


def _model():
  return Transformer(ModelConfig(vocab_size=256, num_layers=1, d_model=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128))


def _shardings(mesh):
  tx, _ = optim.make_optimizer(optim_cfg(), 10)
  return state_lib.state_shardings(_model(), tx, pretrain.PretrainTask.dummy_batch(1, SEQ), mesh)


def _mesh8():
  return mesh_from(jax.devices(), (2, 2, 2))


def _mesh4():
  return mesh_from(jax.devices()[:4], (1, 2, 2))


def _filled_state(mesh, seed=0):
  """A sharded TrainState with distinct, non-trivial values in every leaf."""
  abstract, shardings = _shardings(mesh)
  rng = np.random.default_rng(seed)

  def draw(a):
    if np.issubdtype(a.dtype, np.floating):
      return rng.standard_normal(a.shape).astype(a.dtype)
    return rng.integers(1, 1000, a.shape).astype(a.dtype)
  host = jax.tree.map(draw, abstract)
  host = host.replace(step=np.asarray(1234, np.int32),
                      rng=np.asarray([0xDEADBEEF, 12345], np.uint32))
  return jax.device_put(host, shardings), host, abstract, shardings


def _assert_bit_identical(restored, host):
  got, want = jax.device_get(restored), host
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    name = jax.tree_util.keystr(path)
    assert g.dtype == w.dtype and g.shape == w.shape, name
    np.testing.assert_array_equal(g, w, err_msg=name)


class FakeIterator(grain.DatasetIterator):
  """A grain DatasetIterator with JSON get_state/set_state, like the pipeline's LMIterator."""

  def __init__(self, seed=0):
    super().__init__()
    self.position, self.seed, self.epoch = 0, seed, 0
    self.prefetching = False

  def start_prefetch(self):
    self.prefetching = True

  def __next__(self):
    self.position += 1
    return {"row": self.seed * 1000 + self.position}

  def get_state(self):
    return {"position": self.position, "seed": self.seed, "epoch": self.epoch,
            "shards": ["a-00001", "a-00002"]}

  def set_state(self, state):
    self.position, self.seed, self.epoch = state["position"], state["seed"], state["epoch"]


def test_save_restore_round_trip_is_bit_identical(tmp_path):
  state, host, abstract, shardings = _filled_state(_mesh8())
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=3)
  try:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, None, META)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    restored, meta = ckpt.restore(7, state_lib.abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  _assert_bit_identical(restored, host)
  assert int(restored.step) == 1234
  np.testing.assert_array_equal(jax.device_get(restored.rng),
                                np.asarray([0xDEADBEEF, 12345], np.uint32))
  assert meta == META
  # Restored arrays carry the requested shardings.
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_restore_meta_alone(tmp_path):
  state, *_ = _filled_state(_mesh8(), seed=1)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=1)
  try:
    ckpt.save(2, state, None, META)
    ckpt.wait()
    assert ckpt.restore_meta(2) == META
  finally:
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
  state8, host, _, shardings8 = _filled_state(_mesh8(), seed=2)
  emb8 = state8.params["embed"]["embedding"]
  assert len(emb8.sharding.device_set) == 8
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=1)
  try:
    ckpt.save(5, state8, None, META)
    ckpt.wait()
  finally:
    ckpt.close()

  mesh4 = _mesh4()
  abstract4, shardings4 = _shardings(mesh4)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=1)
  try:
    assert ckpt.latest_step() == 5
    restored, meta = ckpt.restore(5, state_lib.abstract_with_shardings(abstract4, shardings4))
  finally:
    ckpt.close()
  _assert_bit_identical(restored, host)
  assert meta == META
  four = set(jax.devices()[:4])
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings4)):
    assert got.sharding.mesh.shape == mesh4.shape
    assert got.sharding.spec == want.spec
    assert got.sharding.device_set == four
  emb = restored.params["embed"]["embedding"]
  # ("tensor", "fsdp") on the 2 x 2 mesh: each of the 4 devices holds a quarter.
  assert emb.addressable_shards[0].data.shape == (256 // 2, 64 // 2)
  assert len(emb.addressable_shards) == 4


def test_keep_checkpoints_retains_the_last_ones(tmp_path):
  state, *_ = _filled_state(_mesh8(), seed=3)
  small = {"params": state.params["final_norm"], "step": state.step}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=2)
  try:
    for step in range(1, 6):
      assert ckpt.save(step, small, None, {"step": step})
    ckpt.wait()
    assert ckpt.latest_step() == 5
    assert list(ckpt.manager.all_steps()) == [4, 5]
  finally:
    ckpt.close()
  on_disk = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert on_disk == [4, 5]


def test_save_interval_and_should_save(tmp_path):
  state, *_ = _filled_state(_mesh8(), seed=4)
  small = {"step": state.step}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=3, keep=5)
  try:
    assert [ckpt.should_save(s) for s in range(1, 8)] == [False, False, True, False, False,
                                                          True, False]
    assert ckpt.save(3, small, None, {})
    assert not ckpt.save(4, small, None, {})          # off-interval: skipped
    assert ckpt.save(5, small, None, {}, force=True)  # forced (last step / preemption)
    ckpt.wait()
    assert list(ckpt.manager.all_steps()) == [3, 5]
  finally:
    ckpt.close()


def test_data_iterator_state_round_trips(tmp_path):
  state, host, abstract, shardings = _filled_state(_mesh8(), seed=5)
  it = FakeIterator(seed=9)
  for _ in range(7):
    next(it)
  it.epoch = 2
  saved_state = it.get_state()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=2)
  try:
    ckpt.save(11, state, it, META)
    ckpt.wait()
    expected_next = [next(it) for _ in range(3)]    # what the run would have seen next
  finally:
    ckpt.close()

  files = os.listdir(tmp_path / "checkpoints" / "11" / "data")
  assert "process_0-of-1.json" in files
  with open(tmp_path / "checkpoints" / "11" / "data" / "process_0-of-1.json") as f:
    assert json.load(f) == saved_state

  fresh = FakeIterator(seed=0)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=2)
  try:
    restored, meta = ckpt.restore(11, state_lib.abstract_with_shardings(abstract, shardings),
                                  fresh)
  finally:
    ckpt.close()
  assert fresh.get_state() == saved_state
  assert fresh.prefetching   # grain's handler starts reading ahead once the state is set
  assert [next(fresh) for _ in range(3)] == expected_next
  _assert_bit_identical(restored, host)
  assert meta == META


def test_missing_data_iterator_file_is_a_clear_error(tmp_path):
  state, _, abstract, shardings = _filled_state(_mesh8(), seed=6)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=2)
  try:
    ckpt.save(1, state, FakeIterator(), META)
    ckpt.wait()
  finally:
    ckpt.close()
  os.rename(tmp_path / "checkpoints" / "1" / "data" / "process_0-of-1.json",
            tmp_path / "checkpoints" / "1" / "data" / "process_0-of-2.json")
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=2)
  try:
    with pytest.raises(FileNotFoundError, match="different number of processes"):
      ckpt.restore(1, state_lib.abstract_with_shardings(abstract, shardings), FakeIterator())
  finally:
    ckpt.close()


def _largest_array_file(step_dir):
  files = [p for p in step_dir.joinpath("state").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def test_damaged_steps_are_skipped_for_the_newest_intact_one(tmp_path, caplog):
  mesh = _mesh8()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=3)
  hosts = {}
  try:
    for step in (1, 2, 3):
      state, hosts[step], abstract, shardings = _filled_state(mesh, seed=10 + step)
      ckpt.save(step, state, FakeIterator(seed=step), {"step": step})
    ckpt.wait()
  finally:
    ckpt.close()
  root = tmp_path / "checkpoints"
  big = _largest_array_file(root / "3")                 # step 3: truncated (a disk-full save)
  big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
  shutil.rmtree(root / "2" / "state")                   # step 2: readable, wrong values
  shutil.copytree(root / "1" / "state", root / "2" / "state")

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=3)
  try:
    assert ckpt.latest_step() == 3                      # its metadata still reads back
    it = FakeIterator()
    restored, meta = ckpt.restore(3, state_lib.abstract_with_shardings(abstract, shardings), it)
    _assert_bit_identical(restored, hosts[1])
    assert meta == {"step": 1} and it.seed == 1
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step 3 in" in warned and "unreadable" in warned
    assert "step 2 in" in warned and "differ from the checksums" in warned
    # Training on from step 1 saves steps 2 and 3 again: the damaged ones are set aside first.
    assert ckpt.save(2, restored, None, {"step": 2}, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 2
  finally:
    ckpt.close()
  assert sorted(n.split("-")[0] for n in os.listdir(root)) == ["1", "2", "2.unusable",
                                                              "3.unusable"]


def test_checkpoint_of_another_model_is_an_error_not_a_fallback(tmp_path):
  state, _, _, _ = _filled_state(_mesh8(), seed=7)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=3)
  try:
    for step in (1, 2):
      ckpt.save(step, state, None, META)
    ckpt.wait()
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("{")
    assert ckpt.latest_step() == 1                      # unreadable metadata: skipped
    other = Transformer(ModelConfig(vocab_size=320, num_layers=1, d_model=64, num_heads=4,
                                    num_kv_heads=2, head_dim=16, mlp_dim=128))
    tx, _ = optim.make_optimizer(optim_cfg(), 10)
    abstract, shardings = state_lib.state_shardings(
        other, tx, pretrain.PretrainTask.dummy_batch(1, SEQ), _mesh8())
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r"params/embed/embedding is float32\[256, 64\] there but "
                             r"float32\[320, 64\] now"):
      ckpt.restore(1, state_lib.abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]   # nothing moved
