"""In-flight batching (infer/inflight.py, infer/slot_decode.py, infer/row_sampling.py): requests
joining and leaving a running batch get exactly the tokens of one-at-a-time decoding, a reused
slot hides its previous request's keys, and sampling depends only on a request's own seed.
"""
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from infer import decode, inflight, loading, slot_decode
from infer.decode_controls import Controls
from model.transformer import Transformer
from tests import helpers

MAX_LEN = 80
NO_EOS = 64   # the tiny vocabulary's size: never generated
# Prefix-LM prompts (decode.greedy's default); every test shares these shapes, so compilations.
OPTIONS = dict(eos_id=NO_EOS, max_batch=3, max_len=MAX_LEN, chunk=4, prefix_lm=True)


@pytest.fixture(scope="module")
def lm():
  model = Transformer(helpers.tiny_model_cfg())
  return model, helpers.numpy_params(model, jnp.zeros((1, 8), jnp.int32), seed=1)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, 64, n).tolist() for n in lengths]


def _one_at_a_time(lm, prompt, max_new=30):
  """decode.greedy of one prompt (one shape for every prompt: a single compilation)."""
  tokens = np.zeros((1, MAX_LEN), np.int32)
  tokens[0, :len(prompt)] = prompt
  ids = decode.greedy(*lm, tokens, np.array([len(prompt)], np.int32), max_new=max_new,
                      eos_id=NO_EOS)
  return np.asarray(ids)[0].tolist()


def _cut_at(ids, eos_id):
  return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


def test_greedy_equals_one_at_a_time_as_requests_join_and_leave(lm):
  lengths, news = [3, 40, 7, 22, 15, 31, 5, 11], [30, 2, 17, 9, 25, 4, 12, 28]
  prompts = _prompts(lengths)
  full = [_one_at_a_time(lm, p) for p in prompts]
  # An eos the model does emit, mid-answer in some rows: those rows must stop there.
  tokens, counts = np.unique([t for row in full for t in row[1:]], return_counts=True)
  eos = int(tokens[np.argmax(counts)])
  requests = [inflight.Request(p, m) for p, m in zip(prompts, news)]
  results = inflight.run_all(*lm, requests, **{**OPTIONS, "eos_id": eos})
  for ref, m, r in zip(full, news, results):
    want = _cut_at(ref[:m], eos)
    assert r.ids == want
    assert r.finish_reason == ("eos" if want[-1] == eos and eos in ref[:m] else "length")
    assert len(r.logprobs) == len(r.ids) and max(r.logprobs) <= 0
  assert {r.finish_reason for r in results} == {"eos", "length"}
  # Requests joined a running batch (admitted after step 0), and slots were reused.
  assert sum(r.admitted_step > 0 for r in results) >= 5
  assert len(set(sum((r.ids for r in results), []))) > 5   # not a degenerate constant output


def test_eos_ignored_when_asked_and_max_new_one(lm):
  prompt = _prompts([9], seed=3)[0]
  ref = _one_at_a_time(lm, prompt)
  eos = ref[2]
  keep, first = inflight.run_all(
      *lm, [inflight.Request(prompt, 12, stop_on_eos=False), inflight.Request(prompt, 1)],
      **{**OPTIONS, "eos_id": eos})
  assert keep.ids == ref[:12] and keep.finish_reason == "length"
  assert first.ids == ref[:1] and first.finished_step == first.admitted_step


def test_slot_step_at_per_row_positions_equals_single_row_step(lm):
  """One decode step over slots at different positions - one of them reused after a longer
  prompt, whose stale keys the mask must hide - gives each row's own single-row logits."""
  model, params = lm
  long_, *prompts = _prompts([37, 5, 23, 12], seed=4)
  scheduler = inflight.Scheduler(model, params, **OPTIONS)
  # Slot 0 holds the long prompt first; the short one replaces it.
  scheduler.queue.append(scheduler.job(inflight.Request(long_, max_new=1)))
  scheduler.tick()
  for p in prompts:
    scheduler.queue.append(scheduler.job(inflight.Request(p, max_new=5)))
  scheduler.admit()
  slots = scheduler.slots
  assert np.asarray(slots.position).tolist() == [5, 23, 12]
  # jit: the step run eagerly, op by op, costs seconds.
  step = jax.jit(lambda params, cache, token, position: model.apply(
      {"params": params, "cache": cache}, token[:, None], positions=position[:, None],
      cache_mode="step", mutable=["cache"])[0][:, 0])
  batched = step(params, slots.cache, slots.token, slots.position)
  for row, p in enumerate(prompts):
    tokens = np.zeros((1, 48), np.int32)
    tokens[0, :len(p)] = p
    cache, _ = decode.prefill(model, params, tokens, np.array([len(p)], np.int32),
                              prefix_lm=True)
    single = step(params, cache, slots.token[row:row + 1], np.array([len(p)], np.int32))
    chex.assert_trees_all_close(batched[row], single[0], rtol=1e-5, atol=1e-5)


