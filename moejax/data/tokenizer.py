"""Tokenizers: raw UTF-8 bytes, or SentencePiece trained locally on the corpus.

Both give `bytes_per_token[id]`, the number of UTF-8 bytes a token decodes to
(0 for special tokens), so bits per byte is exact:
  bpb = sum(token NLL in nats) / (ln 2 * sum(bytes_per_token[target])).
Every document is prefixed with BOS, which doubles as the document separator.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Iterable, Protocol

import numpy as np

from moejax.data import checksums
from moejax.errors import ConfigError

# Bump when encode() changes: token caches are keyed by the tokenizer fingerprint.
ENCODER_VERSION = b"moejax-sentencepiece-encode-v2"
BYTE_VOCAB_SIZE = 264  # 256 bytes + pad + bos + 6 reserved: divisible by 2, 4, 8


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  pad_id: int
  bytes_per_token: np.ndarray
  fingerprint: str

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """ids 0..255 are bytes; 256 = pad, 257 = bos; 258..263 unused."""

  vocab_size = BYTE_VOCAB_SIZE
  pad_id = 256
  bos_id = 257
  fingerprint = "bytes-v1"

  def __init__(self):
    self.bytes_per_token = np.zeros(self.vocab_size, np.int32)
    self.bytes_per_token[:256] = 1

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model with pad=0, bos=1 and byte fallback.

  SentencePiece writes spaces as U+2581 ("\u2581"), so a literal U+2581 in the
  text would come back as a space. Encoding therefore splits the text on it and
  emits its three UTF-8 bytes as byte-fallback ids; decoding joins a per-id table
  of the exact bytes each id stands for. Both directions are exact for any text.
  """

  pad_id = 0
  bos_id = 1
  _MARK = "\u2581"

  def __init__(self, model_path: str):
    import sentencepiece as spm
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._sp.get_piece_size()
    with open(model_path, "rb") as f:
      content = f.read()
    self.fingerprint = pieces_fingerprint(content)
    # The hash of the file as written, which also records where it was trained:
    # checkpoints and caches made before pieces_fingerprint recorded this one.
    self.file_fingerprint = hashlib.sha256(content + ENCODER_VERSION).hexdigest()
    self._bytes: list[bytes] = []
    for i in range(self.vocab_size):
      piece = self._sp.id_to_piece(i)
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        self._bytes.append(b"")
      elif self._sp.is_byte(i):  # pieces "<0xAB>"
        self._bytes.append(bytes([int(piece[3:5], 16)]))
      else:
        self._bytes.append(piece.replace(self._MARK, " ").encode("utf-8"))
    self.bytes_per_token = np.array([len(b) for b in self._bytes], np.int32)
    self._mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>")
                      for b in self._MARK.encode("utf-8")]

  def encode(self, text: str) -> list[int]:
    parts = text.split(self._MARK)
    ids = list(self._sp.encode(parts[0]))
    for part in parts[1:]:
      ids += self._mark_ids
      ids += self._sp.encode(part)
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    plain = [t for t in texts if self._MARK not in t]
    fast = iter(self._sp.encode(plain))  # one call for the common case
    return [next(fast) if self._MARK not in t else self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return b"".join(self._bytes[int(i)] for i in ids).decode("utf-8", errors="replace")


def pieces_fingerprint(model_bytes: bytes) -> str:
  """What defines the tokenizer: its pieces, scores and types, its normaliser and
  its settings, less where it was trained (the training file's temporary path);
  with the encoding code's version, which a token cache also depends on."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  del proto.trainer_spec.input[:]
  proto.trainer_spec.ClearField("model_prefix")
  return hashlib.sha256(proto.SerializeToString(deterministic=True)
                        + ENCODER_VERSION).hexdigest()


def sidecar(model_path: str) -> str:
  return model_path + ".json"


def _record(model_path: str) -> None:
  """The tokenizer's checksum and fingerprint, beside it."""
  with open(model_path, "rb") as f:
    fingerprint = pieces_fingerprint(f.read())
  tmp = f"{sidecar(model_path)}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(dict(checksum=checksums.digest(model_path), fingerprint=fingerprint), f,
              indent=2)
  os.replace(tmp, sidecar(model_path))


def problem(model_path: str) -> str | None:
  """Why the tokenizer at `model_path` cannot be used ("missing", or not the file
  that was trained), or None. One without a recorded checksum that loads gets
  its checksum recorded now."""
  if not os.path.exists(model_path):
    return "missing"
  if not os.path.exists(sidecar(model_path)):
    try:
      SentencePieceTokenizer(model_path)
    except Exception as e:  # pylint: disable=broad-except  # any unreadable model
      return f"it does not load ({type(e).__name__})"
    _record(model_path)
    return None
  try:
    with open(sidecar(model_path)) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    return f"its .json does not read ({type(e).__name__})"
  return checksums.mismatch(model_path, recorded.get("checksum"))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str,
                        *, max_lines: int = 300_000) -> None:
  """Trains a BPE model on `texts` (code: whitespace kept, digits split).

  BPE rather than unigram: on source code it gives the same compression at this
  size and trains faster. Normalisation is the identity and no dummy prefix or
  whitespace folding is applied, so decode(encode(s)) == s exactly; unseen
  characters fall back to bytes. Lines are capped (every k-th line kept) to bound
  training time; the choice of lines is deterministic.
  """
  import sentencepiece as spm
  lines = [line for t in texts for line in t.splitlines(keepends=True) if line.strip()]
  stride = max(1, len(lines) // max_lines)
  lines = lines[::stride]
  os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      for line in lines:
        f.write(line.rstrip("\n").replace("\n", " ") + "\n")
    prefix = os.path.join(tmp, "sp")
    try:
      _train(spm, corpus, prefix, vocab_size)
    except RuntimeError as e:
      limit = re.search(r"value <= (\d+)", str(e))
      if limit is None:
        raise
      raise ConfigError(
          f"The training split is too small for --config.data.vocab_size={vocab_size}; "
          f"use at most {limit.group(1)}, or the byte tokenizer.") from None
    tmp_model = f"{model_path}.{os.getpid()}.tmp"  # unique per process
    with open(prefix + ".model", "rb") as src, open(tmp_model, "wb") as dst:
      dst.write(src.read())
    os.replace(tmp_model, model_path)
  _record(model_path)


def _train(spm, corpus: str, prefix: str, vocab_size: int) -> None:
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
      character_coverage=1.0, byte_fallback=True, split_digits=True,
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      split_by_whitespace=True, max_sentence_length=1 << 16,
      pad_id=0, bos_id=1, eos_id=-1, unk_id=2, user_defined_symbols=["\n", "\t"],
      num_threads=2, minloglevel=2, shuffle_input_sentence=False,
      input_sentence_size=0)
