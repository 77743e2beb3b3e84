"""Data: the embedded corpus, TFDS datasets, tokenizers, packing and batches.

A run resolves its data once, as a RunData (below), which the trainer, the
evaluation and extensions share. Datasets:
  stdlib_source  the running Python's standard library source (embedded, offline)
  synthetic      a learnable Markov-chain stream for tests
  files          your own text files, data.files a glob (local_files.py)
  <any TFDS name> prepared as array_record under data_dir (e.g. lm1b)
"""

from __future__ import annotations

import functools
import os

from moejax.data import local_files
from moejax.data import preparation as _prepare
from moejax.data import stdlib_corpus as _stdlib_corpus
from moejax.data import synthetic as _synthetic
from moejax.data import tfds_access
from moejax.data import token_cache
from moejax.data.batches import BatchIterator
from moejax.data.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer
from moejax.errors import ConfigError

SYNTHETIC = "synthetic"

TOKENIZERS = ("sentencepiece", "byte")
MIN_SENTENCEPIECE_VOCAB = 320  # 256 byte-fallback pieces + specials + some merges


def resolve_data_dir(data_cfg) -> str:
  """data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.

  A local path: tokenizers and token caches are written beside the data and
  memory-mapped. On a cloud TPU, mount the bucket (gcsfuse) and point here.
  """
  d = data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  if "://" in d:
    raise ConfigError(
        f"--config.data.data_dir={d} is a remote URL, but token caches are memory-mapped "
        "from local files; mount the bucket (e.g. gcsfuse) and pass the mount path.")
  path = os.path.abspath(os.path.expanduser(d))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"The data directory {path} is a file; set --config.data.data_dir "
                      "(or $TFDS_DATA_DIR) to a directory.")
  return path


def vocab_size(data_cfg) -> int:
  if data_cfg.name == SYNTHETIC or data_cfg.tokenizer == "byte":
    return BYTE_VOCAB_SIZE
  return int(data_cfg.vocab_size)


def prepare_command(data_cfg, data_dir: str) -> str:
  """The command that prepares this config's dataset, tokenizer and token caches."""
  command = f"python3 -m moejax.data.prepare --dataset={data_cfg.name} --data_dir={data_dir}"
  if data_cfg.name == tfds_access.FILES:
    command += (f" --files='{data_cfg.files}' --eval_files='{data_cfg.eval_files}' "
                f"--eval_fraction={data_cfg.eval_fraction} "
                f"--txt_documents={data_cfg.txt_documents} --text_key={data_cfg.text_key}")
  return command + f" --tokenizer={data_cfg.tokenizer} --vocab_size={data_cfg.vocab_size}"


def check_ready(data_cfg, *, splits=None) -> None:
  """Raises ConfigError, with the command that fixes it, if data can't be had.
  splits: the splits that must exist (default: the train and eval splits)."""
  if data_cfg.tokenizer not in TOKENIZERS:
    raise ConfigError(f"Unknown --config.data.tokenizer={data_cfg.tokenizer!r}; "
                      f"choose one of {list(TOKENIZERS)}.")
  if data_cfg.name == SYNTHETIC:
    return
  if data_cfg.tokenizer == "sentencepiece" and data_cfg.vocab_size < MIN_SENTENCEPIECE_VOCAB:
    raise ConfigError(f"--config.data.vocab_size={data_cfg.vocab_size} is too small for "
                      f"sentencepiece with byte fallback; use at least "
                      f"{MIN_SENTENCEPIECE_VOCAB}.")
  data_dir = resolve_data_dir(data_cfg)
  builder = tfds_access.builder_for(data_cfg, data_dir)  # files: reads and checks them
  if data_cfg.name in (tfds_access.EMBEDDED, tfds_access.FILES):
    if not data_cfg.auto_prepare and not tfds_access.is_prepared(builder):
      what, it = (("These files are", "them") if data_cfg.name == tfds_access.FILES
                  else ("The embedded corpus is", "it"))
      raise ConfigError(
          f"{what} not prepared in {data_dir} and data.auto_prepare is off; prepare "
          f"{it} with: {prepare_command(data_cfg, data_dir)}")
  if data_cfg.name in (tfds_access.EMBEDDED, tfds_access.FILES):
    # Their splits are fixed: refuse another before any workdir is made.
    _check_splits(data_cfg, splits, _stdlib_corpus.SPLITS if data_cfg.name ==
                  tfds_access.EMBEDDED else local_files.SPLITS)
  if data_cfg.name == tfds_access.FILES:
    return  # the builder is named by the files' fingerprint: it is theirs
  if data_cfg.name == tfds_access.EMBEDDED:
    if tfds_access.is_prepared(builder):
      recorded = (builder.info.metadata or {}).get("fingerprint")
      current = _stdlib_corpus.corpus_fingerprint()
      if recorded != current:
        raise ConfigError(
            f"The embedded corpus in {builder.data_path} was prepared from other files "
            f"(fingerprint {str(recorded)[:12]} vs {current[:12]} for this Python's "
            "standard library: another Python or an older moejax built it); delete that "
            "folder to rebuild it, or set --config.data.data_dir elsewhere.")
    return
  if not tfds_access.is_prepared(builder):
    raise ConfigError(
        f"Dataset {data_cfg.name!r} is not prepared in {data_dir}; prepare it with: "
        f"tfds build {data_cfg.name} --file_format=array_record --data_dir={data_dir}")
  if tfds_access.file_format(builder) != "array_record":
    raise ConfigError(
        f"Dataset {data_cfg.name!r} in {builder.data_path} is stored as "
        f"{tfds_access.file_format(builder)}, which needs TensorFlow to read; convert it "
        f"with: tfds convert_format --dataset_dir={builder.data_path} "
        "--out_file_format=array_record")
  _check_splits(data_cfg, splits, builder.info.splits)


