"""Deterministic, checkpointable global batches over a flat token stream.

The stream holds N = (len - 1) // L windows of L + 1 tokens (stride L). Epoch e
visits them in the order permutation(seed, e) (identity without shuffling);
global batch b is the windows at positions b*B .. b*B + B - 1 of the epochs laid
end to end. So the iterator's whole state is the number of batches consumed,
and a restored iterator yields exactly what an uninterrupted one would.
Process p of P receives rows [p*B/P, (p+1)*B/P) of each global batch, or the
`rows` range it is given: the trainer derives that range from the batch
sharding, since processes that hold replicas (a `tensor` axis spanning hosts)
need the same rows.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from moejax.data.packing import rows_from_windows
from moejax.errors import ConfigError


class BatchIterator:

  def __init__(self, stream: np.ndarray, *, seq_len: int, global_batch: int,
               seed: int, shuffle: bool, bos_id: int, process_index: int = 0,
               process_count: int = 1, rows: tuple[int, int] | None = None):
    if global_batch % process_count:
      raise ConfigError(
          f"--config.train.global_batch={global_batch} is not divisible by the "
          f"{process_count} processes; use a multiple of {process_count}.")
    self.stream, self.seq_len, self.global_batch = stream, seq_len, global_batch
    self.seed, self.shuffle, self.bos_id = seed, shuffle, bos_id
    self.num_sequences = (len(stream) - 1) // seq_len
    if self.num_sequences < 1:
      raise ConfigError(
          f"The data split holds {len(stream)} tokens, fewer than one sequence of "
          f"--config.data.seq_len={seq_len} + 1; use a shorter seq_len or more data.")
    if rows is None:
      per = global_batch // process_count
      rows = (process_index * per, (process_index + 1) * per)
    self._rows = slice(*rows)
    self.batches_consumed = 0
    self._order_cache: dict[int, np.ndarray] = {}

  # --- order -------------------------------------------------------------------
  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._order_cache:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
      else:
        order = np.arange(self.num_sequences)
      # Keep at most two epochs: a batch can straddle one boundary.
      self._order_cache = {e: o for e, o in self._order_cache.items() if e == epoch - 1}
      self._order_cache[epoch] = order
    return self._order_cache[epoch]

  def _window_ids(self, first: int, count: int) -> np.ndarray:
    """Window ids at global positions first .. first+count-1 (epochs end to end)."""
    epochs, offsets = np.divmod(first + np.arange(count), self.num_sequences)
    out = np.empty(count, np.int64)
    for e in np.unique(epochs):
      here = epochs == e
      out[here] = self._order(int(e))[offsets[here]]
    return out

  def _windows(self, ids: np.ndarray) -> np.ndarray:
    starts = ids * self.seq_len
    return np.stack([np.asarray(self.stream[s:s + self.seq_len + 1]) for s in starts])

  @property
  def epoch(self) -> int:
    return self.batches_consumed * self.global_batch // self.num_sequences

  # --- training iteration ----------------------------------------------------------
  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    b = self.batches_consumed
    ids = self._window_ids(b * self.global_batch, self.global_batch)[self._rows]
    self.batches_consumed += 1
    return rows_from_windows(self._windows(ids), self.bos_id)

  def get_state(self) -> dict:
    return {"batches_consumed": self.batches_consumed, "seed": self.seed,
            "num_sequences": self.num_sequences, "seq_len": self.seq_len,
            "global_batch": self.global_batch}

  def set_state(self, state: dict) -> None:
    if state.get("num_sequences", self.num_sequences) != self.num_sequences:
      raise ConfigError(
          f"The checkpoint's data position was saved over {state['num_sequences']} "
          f"sequences but the data now has {self.num_sequences}; the dataset or "
          "tokenizer changed: resume with the original data or use a new --workdir.")
    self.batches_consumed = int(state["batches_consumed"])

  # --- evaluation --------------------------------------------------------------------
  def eval_window_ids(self, max_batches: int | None = None) -> np.ndarray:
    """The windows an evaluation scores, in order: all of them, or, when
    `max_batches` batches hold fewer, that many spread evenly over the split
    (window round(i (N - 1) / (n - 1)) for i < n), since the first windows alone
    are the first few documents and need not be typical of the split."""
    wanted = (max_batches or 0) * self.global_batch
    if not wanted or wanted >= self.num_sequences:
      return np.arange(self.num_sequences)
    return np.round(np.linspace(0, self.num_sequences - 1, wanted)).astype(np.int64)

  def iter_eval(self, max_batches: int | None = None) -> Iterator[dict]:
    """One ordered pass over the split, or over `max_batches` batches of windows
    spread evenly over it (eval_window_ids).

    The last batch is padded with zero-weight rows, so every chosen window is
    scored exactly once. Does not change the training position.
    """
    ids_all = self.eval_window_ids(max_batches)
    total = -(-ids_all.size // self.global_batch)
    for b in range(total):
      ids = ids_all[b * self.global_batch:(b + 1) * self.global_batch]
      real = np.ones(self.global_batch, bool)
      real[ids.size:] = False
      ids = np.concatenate([ids, np.zeros(self.global_batch - ids.size, np.int64)])
      windows = self._windows(ids)
      rows = rows_from_windows(windows, self.bos_id)
      rows["weights"] = rows["weights"] * real[:, None]
      yield {k: v[self._rows] for k, v in rows.items()}
