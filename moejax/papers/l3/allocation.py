"""How many rows d_t of an L3 table each token id t owns.

  sum_t d_t = v (l3.rows),   1 <= d_t <= k (l3.max_rows_per_token)

Three allocations (docs/papers/l3.md §c, §f):
  lzw        rows go to the last tokens of the most used LZW codewords (the paper's knob)
  uniform    d_t = v // V, the first v mod V ids one more (control)
  frequency  d_t ~ unigram count, clipped to [1, k] (control)

The data-dependent ones read the first l3.allocation_tokens tokens of the
training stream and are cached beside its token cache:

  <token cache dir>/l3_allocation/<method>-rows<v>-k<k>-n<tokens read>.npy
  ... and .json: the parameters, the token cache's ids, the seconds and the stats.

The synthetic dataset has no token cache: its allocation is computed in memory
on every call (300K tokens, well under a second). Pure NumPy; runs on the host.

  python -m moejax.papers.l3.allocation --data_name=stdlib_source --vocab_size=2048 \\
      --rows=16384 --max_rows=32 --method=lzw
prints the stats and the ids with the most rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from moejax.errors import ConfigError

METHODS = ("lzw", "uniform", "frequency")
VERSION = 1  # bump when an allocation changes: cached files with another version are rebuilt


def check_budget(vocab_size: int, rows: int, max_rows: int) -> None:
  """V <= v <= V k, or no allocation with 1 <= d_t <= k sums to v."""
  if max_rows < 1:
    raise ConfigError(f"l3.max_rows_per_token={max_rows} leaves no row for a token; "
                      "set --config.l3.max_rows_per_token to at least 1.")
  if rows < vocab_size:
    raise ConfigError(f"l3.rows={rows} is fewer than the {vocab_size} token ids, each of "
                      f"which needs a row; set --config.l3.rows to at least {vocab_size}.")
  if rows > vocab_size * max_rows:
    raise ConfigError(
        f"l3.rows={rows} is more than {vocab_size} ids x l3.max_rows_per_token={max_rows} "
        f"can hold; raise --config.l3.max_rows_per_token to at least "
        f"{-(-rows // vocab_size)} or lower --config.l3.rows to at most "
        f"{vocab_size * max_rows}.")


def _as_ids(tokens, vocab_size: int) -> np.ndarray:
  ids = np.asarray(tokens).reshape(-1).astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"token ids lie in [{ids.min()}, {ids.max()}], outside the vocabulary "
                     f"[0, {vocab_size}); pass the tokenizer's vocab_size.")
  return ids


def uniform_allocation(vocab_size: int, rows: int, max_rows: int) -> np.ndarray:
  """d_t = v // V, plus one for the first v mod V ids (v <= V k keeps d_t <= k)."""
  check_budget(vocab_size, rows, max_rows)
  d = np.full(vocab_size, rows // vocab_size, np.int32)
  d[:rows % vocab_size] += 1
  return d


def _water_fill(weights: np.ndarray, lo: np.ndarray, hi: int, total: int) -> np.ndarray:
  """Integers d with lo <= d <= hi, sum d = total and d ~ x = clip(lam w, lo, hi).

  lam solves sum x = total (bisection: sum x is continuous and increasing in
  lam). d = floor(x), then the rows short of `total` go to the largest
  fractional parts (largest remainder, ties to the lower id), so
  |d - lam w| < 1 wherever neither bound binds. If even lam -> inf leaves
  rows over (ids with w = 0 stay at lo), those ids share the rest evenly.
  """
  w = weights.astype(np.float64)
  lo = lo.astype(np.int64)
  if int(lo.sum()) == total:
    return lo.astype(np.int32)
  pos = w > 0
  if int(np.where(pos, hi, lo).sum()) < total:  # the weighted ids are all at hi
    return _water_fill((~pos).astype(np.float64), np.where(pos, hi, lo), hi, total)

  def clip(lam):
    return np.clip(lam * w, lo, hi)

  lam_lo, lam_hi = 0.0, float(np.max(hi / w[pos]))  # sum x = total lies in between
  for _ in range(200):
    mid = 0.5 * (lam_lo + lam_hi)
    if mid in (lam_lo, lam_hi):
      break
    lam_lo, lam_hi = (mid, lam_hi) if clip(mid).sum() < total else (lam_lo, mid)
  x = clip(lam_hi)  # sum x >= total, by less than one row
  d = np.floor(x).astype(np.int64)
  short = total - int(d.sum())
  frac = np.where(d < hi, x - d, -1.0)
  d[np.lexsort((np.arange(d.size), -frac))[:short]] += 1
  return d.astype(np.int32)


def frequency_allocation(tokens, vocab_size: int, rows: int, max_rows: int) -> np.ndarray:
  """d_t = clip(lam c_t, 1, k) rounded, sum = v, with c_t the unigram count.

  Water-filling: rows the cap clips from frequent ids go to the others through
  a larger lam. Unseen ids keep 1 row unless the seen ones are all at k.
  """
  check_budget(vocab_size, rows, max_rows)
  counts = np.bincount(_as_ids(tokens, vocab_size), minlength=vocab_size)
  return _water_fill(counts, np.ones(vocab_size, np.int64), max_rows, rows)


def _lzw_parse(tokens, vocab_size: int):
  """One LZW pass: (uses, parent, last, length) per code; codes < V are the single ids.

  At position i take the longest codeword matching tokens[i:], count one use of
  it, add codeword + next token as a new code, continue after the match. The
  trie maps (parent code, token) -> code, packed as parent * V + token, so the
  pass is O(n) dict lookups (about 1 s per 2M tokens). The dictionary is never
  reset or bounded (unlike LZW for compression).
  """
  ids = _as_ids(tokens, vocab_size).tolist()
  n, trie = len(ids), {}
  uses, parent = [0] * vocab_size, [-1] * vocab_size
  last, length = list(range(vocab_size)), [1] * vocab_size
  get, i = trie.get, 0
  while i < n:
    code, j = ids[i], i + 1
    while j < n:
      child = get(code * vocab_size + ids[j])
      if child is None:
        break
      code, j = child, j + 1
    uses[code] += 1
    if j < n:
      trie[code * vocab_size + ids[j]] = len(uses)
      uses.append(0)
      parent.append(code)
      last.append(ids[j])
      length.append(j - i + 1)
    i = j
  return tuple(np.array(a, np.int64) for a in (uses, parent, last, length))


def lzw_codewords(tokens, vocab_size: int | None = None) -> dict[tuple, int]:
  """{codeword (tuple of ids): uses} for the whole LZW dictionary, singles included.

  For tests and inspection; vocab_size defaults to max(tokens) + 1.
  """
  ids = np.asarray(tokens).reshape(-1)
  vocab = int(vocab_size if vocab_size is not None else (ids.max() + 1 if ids.size else 0))
  uses, parent, last, _ = _lzw_parse(ids, vocab)
  words: list[tuple] = []
  for p, t in zip(parent.tolist(), last.tolist()):  # a parent precedes its children
    words.append(words[p] + (t,) if p >= 0 else (t,))
  return {w: int(u) for w, u in zip(words, uses.tolist())}


def lzw_allocation(tokens, vocab_size: int, rows: int, max_rows: int) -> np.ndarray:
  """d_t = 1 + number of kept multi-token LZW codewords ending in t.

  docs/papers/l3.md §c gives only a reconstruction (the paper's Algorithm 1 is not
  public); the choices made here:
  * one LZW pass over `tokens` as a single sequence: BOS separators are
    ordinary tokens, so codewords may span a document boundary, and BOS gets
    rows like any other id;
  * dictionary initialised with all V single ids, never reset or bounded;
  * a codeword's score is its use count in the greedy parse (times it was
    the longest match), not the frequency of the substring in the text;
    codewords never used (score 0) are not walked;
  * a row goes to the codeword's LAST token: L3 routes by the current token,
    and the earlier tokens are the context (a frequent suffix) the row stands
    for; so "then" gets many rows, a rare piece one;
  * single-token codewords are counted (lzw_codewords reports their uses) and
    each id's single codeword is kept unconditionally: it is the context-free
    row every id has (d_t >= 1). It is not walked again, which would give an
    id a second context-free row. So d_t = number of kept codewords ending
    in t, the reconstruction of docs/papers/l3.md §c, with every single kept;
  * walk order: uses descending, then shorter first (the more general
    context), then code ascending (creation order, i.e. first occurrence);
  * a codeword whose last token already has k rows is skipped (its row goes
    to the next codeword), until sum d_t = v;
  * if the used codewords run out first (a small corpus), the remaining rows
    are spread in proportion to unigram counts on top (water-filling with the
    LZW rows as the floor and k as the cap, see frequency_allocation).
  """
  check_budget(vocab_size, rows, max_rows)
  ids = _as_ids(tokens, vocab_size)
  d = np.ones(vocab_size, np.int64)
  left = rows - vocab_size
  if left:
    uses, _, last, length = _lzw_parse(ids, vocab_size)
    code = np.arange(uses.size)
    walk = code[(code >= vocab_size) & (uses > 0)]
    walk = walk[np.lexsort((walk, length[walk], -uses[walk]))]
    for t in last[walk].tolist():
      if d[t] < max_rows:
        d[t] += 1
        left -= 1
        if not left:
          break
  if left:
    d = _water_fill(np.bincount(ids, minlength=vocab_size), d, max_rows, rows)
  return d.astype(np.int32)


def allocation_stats(counts, tokens=None, max_rows: int | None = None) -> dict:
  """Rows per id; with tokens, rows per token occurrence (what a forward reads).

  mean_rows_per_token = sum_t c_t d_t / sum_t c_t over the unigram counts c_t
  of `tokens`. The cap is max_rows, else the largest d_t.
  """
  d = np.asarray(counts).astype(np.int64)
  cap = int(d.max() if max_rows is None else max_rows)
  out = dict(vocab_size=int(d.size), rows=int(d.sum()), min_rows=int(d.min()),
             max_rows=int(d.max()), mean_rows=round(float(d.mean()), 4), cap=cap,
             ids_at_cap=int((d == cap).sum()), ids_at_one=int((d == 1).sum()))
  if tokens is not None:
    reads = d[_as_ids(tokens, d.size)]
    out.update(tokens=int(reads.size),
               mean_rows_per_token=round(float(reads.mean()), 4) if reads.size else 0.0,
               token_fraction_at_cap=round(float((reads == cap).mean()), 6)
               if reads.size else 0.0)
  return out


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ConfigError(f"Unknown --config.l3.allocation={method!r}; choose one of "
                      f"{list(METHODS)}.")


def allocate(method: str, tokens, vocab_size: int, rows: int, max_rows: int) -> np.ndarray:
  check_method(method)
  if method == "lzw":
    return lzw_allocation(tokens, vocab_size, rows, max_rows)
  if method == "frequency":
    return frequency_allocation(tokens, vocab_size, rows, max_rows)
  return uniform_allocation(vocab_size, rows, max_rows)


def train_tokens(data_cfg, limit: int) -> np.ndarray:
  """The first `limit` tokens of the training stream (all of it if limit <= 0)."""
  from moejax import data  # pylint: disable=import-outside-toplevel
  return np.asarray(data.RunData(data_cfg).train_tokens(limit))


def _checksum(counts: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(counts, np.int32).tobytes()).hexdigest()[:16]


def _matches(meta: dict, want: dict) -> bool:
  return all(meta.get(k) == v for k, v in want.items())


def load_or_build(data_cfg, l3_cfg, vocab_size: int, run_data=None) -> np.ndarray:
  """The allocation for these configs: read from its cache or built once and cached.

  The cache is keyed by file name (method, v, k, tokens read) under the token
  cache's directory, itself keyed by dataset, version and tokenizer; the .json
  must also match the version, vocabulary and the token cache's own ids, or
  it is rebuilt. Processes on one machine build it under preparation's file
  lock; files are written to a temporary name and renamed. run_data: the run's
  moejax.data.RunData (resolved from data_cfg when not given).
  """
  from moejax import data
  from moejax.data import preparation, token_cache
  run_data = run_data or data.RunData(data_cfg)
  method, rows, k = l3_cfg.allocation, int(l3_cfg.rows), int(l3_cfg.max_rows_per_token)
  check_method(method)
  check_budget(vocab_size, rows, k)
  if method == "uniform":
    return uniform_allocation(vocab_size, rows, k)
  limit = int(l3_cfg.allocation_tokens)
  if run_data.synthetic:  # generated in memory: nothing to cache beside
    start, tokens = time.time(), np.asarray(run_data.train_tokens(limit))
    d = allocate(method, tokens, vocab_size, rows, k)
    preparation.log(f"L3 {method} allocation of {rows} rows from {tokens.size:,} synthetic "
                    f"tokens in {time.time() - start:.1f} s (not cached)")
    return d
  stream_path = run_data.cache_path(data_cfg.train_split)
  tokens = np.asarray(run_data.train_tokens(limit))
  source = token_cache.load_info(stream_path)
  split = data_cfg.train_split
  want = dict(version=VERSION, method=method, rows=rows, max_rows=k, split=split,
              tokens_read=int(tokens.size), vocab_size=int(vocab_size),
              source_tokens=source.get("tokens"), source_fingerprint=source.get("fingerprint"),
              tokenizer_fingerprint=source.get("tokenizer_fingerprint"))
  path = os.path.join(os.path.dirname(stream_path), "l3_allocation",
                      f"{split.replace('/', '_')}-{method}-rows{rows}-k{k}-n{tokens.size}.npy")
  meta_path = path[:-4] + ".json"

  def cached():
    if not (os.path.exists(path) and os.path.exists(meta_path)):
      return None
    with open(meta_path) as f:
      meta = json.load(f)
    if not _matches(meta, want):
      return None
    d = np.load(path)
    # The checksum ties the array to its metadata (a rebuild replaces both files).
    return d if meta.get("sha256") == _checksum(d) else None

  d = cached()
  if d is not None:
    return d
  with preparation._file_lock(run_data.data_dir):
    d = cached()  # another process may have built it while we waited
    if d is not None:
      return d
    start = time.time()
    d = allocate(method, tokens, vocab_size, rows, k)
    seconds = round(time.time() - start, 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path[:-4]}.{os.getpid()}.tmp"
    np.save(tmp + ".npy", d)
    os.replace(tmp + ".npy", path)
    with open(tmp + ".json", "w") as f:
      json.dump(dict(want, dataset=data_cfg.name, sha256=_checksum(d),
                     token_cache=stream_path, seconds=seconds,
                     stats=allocation_stats(d, tokens, k)), f, indent=2, sort_keys=True)
    os.replace(tmp + ".json", meta_path)
  preparation.log(f"L3 {method} allocation of {rows} rows (k={k}) from {tokens.size:,} "
                  f"{data_cfg.name}/{data_cfg.train_split} tokens in {seconds:.1f} s: {path}")
  return d


def main(argv=None) -> None:
  import argparse

  from moejax.config.base import base_config
  from moejax import data
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  cfg = base_config()
  parser.add_argument("--data_name", default=cfg.data.name)
  parser.add_argument("--data_dir", default=cfg.data.data_dir)
  parser.add_argument("--tokenizer", default=cfg.data.tokenizer)
  parser.add_argument("--vocab_size", type=int, default=cfg.data.vocab_size)
  parser.add_argument("--rows", type=int, default=cfg.l3.rows)
  parser.add_argument("--max_rows", type=int, default=cfg.l3.max_rows_per_token)
  parser.add_argument("--method", default=cfg.l3.allocation, choices=METHODS)
  parser.add_argument("--allocation_tokens", type=int, default=cfg.l3.allocation_tokens)
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args(argv)
  cfg.data.name, cfg.data.data_dir, cfg.data.tokenizer = (args.data_name, args.data_dir,
                                                          args.tokenizer)
  cfg.data.vocab_size = args.vocab_size
  cfg.l3.rows, cfg.l3.max_rows_per_token = args.rows, args.max_rows
  cfg.l3.allocation, cfg.l3.allocation_tokens = args.method, args.allocation_tokens
  try:
    data.check_ready(cfg.data)
    data.prepare(cfg.data)
    tok = data.load_tokenizer(cfg.data)
    d = load_or_build(cfg.data, cfg.l3, tok.vocab_size)
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  tokens = train_tokens(cfg.data, args.allocation_tokens)
  print(json.dumps(allocation_stats(d, tokens, args.max_rows), indent=2))
  seen = np.bincount(tokens.astype(np.int64), minlength=d.size)
  print(f"{'id':>6} {'rows':>5} {'count':>9}  piece")
  for t in np.lexsort((np.arange(d.size), -seen, -d))[:args.top].tolist():
    print(f"{t:>6} {d[t]:>5} {seen[t]:>9}  {tok.decode([t])!r}")


if __name__ == "__main__":
  main()
