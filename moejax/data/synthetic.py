"""A small deterministic synthetic corpus for tests (no TFDS, no files).

Documents are walks of a fixed random first-order Markov chain over the 256
byte values: each value has 4 successors with probabilities .7/.2/.05/.05, so
a tiny model learns it within tens of steps (entropy ~1.3 bits per token).
Streams use the byte tokenizer's ids (bos = 257) and layout (see packing.py).
"""

import functools

import numpy as np

from moejax.data.tokenizer import ByteTokenizer

TRAIN_TOKENS = 300_000
EVAL_TOKENS = 30_000


@functools.lru_cache(maxsize=4)
def stream(split: str) -> np.ndarray:
  table_rng = np.random.default_rng(1234)
  successors = table_rng.integers(0, 256, size=(256, 4))
  cumulative = np.cumsum([0.7, 0.2, 0.05, 0.05])
  rng = np.random.default_rng(0 if split == "train" else 1)
  total = TRAIN_TOKENS if split == "train" else EVAL_TOKENS
  bos = ByteTokenizer.bos_id
  out = np.empty(total, np.uint16)
  picks = np.searchsorted(cumulative, rng.random(total))
  i, token = 0, 0
  doc_left = 0
  while i < total:
    if doc_left == 0:
      out[i] = bos
      doc_left = int(rng.integers(50, 500))
      token = int(rng.integers(0, 256))
    else:
      out[i] = token
      token = int(successors[token, min(picks[i], 3)])
      doc_left -= 1
    i += 1
  out.setflags(write=False)
  return out
