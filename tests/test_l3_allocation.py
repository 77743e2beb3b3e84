"""L3 row allocation: the LZW parse against a textbook one, hand-worked cases,
the invariants 1 <= d_t <= k and sum d_t = v, and the cache beside the tokens."""

import json
import os

import numpy as np
import pytest

import moejax.data as data
from moejax.papers.l3 import allocation as L
from moejax.data import preparation
from moejax.errors import ConfigError
from tests.helpers import tiny_config


def naive_lzw(tokens, vocab_size):
  """Textbook LZW with a dict of tuple -> uses (insertion order = code order)."""
  book = {(t,): 0 for t in range(vocab_size)}
  w = ()
  for c in tokens:
    if w + (c,) in book:
      w = w + (c,)
    else:
      book[w] += 1
      book[w + (c,)] = 0
      w = (c,)
  if w:
    book[w] += 1
  return book


def naive_walk(book, vocab_size, rows, max_rows):
  """docs/papers/l3.md §c: keep codewords by uses (then shorter, then older) under the cap."""
  d = [1] * vocab_size
  order = sorted((w for w in book if len(w) > 1 and book[w] > 0),
                 key=lambda w: (-book[w], len(w), list(book).index(w)))
  for w in order:
    if sum(d) == rows:
      break
    if d[w[-1]] < max_rows:
      d[w[-1]] += 1
  return d, sum(d) == rows


def repetitive(rng, n, vocab):
  motifs = [rng.integers(0, vocab, size=rng.integers(1, 6)).tolist() for _ in range(4)]
  out = []
  while len(out) < n:
    out += motifs[rng.integers(0, 4)]
  return out[:n]


def test_trie_parse_matches_textbook_lzw():
  rng = np.random.default_rng(0)
  cases = [[], [3], [0] * 50, [0, 1] * 40, list(range(7)) * 9]
  for vocab in (1, 2, 3, 5, 17):
    cases.append(rng.integers(0, vocab, size=rng.integers(1, 400)).tolist())
    cases.append(repetitive(rng, 500, vocab))
  for tokens in cases:
    vocab = max(tokens, default=0) + 1
    assert L.lzw_codewords(tokens, vocab) == naive_lzw(tokens, vocab)
    assert list(L.lzw_codewords(tokens, vocab)) == list(naive_lzw(tokens, vocab))  # codes


def test_allocation_walk_matches_a_naive_walk():
  rng = np.random.default_rng(1)
  for _ in range(40):
    vocab = int(rng.integers(1, 9))
    k = int(rng.integers(1, 6))
    tokens = (repetitive(rng, 300, vocab) if rng.random() < 0.5
              else rng.integers(0, vocab, size=300).tolist())
    rows = int(rng.integers(vocab, vocab * k + 1))
    want, complete = naive_walk(naive_lzw(tokens, vocab), vocab, rows, k)
    got = L.lzw_allocation(tokens, vocab, rows, k)
    if complete:  # else the frequency top-up decides the rest
      assert got.tolist() == want
    assert np.all(got >= np.array(want))


def test_hand_worked_lzw():
  a, b, c = 0, 1, 2
  # a|a|b|aa|ba|ab|aab|aab|c: new codes aa ab ba aab baa aba aaba aabc
  tokens = [a, a, b] * 5 + [c]
  assert L.lzw_codewords(tokens, 3) == {
      (a,): 2, (b,): 1, (c,): 1, (a, a): 1, (a, b): 1, (b, a): 1, (a, a, b): 2,
      (b, a, a): 0, (a, b, a): 0, (a, a, b, a): 0, (a, a, b, c): 0}
  # Walk: aab (2 uses) -> b, then the 1-use pairs by code: aa -> a, ab -> b, ba -> a.
  assert L.lzw_allocation(tokens, 3, 5, 3).tolist() == [2, 2, 1]  # aab, aa
  assert L.lzw_allocation(tokens, 3, 6, 3).tolist() == [2, 3, 1]  # aab, aa, ab
  assert L.lzw_allocation(tokens, 3, 7, 3).tolist() == [3, 3, 1]  # aab, aa, ab, ba
  # k = 2: ab and ba are skipped (b and a are full); the row left over goes by
  # frequency to the only id below the cap, c.
  assert L.lzw_allocation(tokens, 3, 6, 2).tolist() == [2, 2, 2]
  # a|b|ab|aba|b: codewords ab -> b and aba -> a, then one row by frequency
  # (a and b tie at 4 occurrences: the lower id).
  assert L.lzw_allocation([a, b] * 4, 2, 5, 3).tolist() == [3, 2]
  assert L.lzw_allocation([a, b] * 4, 2, 2, 3).tolist() == [1, 1]


