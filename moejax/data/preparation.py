"""Preparing data offline: corpus -> tokenizer -> token caches, each built once.

The command line is moejax/data/prepare.py. Several processes on one machine may call `prepare_all` at once (multi-process
runs): a file lock in data_dir makes one build while the others wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import time

from moejax.data import tfds_access, token_cache
from moejax.data import tokenizer as tokenizer_lib
from moejax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from moejax.errors import ConfigError


def log(msg: str) -> None:
  print(f"data: {msg}", flush=True)


@contextlib.contextmanager
def _file_lock(data_dir: str):
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".moejax_prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _version(builder) -> str:
  return str(builder.version)


def tokenizer_path(data_cfg, data_dir: str) -> str:
  """Keyed by dataset, version, content fingerprint (where recorded) and vocab:
  a rebuilt corpus with other content never reuses a tokenizer trained on the old."""
  builder = tfds_access.builder_for(data_cfg, data_dir)
  name = data_cfg.name.replace("/", "__")
  fingerprint = (builder.info.metadata or {}).get("fingerprint")
  content = f"-{fingerprint[:12]}" if fingerprint else ""
  return os.path.join(data_dir, "moejax_tokenizers",
                      f"{name}-{_version(builder)}{content}-sp{data_cfg.vocab_size}.model")


def tokenizer_for(data_cfg, data_dir: str):
  """The tokenizer of a prepared TFDS dataset: bytes, or its trained sentencepiece."""
  if data_cfg.tokenizer == "byte":
    return ByteTokenizer()
  path = tokenizer_path(data_cfg, data_dir)
  problem = tokenizer_lib.problem(path)
  if problem is not None:
    what = "missing" if problem == "missing" else f"not as trained ({problem})"
    raise ConfigError(f"The tokenizer {path} is {what}; delete it if present and rerun: "
                      "data preparation trains it again.")
  return _load_sentencepiece(path)


@functools.lru_cache(maxsize=8)
def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
  return SentencePieceTokenizer(path)


def cache_path(data_cfg, data_dir: str, tokenizer, split: str) -> str:
  """Keyed by dataset, its files' builder config (one per set of files), version
  and tokenizer: the byte tokenizer is the same for every set of files."""
  builder = tfds_access.builder_for(data_cfg, data_dir)
  files_config = builder.builder_config.name if data_cfg.name == tfds_access.FILES else ""
  d = token_cache.cache_dir(data_dir, data_cfg.name, _version(builder), tokenizer.fingerprint,
                            config=files_config)
  return os.path.join(d, f"{split.replace('/', '_')}.npy")


# What a prepared corpus records about its content (builder metadata), copied
# into corpus.json and the token caches' .json files.
_CONTENT_KEYS = ("fingerprint", "python_version", "root", "files", "documents")


def _corpus_meta(builder) -> dict:
  meta = dict(dataset=builder.name, version=_version(builder))
  extra = getattr(builder.info, "metadata", None) or {}
  meta.update({k: extra[k] for k in _CONTENT_KEYS if k in extra})
  return meta


def _text_feature(data_cfg) -> str:
  """Local files store every document under "text"; text_key named it in the files."""
  return "text" if data_cfg.name == tfds_access.FILES else data_cfg.text_key


def _describe(data_cfg, data_dir: str) -> str:
  if data_cfg.name == tfds_access.FILES:
    return f"the files {data_cfg.files!r} in {data_dir}"
  return f"the embedded corpus (Python standard library source) in {data_dir}"


def prepare_all(data_cfg, data_dir: str, *, tokenizer=None, splits=None) -> None:
  """Corpus (embedded, local files), tokenizer and the token caches of `splits`
  (default: train and eval). With `tokenizer` (another run's), no tokenizer is
  trained and the caches are keyed by the given one's fingerprint."""
  with _file_lock(data_dir):
    builder = tfds_access.builder_for(data_cfg, data_dir)
    if not tfds_access.is_prepared(builder):
      if data_cfg.name not in (tfds_access.EMBEDDED, tfds_access.FILES):
        raise RuntimeError(f"{data_cfg.name} is not prepared in {data_dir}")  # check_ready says how
      start = time.time()
      log(f"preparing {_describe(data_cfg, data_dir)}")
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      tfds_access.forget_builders()
      builder = tfds_access.builder_for(data_cfg, data_dir)
      log(f"corpus ready in {time.time() - start:.1f} s: {builder.data_path}")
    corpus_json = os.path.join(builder.data_path, "corpus.json")
    if (data_cfg.name in (tfds_access.EMBEDDED, tfds_access.FILES)
        and not os.path.exists(corpus_json)):
      tmp = f"{corpus_json}.{os.getpid()}.tmp"  # unique per process
      with open(tmp, "w") as f:
        json.dump(_corpus_meta(builder), f, indent=2)
      os.replace(tmp, corpus_json)
    if data_cfg.tokenizer == "sentencepiece" and tokenizer is None:
      path = tokenizer_path(data_cfg, data_dir)
      problem = tokenizer_lib.problem(path)
      if problem not in (None, "missing"):
        log(f"the tokenizer {path} is not as trained ({problem}); training it again")
      if problem is not None:
        start = time.time()
        log(f"training a sentencepiece tokenizer (vocab {data_cfg.vocab_size}) on "
             f"{data_cfg.name}/{data_cfg.train_split}")
        train_sentencepiece(tfds_access.read_texts(builder, data_cfg.train_split,
                                                   _text_feature(data_cfg)),
                            data_cfg.vocab_size, path)
        _load_sentencepiece.cache_clear()  # a tokenizer loaded before is stale
        log(f"tokenizer ready in {time.time() - start:.1f} s: {path}")
    tokenizer = tokenizer or tokenizer_for(data_cfg, data_dir)
    for split in splits or (data_cfg.train_split, data_cfg.eval_split):
      if split not in builder.info.splits:
        raise ConfigError(f"Dataset {data_cfg.name!r} has no split {split!r} (it has "
                          f"{sorted(builder.info.splits)}).")
      path = cache_path(data_cfg, data_dir, tokenizer, split)
      problem = token_cache.problem(path)
      if problem is None:
        continue
      if problem != "missing":
        log(f"the token cache {path} is not as written ({problem}); rebuilding it")
      start = time.time()
      meta = dict(_corpus_meta(builder), split=split,
                  tokenizer_fingerprint=tokenizer.fingerprint)
      texts = tfds_access.read_texts(builder, split, _text_feature(data_cfg))
      info = token_cache.build(path, texts, tokenizer, meta)
      log(f"tokenized {split}: {info['documents']:,} documents, {info['tokens']:,} tokens "
           f"from {info['bytes']:,} bytes in {time.time() - start:.1f} s")
