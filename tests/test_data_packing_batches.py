"""Packing and batch iteration against naive per-token references."""

import numpy as np
import pytest

from moejax.data.batches import BatchIterator
from moejax.data.packing import concat_documents, rows_from_windows
from moejax.errors import ConfigError

BOS = 1


def _naive_rows(window):
  """Per token: segment counter, position since the last bos, target weight."""
  inputs, targets = list(window[:-1]), list(window[1:])
  seg, pos, segs, poss = 1, 0, [], []
  for t, tok in enumerate(inputs):
    if tok == BOS and t > 0:
      seg += 1
    if tok == BOS:
      pos = 0
    segs.append(seg)
    poss.append(pos)
    pos += 1
  weights = [0.0 if tok == BOS else 1.0 for tok in targets]
  return inputs, targets, segs, poss, weights


def test_packing_matches_per_token_loop():
  rng = np.random.default_rng(0)
  docs = [rng.integers(2, 50, size=rng.integers(1, 9)).tolist() for _ in range(30)]
  stream = concat_documents(docs, BOS, np.int32)
  assert stream.tolist() == [x for d in docs for x in [BOS, *d]]
  L = 7
  windows = np.stack([stream[i * L:i * L + L + 1] for i in range((len(stream) - 1) // L)])
  rows = rows_from_windows(windows, BOS)
  for i, w in enumerate(windows):
    inputs, targets, segs, poss, weights = _naive_rows(w.tolist())
    assert rows["inputs"][i].tolist() == inputs
    assert rows["targets"][i].tolist() == targets
    assert rows["segment_ids"][i].tolist() == segs
    assert rows["positions"][i].tolist() == poss
    assert rows["weights"][i].tolist() == weights


def _stream(n=1000, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.integers(2, 100, size=n).astype(np.uint16)
  s[rng.random(n) < 0.05] = BOS
  return s


def _make(stream, **kw):
  args = dict(seq_len=8, global_batch=6, seed=3, shuffle=True, bos_id=BOS)
  args.update(kw)
  return BatchIterator(stream, **args)


def test_batches_are_windows_of_seeded_epoch_permutations():
  stream = _stream()
  it = _make(stream)
  n = (len(stream) - 1) // 8
  order = np.concatenate([np.random.default_rng([3, e]).permutation(n) for e in range(3)])
  for b in range(3 * n // 6):  # crosses two epoch boundaries (n = 124, B = 6)
    batch = next(it)
    for r in range(6):
      start = order[b * 6 + r] * 8
      assert batch["inputs"][r].tolist() == stream[start:start + 8].tolist()
      assert batch["targets"][r].tolist() == stream[start + 1:start + 9].tolist()
  assert it.epoch == 3  # three whole epochs consumed; the next batch starts epoch 3


def test_restored_iterator_continues_exactly():
  stream = _stream()
  a = _make(stream)
  for _ in range(17):
    next(a)
  state = a.get_state()
  b = _make(stream)
  b.set_state(state)
  for _ in range(30):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(ConfigError, match="dataset or tokenizer changed"):
    _make(stream[:500]).set_state(state)


def test_process_rows_partition_the_global_batch():
  stream = _stream()
  whole = _make(stream)
  parts = [_make(stream, process_index=p, process_count=3) for p in range(3)]
  for _ in range(5):
    want = next(whole)
    got = [next(p) for p in parts]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
  with pytest.raises(ConfigError, match="multiple of 4"):
    _make(stream, process_count=4)


def test_eval_pass_scores_every_window_once_and_keeps_train_position():
  stream = _stream(n=401)  # 50 windows of 8: 8 full batches of 6 and a partial one
  it = _make(stream, shuffle=False)
  next(it)
  before = it.get_state()
  batches = list(it.iter_eval())
  assert len(batches) == 9
  total = sum(b["weights"].sum() for b in batches)
  windows = np.stack([stream[i * 8:i * 8 + 9] for i in range(50)])
  assert total == (windows[:, 1:] != BOS).sum()
  assert it.get_state() == before
  # Three batches of 6 = 18 windows spread over the 50: round(i * 49 / 17).
  part = list(it.iter_eval(max_batches=3))
  assert len(part) == 3
  spread = [round(i * 49 / 17) for i in range(18)]
  assert spread[:4] == [0, 3, 6, 9] and spread[-1] == 49
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in part]),
                                np.stack([stream[i * 8:i * 8 + 8] for i in spread]))
  assert all(b["weights"].any(axis=1).all() for b in part)  # no padding rows


def test_too_short_split_is_a_config_error():
  with pytest.raises(ConfigError, match="fewer than one sequence"):
    _make(_stream(n=5))