def check_invariants(d, vocab, rows, k):
  assert d.dtype == np.int32 and d.shape == (vocab,)
  assert int(d.sum()) == rows and d.min() >= 1 and d.max() <= k


def test_sum_floor_and_cap_of_every_method():
  rng = np.random.default_rng(2)
  cases = [(1, 1, 1), (1, 4, 4), (5, 5, 3), (5, 15, 3), (7, 7, 1), (264, 264 * 32, 32)]
  for _ in range(150):
    vocab, k = int(rng.integers(1, 60)), int(rng.integers(1, 40))
    rows = int(rng.choice([vocab, vocab * k, rng.integers(vocab, vocab * k + 1)]))
    cases.append((vocab, rows, k))
  for vocab, rows, k in cases:
    seen = int(rng.integers(1, vocab + 1))  # often leaves ids unseen
    tokens = rng.zipf(1.3, size=int(rng.integers(0, 2000))) % seen
    check_invariants(L.uniform_allocation(vocab, rows, k), vocab, rows, k)
    check_invariants(L.frequency_allocation(tokens, vocab, rows, k), vocab, rows, k)
    check_invariants(L.lzw_allocation(tokens, vocab, rows, k), vocab, rows, k)


def test_uniform_allocation():
  assert L.uniform_allocation(4, 10, 3).tolist() == [3, 3, 2, 2]
  assert L.uniform_allocation(4, 12, 3).tolist() == [3, 3, 3, 3]


def test_frequency_allocation_is_proportional_within_one_row():
  """Some lam has |d_t - lam c_t| < 1 where no bound binds, lam c_t < 2 at
  d_t = 1 and lam c_t > k - 1 at d_t = k; unseen ids stay at 1."""
  rng = np.random.default_rng(3)
  for _ in range(100):
    vocab, k = int(rng.integers(2, 300)), int(rng.integers(2, 64))
    rows = int(rng.integers(vocab, vocab * k + 1))
    tokens = rng.zipf(1.2, size=5000) % int(rng.integers(1, vocab + 1))
    d = L.frequency_allocation(tokens, vocab, rows, k).astype(float)
    c = np.bincount(tokens, minlength=vocab).astype(float)
    seen = c > 0
    if np.all(d[seen] == k):
      continue  # the seen ids are full; the unseen share the rest
    assert np.all(d[~seen] == 1)
    inner = seen & (d > 1) & (d < k)
    low = np.concatenate([(d - 1)[inner] / c[inner], [(k - 1) / x for x in c[seen & (d == k)]]])
    high = np.concatenate([(d + 1)[inner] / c[inner], 2 / c[seen & (d == 1)]])
    assert low.max(initial=0) < high.min(initial=np.inf)
  # Written out: counts 6:3:1, 10 rows, k = 8 -> lam = 1, d = 6, 3, 1.
  assert L.frequency_allocation([0] * 6 + [1] * 3 + [2], 3, 10, 8).tolist() == [6, 3, 1]
  # k = 5 clips id 0 at 5; lam = 1.25 gives 5, 3.75, 1.25 -> 5, 4, 1.
  assert L.frequency_allocation([0] * 6 + [1] * 3 + [2], 3, 10, 5).tolist() == [5, 4, 1]


def test_errors_say_what_to_change():
  with pytest.raises(ValueError, match="set --config.l3.rows to at least 10"):
    L.lzw_allocation([0, 1], 10, 9, 4)
  with pytest.raises(ValueError, match="max_rows_per_token to at least 5 or lower"):
    L.frequency_allocation([0, 1], 10, 41, 4)
  with pytest.raises(ValueError, match="max_rows_per_token to at least 1"):
    L.uniform_allocation(10, 10, 0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    L.lzw_allocation([0, 10], 10, 20, 4)
  with pytest.raises(ConfigError, match="choose one of"):
    L.allocate("zipf", [0], 10, 20, 4)


def test_allocation_stats():
  stats = L.allocation_stats(np.array([1, 3, 4]), tokens=[0, 2, 2, 2], max_rows=4)
  assert stats == dict(vocab_size=3, rows=8, min_rows=1, max_rows=4, mean_rows=round(8 / 3, 4),
                       cap=4, ids_at_cap=1, ids_at_one=1, tokens=4,
                       mean_rows_per_token=3.25, token_fraction_at_cap=0.75)


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory):
  """The embedded corpus with the byte tokenizer in a fresh data_dir (a few seconds)."""
  cfg = tiny_config(**{"data.name": "stdlib_source", "data.tokenizer": "byte",
                       "data.data_dir": str(tmp_path_factory.mktemp("tfds")),
                       "l3.rows": 264 * 4, "l3.max_rows_per_token": 16,
                       "l3.allocation_tokens": 100_000})
  data.check_ready(cfg.data)
  data.prepare(cfg.data)
  return cfg