def test_sampling_depends_only_on_the_request_seed(lm):
  prompt, *others = _prompts([6, 30, 12, 4], seed=5)
  controls = Controls(temperature=1.0, top_k=20, top_p=0.9)
  sampled = inflight.Request(prompt, 16, controls, seed=7)
  options = OPTIONS
  alone, = inflight.run_all(*lm, [sampled], **options)
  crowd = [inflight.Request(p, 20, seed=i) for i, p in enumerate(others)]
  late = dict(vars(sampled), arrive_step=6)
  mixed = inflight.run_all(*lm, crowd + [inflight.Request(**late)], **options)
  assert mixed[-1].ids == alone.ids and mixed[-1].admitted_step >= 6
  np.testing.assert_allclose(mixed[-1].logprobs, alone.logprobs, rtol=1e-5)
  other_seed, = inflight.run_all(*lm, [inflight.Request(prompt, 16, controls, seed=8)],
                                 **options)
  assert other_seed.ids != alone.ids
  # top_k 1 leaves only the argmax to sample: greedy, whatever the seed.
  top1, = inflight.run_all(*lm, [inflight.Request(prompt, 16, Controls(1.0, top_k=1), 3)],
                           **options)
  assert top1.ids == _one_at_a_time(lm, prompt)[:16]


def test_short_request_submitted_later_finishes_first(lm):
  long_, short = _prompts([10, 6], seed=6)
  results = inflight.run_all(
      *lm, [inflight.Request(long_, 40), inflight.Request(short, 5, arrive_step=8)],
      **OPTIONS)
  assert results[1].admitted_step >= 8
  assert results[1].finished_step < results[0].finished_step


def test_engine_threads_and_counters(lm):
  engine = inflight.InflightEngine(*lm, **OPTIONS, warm_up=True)
  assert engine.counters()["steps"] == 0   # the warm-up's requests are not counted
  try:
    long_, short = _prompts([10, 6], seed=6)
    slow = engine.submit(long_, max_new=60)
    while engine.counters()["steps"] == 0 and not slow.done():
      time.sleep(0.005)
    quick = engine.submit(short, max_new=5)
    quick_result, slow_result = quick.result(timeout=120), slow.result(timeout=120)
    assert quick_result.finished_step < slow_result.finished_step
    assert slow_result.ids[:30] == _one_at_a_time(lm, long_)
    with pytest.raises(ValueError, match="max_len"):
      engine.submit(long_, max_new=MAX_LEN)
    with pytest.raises(ValueError, match="repetition_penalty"):
      engine.submit(short, max_new=4, controls=Controls(repetition_penalty=1.2))
  finally:
    engine.close()
  counts = engine.counters()
  assert counts["tokens"] == 65 and counts["requests"] == 2
  assert 1.0 < counts["mean_occupied"] <= 2.0 and counts["steps"] >= 59
  with pytest.raises(RuntimeError, match="closed"):
    engine.submit(short, max_new=4)


def test_local_attention_is_refused():
  model = Transformer(helpers.tiny_model_cfg(attention_kind="local", attention_window=8))
  with pytest.raises(ValueError, match="local attention"):
    inflight.Scheduler(model, {}, eos_id=3, max_batch=2, max_len=32)


class _Letters:
  """A tokenizer stub: one token per letter (ids 4..29), bos 1, eos 2."""
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [4 + (ord(c) - 97) % 26 for c in text.lower() if c.isalpha()]

  def decode(self, ids):
    return "".join(chr(97 + (i - 4) % 26) for i in ids if i >= 4)


def test_submit_text_gives_loaded_generate_text(lm):
  config = ml_collections.ConfigDict({"data": {"seq_len": MAX_LEN},
                                      "model": {"num_classes": 0, "causal": True}})
  loaded = loading.LoadedModel(config, "pretrain", *lm, _Letters(), step=0)
  engine = inflight.InflightEngine.for_loaded(loaded, max_batch=3, chunk=4)
  try:
    prompts = ["the licensee shall", "a"]
    texts = [inflight.submit_text(engine, loaded, p, 20, stop=("q",)) for p in prompts]
    got = [t.result(timeout=120) for t in texts]
    assert got == loaded.generate(prompts, 20, stop=("q",)) and all(got)
    with pytest.raises(ValueError, match="beam"):
      inflight.submit_text(engine, loaded, "a", 4, beam=2)
  finally:
    engine.close()


def test_a_failed_call_fails_its_requests_and_the_engine_carries_on(lm, monkeypatch):
  engine = inflight.InflightEngine(*lm, **OPTIONS)
  real = slot_decode.decode_chunk
  calls = []

  def fails_once(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("device lost")
    return real(*args, **kwargs)
  monkeypatch.setattr(slot_decode, "decode_chunk", fails_once)
  try:
    prompt = _prompts([5], seed=7)[0]
    with pytest.raises(RuntimeError, match="device lost"):
      engine.submit(prompt, max_new=6).result(timeout=120)
    assert engine.submit(prompt, max_new=6).result(timeout=120).ids == _one_at_a_time(
        lm, prompt)[:6]
  finally:
    engine.close()
