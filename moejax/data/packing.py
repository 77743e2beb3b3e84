"""Packing documents into fixed-length training rows.

Documents become one flat stream: [bos, doc0..., bos, doc1..., ...]. Row i of
length L is the window stream[i*L : i*L + L + 1] (stride L, so no token is
dropped): inputs = window[:-1], targets = window[1:]. Per position:
  segment_ids  document index within the row, from 1 (attention stays inside it);
  positions    offset from the start of its document, restarting at each bos
               (a row that starts mid-document counts from the row start);
  weights      0 where the target is bos (the next document's start cannot be
               predicted), else 1.
"""

import numpy as np


def concat_documents(docs, bos_id: int, dtype) -> np.ndarray:
  """[bos, *doc] for each doc, concatenated."""
  parts = []
  for d in docs:
    parts.append(np.asarray([bos_id], dtype))
    parts.append(np.asarray(d, dtype))
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def rows_from_windows(windows: np.ndarray, bos_id: int) -> dict:
  """windows: [n, L+1] token ids -> dict of [n, L] training arrays."""
  windows = np.asarray(windows)
  inputs = windows[:, :-1].astype(np.int32)
  targets = windows[:, 1:].astype(np.int32)
  is_bos = inputs == bos_id
  # A bos at column 0 does not start a new segment: segments start at 1.
  starts = is_bos.copy()
  starts[:, 0] = False
  segment_ids = 1 + np.cumsum(starts, axis=1, dtype=np.int32)
  col = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
  # Position = column minus the column of the latest bos at or before it.
  last_start = np.maximum.accumulate(np.where(is_bos, col, 0), axis=1)
  positions = (col - last_start).astype(np.int32)
  weights = (targets != bos_id).astype(np.float32)
  return dict(inputs=inputs, targets=targets, segment_ids=segment_ids,
              positions=positions, weights=weights)
