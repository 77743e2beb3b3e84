"""The embedded corpus, the tokenizers, and the data errors a user can hit."""

import hashlib
import os

import numpy as np
import pytest

import moejax.data as data
from moejax.data import preparation, stdlib_corpus
from moejax.data import tokenizer as tokenizer_lib
from moejax.data.tokenizer import ByteTokenizer
from moejax.errors import ConfigError
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The embedded corpus prepared once, with a small sentencepiece vocabulary."""
  cfg = tiny_config(**{"data.name": "stdlib_source", "data.tokenizer": "sentencepiece",
                       "data.vocab_size": 512,
                       "data.data_dir": str(tmp_path_factory.mktemp("tfds"))}).data
  data.check_ready(cfg)
  data.prepare(cfg)
  return cfg


def test_split_is_by_file_and_deterministic():
  files = stdlib_corpus.source_files()
  root = stdlib_corpus.stdlib_root()
  rel = [p.relative_to(root).as_posix() for p in files]
  assert len(rel) > 300 and not any("site-packages" in r or "/test/" in f"/{r}" for r in rel)
  val = {r for r in rel if stdlib_corpus.split_of(r) == "validation"}
  # Written out: sha256 of the path, as an integer, mod 100 below 5.
  want = {r for r in rel if int(hashlib.sha256(r.encode()).hexdigest(), 16) % 100 < 5}
  assert val == want and 0.02 < len(val) / len(rel) < 0.09


def test_prepared_corpus_records_version_and_fingerprint(prepared):
  info = data.dataset_info(prepared)
  assert info["version"] == "1.0.0"
  assert info["fingerprint"] == stdlib_corpus.corpus_fingerprint()
  assert info["train_tokens"] > 20 * info["eval_tokens"] > 0
  builder = data.tfds_access.get_builder(prepared.name, data.resolve_data_dir(prepared))
  val_paths = {ex["path"].decode() for ex in builder.as_data_source(split="validation")}
  train_paths = {ex["path"].decode() for ex in builder.as_data_source(split="train")}
  assert val_paths and not val_paths & train_paths
  assert len(val_paths | train_paths) == len(stdlib_corpus.source_files())


def test_sentencepiece_round_trips_and_counts_bytes_exactly(prepared):
  tok = data.load_tokenizer(prepared)
  assert tok.vocab_size == 512 and tok.bos_id == 1
  for p in stdlib_corpus.source_files()[:40]:
    text = p.read_text("utf-8", errors="replace")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.bytes_per_token[ids].sum()) == len(text.encode("utf-8"))
    assert len(ids) < len(text.encode("utf-8"))  # it compresses
  odd = "ünïcödé 🙂\tsnake_case  = 12345\n\n a\u2581b \u2581\u2581"  # U+2581 is sp's space
  assert tok.decode(tok.encode(odd)) == odd
  assert int(tok.bytes_per_token[tok.encode(odd)].sum()) == len(odd.encode("utf-8"))
  batch = tok.encode_batch(["plain text", odd, "x = 1"])
  assert batch == [tok.encode("plain text"), tok.encode(odd), tok.encode("x = 1")]


def test_byte_tokenizer_round_trips_and_counts_bytes():
  tok = ByteTokenizer()
  text = "héllo\n🙂"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
  assert int(tok.bytes_per_token[ids].sum()) == len(text.encode("utf-8"))
  assert tok.bytes_per_token[tok.bos_id] == 0 and tok.vocab_size % 8 == 0


def test_token_cache_is_the_tokenized_documents(prepared):
  tok = data.load_tokenizer(prepared)
  stream = data.RunData(prepared).stream("validation")
  builder = data.tfds_access.get_builder(prepared.name, data.resolve_data_dir(prepared))
  texts = [ex["text"].decode() for ex in builder.as_data_source(split="validation")]
  want = [x for t in texts for x in [tok.bos_id, *tok.encode(t)]]
  assert stream.tolist() == want


def test_missing_or_bad_data_errors_name_the_fix(tmp_path):
  def err(**overrides):
    with pytest.raises(ConfigError) as e:
      data.check_ready(tiny_config(**overrides).data)
    return str(e.value)

  msg = err(**{"data.name": "stdlib_source", "data.auto_prepare": False,
               "data.data_dir": str(tmp_path)})
  assert f"python3 -m moejax.data.prepare --dataset=stdlib_source --data_dir={tmp_path}" in msg
  msg = err(**{"data.name": "lm1b", "data.tokenizer": "byte", "data.data_dir": str(tmp_path)})
  assert f"tfds build lm1b --file_format=array_record --data_dir={tmp_path}" in msg
  assert "Unknown dataset" in err(**{"data.name": "no_such_dataset_xyz",
                                     "data.data_dir": str(tmp_path)})
  assert "data.tokenizer" in err(**{"data.tokenizer": "wordpiece"})
  assert "gcsfuse" in err(**{"data.name": "lm1b", "data.data_dir": "gs://bucket/tfds"})
  assert "at least 320" in err(**{"data.name": "stdlib_source",
                                   "data.tokenizer": "sentencepiece", "data.vocab_size": 100})


def test_synthetic_stream_is_deterministic_and_learnable():
  a, b = data.synthetic.stream("train"), data.synthetic.stream("train")
  assert a is b or np.array_equal(a, b)
  assert not np.array_equal(a[:1000], data.synthetic.stream("eval")[:1000])
  # Next-token predictability: the most frequent successor covers ~70% of pairs.
  x = a[a != ByteTokenizer.bos_id].astype(np.int64)
  pairs = x[:-1] * 256 + x[1:]
  counts = np.bincount(pairs, minlength=256 * 256).reshape(256, 256)
  top = counts.max(1).sum() / counts.sum()
  assert 0.6 < top < 0.8


def test_a_corpus_prepared_from_other_files_is_refused(prepared, tmp_path):
  import json
  import shutil
  src = data.resolve_data_dir(prepared)
  copy = tmp_path / "copy"
  shutil.copytree(src, copy)
  meta_path = copy / "stdlib_source" / "1.0.0" / "metadata.json"
  meta = json.loads(meta_path.read_text())
  meta["fingerprint"] = "0" * 64  # as if another Python's stdlib had been prepared
  meta_path.write_text(json.dumps(meta))
  cfg = tiny_config(**{"data.name": "stdlib_source", "data.tokenizer": "sentencepiece",
                       "data.vocab_size": 512, "data.data_dir": str(copy)}).data
  data.tfds_access.forget_builders()
  with pytest.raises(ConfigError, match="prepared from other files.*delete that folder"):
    data.check_ready(cfg)
  data.check_ready(prepared)  # the untouched original passes


def test_a_token_cache_that_is_not_as_written_is_rebuilt(prepared, capsys):
  """Overwritten with other valid token ids of the same size, or cut short: the
  checksum recorded when it was written catches both, and the cache is rebuilt."""
  path = data.RunData(prepared).cache_path("validation")
  original = np.load(path).copy()
  shuffled = np.random.default_rng(0).permutation(original)  # valid ids, same size
  np.save(path, shuffled)
  assert os.path.getsize(path) == original.nbytes + 128  # the npy header
  data.prepare(prepared)
  assert f"the token cache {path} is not as written (bytes 0 to" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(path), original)

  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  data.prepare(prepared)
  assert "is not as written (its size is" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(path), original)
  data.prepare(prepared)  # whole now: nothing is rebuilt
  assert "rebuilding" not in capsys.readouterr().out


def test_a_tokenizer_that_is_not_as_trained_is_retrained_with_the_same_pieces(
    prepared, capsys):
  """The fingerprint is what defines the tokenizer, not where it was trained: the
  retrained file differs (it records its training path) but its fingerprint does
  not, so the token caches and runs keyed by it stay valid."""
  data_dir = data.resolve_data_dir(prepared)
  path = preparation.tokenizer_path(prepared, data_dir)
  before = data.load_tokenizer(prepared).fingerprint
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[: len(content) // 2])
  with pytest.raises(ConfigError, match=r"is not as trained \(its size is .*delete it"):
    preparation.tokenizer_for(prepared, data_dir)
  data.prepare(prepared)
  out = capsys.readouterr().out
  assert f"the tokenizer {path} is not as trained" in out and "tokenized" not in out
  with open(path, "rb") as f:
    retrained = f.read()
  assert retrained != content
  assert tokenizer_lib.pieces_fingerprint(retrained) == before == (
      data.load_tokenizer(prepared).fingerprint)