def _check_splits(data_cfg, splits, available) -> None:
  for field in ("train_split", "eval_split"):
    split = data_cfg[field]
    if splits is None and split not in available:
      raise ConfigError(
          f"--config.data.{field}={split!r}: dataset {data_cfg.name!r} has no such split "
          f"(it has {sorted(available)}).")
  for split in splits or ():
    if split not in available:
      raise ConfigError(f"Dataset {data_cfg.name!r} has no split {split!r} (it has "
                        f"{sorted(available)}).")


class RunData:
  """One run's data, resolved once: where it lives, its tokenizer, its token
  streams, its iterators and what identifies it. The trainer, the evaluation and
  extensions that read the data before the model is built (L3's allocation)
  share one instance instead of re-deriving paths and tokenizers from the config
  at each call.

    data = RunData.prepare(cfg.data)     # builds what is missing, once
    data.tokenizer, data.vocab_size, data.info
    data.train_iterator(seq_len=..., global_batch=..., seed=..., rows=...)
    data.eval_iterator(seq_len=..., global_batch=..., rows=...)
    data.train_tokens(limit)             # the first tokens of the training split
  """

  def __init__(self, data_cfg, *, tokenizer=None):
    """tokenizer: read the data with this one (another run's) instead of its own."""
    self.cfg = data_cfg
    self.synthetic = data_cfg.name == SYNTHETIC
    self.data_dir = None if self.synthetic else resolve_data_dir(data_cfg)
    self._info = None
    self._given_tokenizer = tokenizer

  @classmethod
  def prepare(cls, data_cfg) -> "RunData":
    """Builds, once, whatever is missing (corpus, tokenizer, token caches)."""
    data = cls(data_cfg)
    if not data.synthetic:
      _prepare.prepare_all(data_cfg, data.data_dir)
    return data

  @classmethod
  def for_tokenizer(cls, data_cfg, tokenizer, *, splits) -> "RunData":
    """This dataset read with a trained run's tokenizer (scoring a model on data it
    was not trained on): prepares the corpus if it is the embedded one or local
    files, and tokenizes `splits` with `tokenizer` once, into caches keyed by the
    tokenizer's fingerprint."""
    check_ready(data_cfg, splits=splits)
    data = cls(data_cfg, tokenizer=tokenizer)
    if not data.synthetic:
      _prepare.prepare_all(data_cfg, data.data_dir, tokenizer=tokenizer, splits=splits)
    return data

  @functools.cached_property
  def tokenizer(self):
    if self._given_tokenizer is not None:
      return self._given_tokenizer
    if self.synthetic:
      return ByteTokenizer()
    return _prepare.tokenizer_for(self.cfg, self.data_dir)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def cache_path(self, split: str) -> str:
    """The .npy token cache of `split` (prepared datasets only)."""
    return _prepare.cache_path(self.cfg, self.data_dir, self.tokenizer, split)

  def stream(self, split: str):
    """The token stream of `split`, memory-mapped."""
    if self.synthetic:
      return _synthetic.stream("train" if split == self.cfg.train_split else "eval")
    return token_cache.load(self.cache_path(split))

  def train_tokens(self, limit: int):
    """The first `limit` tokens of the training split (all of it if limit <= 0): a
    prefix in the prepared files' order, not a sample."""
    if not self.synthetic and not os.path.exists(self.cache_path(self.cfg.train_split)):
      raise ConfigError(
          f"The training tokens of {self.cfg.name!r} are not prepared "
          f"({self.cache_path(self.cfg.train_split)} is missing); prepare them with: "
          f"{prepare_command(self.cfg, self.data_dir)}")
    stream = self.stream(self.cfg.train_split)
    return stream[:limit] if limit > 0 else stream

  def train_iterator(self, *, seq_len, global_batch, seed, process_index=0,
                     process_count=1, rows=None) -> BatchIterator:
    """Refuses a training split shorter than one batch: the iterator would repeat
    its few windows inside every batch."""
    stream = self.stream(self.cfg.train_split)
    if len(stream) < global_batch * (seq_len + 1):
      raise ConfigError(
          f"The training split of {self.cfg.name!r} holds {len(stream):,} tokens, fewer "
          f"than one batch of --config.train.global_batch={global_batch} x "
          f"(--config.data.seq_len={seq_len} + 1) = {global_batch * (seq_len + 1):,} "
          "tokens; add text, or lower global_batch or seq_len.")
    return BatchIterator(stream, seq_len=seq_len,
                         global_batch=global_batch, seed=seed, shuffle=True,
                         bos_id=self.tokenizer.bos_id, process_index=process_index,
                         process_count=process_count, rows=rows)

  def eval_iterator(self, *, seq_len, global_batch, process_index=0, process_count=1,
                    rows=None) -> BatchIterator:
    stream = self.stream(self.cfg.eval_split)
    if len(stream) < seq_len + 1:
      raise ConfigError(
          f"The validation split of {self.cfg.name!r} holds {len(stream):,} tokens, fewer "
          f"than one sequence of --config.data.seq_len={seq_len} + 1; lower seq_len or "
          "give it more text (data.eval_fraction or data.eval_files for local files).")
    return BatchIterator(stream, seq_len=seq_len,
                         global_batch=global_batch, seed=0, shuffle=False,
                         bos_id=self.tokenizer.bos_id, process_index=process_index,
                         process_count=process_count, rows=rows)

  @property
  def info(self) -> dict:
    """What identifies the data of a run: recorded in checkpoints and final.json."""
    if self._info is None:
      self._info = self._read_info()
    return self._info

  def split_info(self, split: str) -> dict:
    """What identifies one split as read here: dataset, tokenizer, tokens, bytes."""
    tok = self.tokenizer
    info = dict(name=self.cfg.name, split=split, tokenizer_fingerprint=tok.fingerprint,
                vocab_size=tok.vocab_size)
    if self.synthetic:
      return dict(info, tokens=int(len(self.stream(split))))
    meta = token_cache.load_info(self.cache_path(split))
    return dict(info, documents=meta["documents"], tokens=meta["tokens"],
                bytes=meta["bytes"], version=meta["version"],
                fingerprint=meta.get("fingerprint"))

  def _read_info(self) -> dict:
    tok, c = self.tokenizer, self.cfg
    info = dict(name=c.name, tokenizer="byte" if self.synthetic else c.tokenizer,
                tokenizer_fingerprint=tok.fingerprint, vocab_size=tok.vocab_size)
    if getattr(tok, "file_fingerprint", None):
      info["tokenizer_file_fingerprint"] = tok.file_fingerprint
    if self.synthetic:
      info.update(train_tokens=int(_synthetic.TRAIN_TOKENS),
                  eval_tokens=int(_synthetic.EVAL_TOKENS))
      return info
    for role, split in (("train", c.train_split), ("eval", c.eval_split)):
      meta = token_cache.load_info(self.cache_path(split))
      info[f"{role}_tokens"], info[f"{role}_bytes"] = meta["tokens"], meta["bytes"]
      info.update(version=meta["version"], fingerprint=meta.get("fingerprint"),
                  python_version=meta.get("python_version"))
    return info


# One-call forms of RunData, for code and tests that need a single piece.
def prepare(data_cfg) -> None:
  """Builds, once, whatever is missing: corpus, tokenizer, token caches."""
  RunData.prepare(data_cfg)


def load_tokenizer(data_cfg):
  return RunData(data_cfg).tokenizer


def make_train_iterator(data_cfg, **kwargs) -> BatchIterator:
  return RunData(data_cfg).train_iterator(**kwargs)


def make_eval_iterator(data_cfg, **kwargs) -> BatchIterator:
  return RunData(data_cfg).eval_iterator(**kwargs)


def dataset_info(data_cfg) -> dict:
  return RunData(data_cfg).info
