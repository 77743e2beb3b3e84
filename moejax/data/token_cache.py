"""Each split tokenized once into a flat token stream, cached as .npy.

  <data_dir>/moejax_cache/<dataset>/<version>/<tokenizer fingerprint[:16]>/<split>.npy
  (local files: <dataset> is files/<content fingerprint[:16]>)
  ... and <split>.json: documents, tokens, bytes, dataset and tokenizer ids.

The stream is [bos, doc0, bos, doc1, ...] (see packing.py) in uint16 when the
vocabulary allows. Files are written to a temporary name and renamed, so a
killed process never leaves a half-written cache; the sidecar records the
stream's checksum (checksums.py), checked before each run uses it. Training
memory-maps them.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import logging

from moejax.data import checksums
from moejax.data.packing import concat_documents


def cache_dir(data_dir: str, dataset: str, version: str, tokenizer_fingerprint: str,
              config: str = "") -> str:
  """`config` names one of a dataset's builder configs (local files: one per content)."""
  return os.path.join(data_dir, "moejax_cache", dataset.replace("/", "__"),
                      *([config] if config else []), str(version),
                      tokenizer_fingerprint[:16])


def stream_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def build(path: str, texts, tokenizer, meta: dict, *, chunk: int = 1024) -> dict:
  """Tokenizes `texts` into `path` (.npy) and writes the .json sidecar."""
  dtype = stream_dtype(tokenizer.vocab_size)
  parts, docs, nbytes, start = [], 0, 0, time.time()
  batch: list[str] = []

  def flush():
    nonlocal docs, nbytes
    parts.append(concat_documents(tokenizer.encode_batch(batch), tokenizer.bos_id, dtype))
    docs += len(batch)
    nbytes += sum(len(t.encode("utf-8")) for t in batch)
    batch.clear()
    if docs % (chunk * 100) < chunk:
      logging.info("tokenized %d documents (%.0f s)", docs, time.time() - start)

  for text in texts:
    batch.append(text)
    if len(batch) >= chunk:
      flush()
  if batch:
    flush()
  stream = np.concatenate(parts) if parts else np.zeros((0,), dtype)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path[:-4]}.{os.getpid()}.tmp.npy"  # unique per process (several hosts)
  np.save(tmp, stream)
  info = dict(meta, documents=docs, tokens=int(stream.size), bytes=int(nbytes),
              tokenize_seconds=round(time.time() - start, 2),
              checksum=checksums.digest(tmp))
  os.replace(tmp, path)
  tmp_json = f"{path[:-4]}.{os.getpid()}.tmp.json"
  with open(tmp_json, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  os.replace(tmp_json, path[:-4] + ".json")
  return info


def problem(path: str) -> str | None:
  """Why the cache at `path` cannot be used (missing, no sidecar, or not what was
  written), or None when it is whole."""
  if not (os.path.exists(path) and os.path.exists(path[:-4] + ".json")):
    return "missing"
  try:
    info = load_info(path)
  except (OSError, ValueError) as e:
    return f"its .json does not read ({type(e).__name__})"
  return checksums.mismatch(path, info.get("checksum"))


def load(path: str) -> np.ndarray:
  return np.load(path, mmap_mode="r")


def load_info(path: str) -> dict:
  with open(path[:-4] + ".json") as f:
    return json.load(f)
