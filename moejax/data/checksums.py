"""Checksums of the files data preparation writes: token caches and tokenizers.

Each is recorded when the file is written (in its .json sidecar) and checked
when it is opened, so a cache overwritten with other valid token ids, or cut
short, is rebuilt instead of trained on. The digest is SHA-256 per 64 MiB chunk:
a mismatch names the first chunk that differs, and reading a chunk at a time
keeps memory flat on caches of many GB (checking reads the whole file once,
about a second per GB).
"""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 64 * 2**20


def digest(path: str) -> dict:
  """{"size", "chunk_bytes", "sha256": [one hex digest per chunk]} of a file."""
  chunks = []
  with open(path, "rb") as f:
    while True:
      block = f.read(CHUNK_BYTES)
      if not block and chunks:
        break
      chunks.append(hashlib.sha256(block).hexdigest())
      if len(block) < CHUNK_BYTES:
        break
  return dict(size=os.path.getsize(path), chunk_bytes=CHUNK_BYTES, sha256=chunks)


def mismatch(path: str, recorded: dict | None) -> str | None:
  """Why `path` does not match its recorded digest, or None when it does."""
  if not recorded:
    return "no checksum was recorded for it"
  if not os.path.exists(path):
    return "the file is missing"
  size = os.path.getsize(path)
  if size != recorded.get("size"):
    return f"its size is {size:,} bytes, {recorded.get('size', 0):,} were written"
  if recorded.get("chunk_bytes") != CHUNK_BYTES:
    return "its checksum was recorded with another chunk size"
  current = digest(path)["sha256"]
  for i, (now, then) in enumerate(zip(current, recorded.get("sha256", []))):
    if now != then:
      return f"bytes {i * CHUNK_BYTES:,} to {min(size, (i + 1) * CHUNK_BYTES):,} changed"
  return None