def test_load_or_build_caches_beside_the_token_cache(byte_corpus, monkeypatch):
  cfg, vocab = byte_corpus, data.vocab_size(byte_corpus.data)
  built = []
  real = L.allocate
  monkeypatch.setattr(L, "allocate", lambda *a: built.append(a[0]) or real(*a))
  d = L.load_or_build(cfg.data, cfg.l3, vocab)
  stream_path = preparation.cache_path(cfg.data, data.resolve_data_dir(cfg.data),
                                       data.load_tokenizer(cfg.data), "train")
  path = os.path.join(os.path.dirname(stream_path), "l3_allocation",
                      "train-lzw-rows1056-k16-n100000.npy")
  assert built == ["lzw"] and os.path.exists(path)
  tokens = np.load(stream_path)[:100_000]
  assert d.tolist() == L.lzw_allocation(tokens, vocab, 1056, 16).tolist()
  with open(path[:-4] + ".json") as f:
    meta = json.load(f)
  source = data.token_cache.load_info(stream_path)
  assert meta["method"] == "lzw" and (meta["rows"], meta["max_rows"]) == (1056, 16)
  assert (meta["tokens_read"], meta["vocab_size"]) == (100_000, 264)
  assert meta["source_tokens"] == source["tokens"] > 100_000
  assert meta["source_fingerprint"] == source["fingerprint"]
  assert meta["version"] == L.VERSION and meta["seconds"] >= 0 and meta["split"] == "train"
  assert meta["stats"] == L.allocation_stats(d, tokens, 16)

  mtime = os.stat(path).st_mtime_ns
  again = L.load_or_build(cfg.data, cfg.l3, vocab)
  assert built == ["lzw"] and again.tolist() == d.tolist()  # read, not rebuilt
  assert os.stat(path).st_mtime_ns == mtime

  with open(path[:-4] + ".json", "w") as f:  # a stale record is rebuilt
    json.dump(dict(meta, version=L.VERSION - 1), f)
  L.load_or_build(cfg.data, cfg.l3, vocab)
  assert built == ["lzw", "lzw"]
  np.save(path, np.roll(d, 1))  # an array that is not the one its record describes
  assert L.load_or_build(cfg.data, cfg.l3, vocab).tolist() == d.tolist()
  assert built == ["lzw", "lzw", "lzw"]

  other = cfg.l3.copy_and_resolve_references()
  other.allocation = "frequency"
  freq = L.load_or_build(cfg.data, other, vocab)
  check_invariants(freq, vocab, 1056, 16)
  assert os.path.exists(path.replace("lzw-", "frequency-"))
  other.allocation = "uniform"  # needs no tokens and writes nothing
  assert L.load_or_build(cfg.data, other, vocab).tolist() == [4] * 264
  assert built == ["lzw", "lzw", "lzw", "frequency"]
  assert sorted(os.listdir(os.path.dirname(path))) == [
      "train-frequency-rows1056-k16-n100000.json", "train-frequency-rows1056-k16-n100000.npy",
      "train-lzw-rows1056-k16-n100000.json", "train-lzw-rows1056-k16-n100000.npy"]


def test_load_or_build_synthetic_is_computed_in_memory(tmp_path):
  cfg = tiny_config(**{"data.data_dir": str(tmp_path), "l3.rows": 264 * 8,
                       "l3.max_rows_per_token": 32, "l3.allocation_tokens": 0})
  d = L.load_or_build(cfg.data, cfg.l3, data.vocab_size(cfg.data))
  check_invariants(d, 264, 264 * 8, 32)
  stream = data.RunData(cfg.data).stream("train")
  assert d.tolist() == L.lzw_allocation(stream, 264, 264 * 8, 32).tolist()
  assert d[data.load_tokenizer(cfg.data).pad_id] == 1  # never seen
  assert os.listdir(tmp_path) == []
  cfg.l3.rows = 100
  with pytest.raises(ConfigError, match="at least 264"):
    L.load_or_build(cfg.data, cfg.l3, 264)
