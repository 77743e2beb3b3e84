"""Your own text files as a TFDS dataset: `--config.data.name=files`.

`data.files` is a glob, or several separated by commas (`~` expanded, `**`
recursive). The matched files are read as UTF-8 and cut into documents:
  .jsonl    one document per non-blank line, the text in field `data.text_key`;
  .parquet  one document per row of column `data.text_key` (needs pyarrow);
  any other a text file: the whole file is one document (`data.txt_documents=file`),
            or one per block separated by one or more blank lines (`blank_line`).
Documents with no non-whitespace text are dropped; a file left with none (an
empty file) is skipped with a logged warning, and a corpus with none is refused.

Split, by document and deterministic: paths are relative to the common root of
the matched files (so moving the folder changes nothing), `index` counts the
documents kept in the file from 0, and a document goes to `validation` when
  int(sha256(f"{relative path}#{index}")) % 10000 < data.eval_fraction * 10000,
else to `train`. With `data.eval_files` set, the files it matches are the
validation split and every other matched file is train.

Fingerprint: sha256 over the (relative path, sha256(file bytes)) pairs sorted
by path, then the split settings as JSON (the relative paths of the eval files,
eval_fraction, txt_documents, text_key). The dataset is prepared under the
builder config named by its first 16 hex digits,
data_dir/local_files/<fp16>/1.0.0, so a changed file or another folder prepares
separately, with its own tokenizer and token caches. Every start reads and
hashes every matched file once to find that name; every problem a file can
have is found in that pass and reported as one ConfigError sentence, before
anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging as std_logging
import os
import re

import tensorflow_datasets as tfds
from absl import logging

from moejax.errors import ConfigError

TXT_DOCUMENTS = ("file", "blank_line")  # data.txt_documents
SPLITS = ("train", "validation")
_BLANK_LINES = re.compile(r"\n\s*\n")  # one or more blank (or whitespace-only) lines


@dataclasses.dataclass(frozen=True)
class Settings:
  """The data fields that decide the documents and the split (hashable)."""
  files: str
  eval_files: str = ""
  eval_fraction: float = 0.05
  txt_documents: str = "file"
  text_key: str = "text"

  @classmethod
  def of(cls, data_cfg) -> "Settings":
    return cls(files=str(data_cfg.files), eval_files=str(data_cfg.eval_files),
               eval_fraction=float(data_cfg.eval_fraction),
               txt_documents=str(data_cfg.txt_documents), text_key=str(data_cfg.text_key))


@dataclasses.dataclass(frozen=True)
class SourceFile:
  path: str  # absolute
  relative: str  # to the corpus root, with "/"
  sha256: str
  eval_file: bool  # matched by eval_files: all its documents are validation


@dataclasses.dataclass(frozen=True)
class Corpus:
  """What one pass over the matched files found (hashable: it keys builders)."""
  settings: Settings
  root: str
  files: tuple[SourceFile, ...]
  skipped: tuple[str, ...]  # relative paths of files without documents
  documents: tuple[tuple[str, int], ...]  # (split, count)
  fingerprint: str


def split_of(relative: str, index: int, eval_fraction: float) -> str:
  digest = int(hashlib.sha256(f"{relative}#{index}".encode()).hexdigest(), 16)
  return "validation" if digest % 10000 < eval_fraction * 10000 else "train"


def expand(globs: str, field: str) -> list[str]:
  """Absolute paths of the files the comma-separated globs match, sorted."""
  patterns = [g.strip() for g in globs.split(",") if g.strip()]
  if not patterns:
    raise ConfigError(f"--config.data.{field} is empty; give a glob of your text files, "
                      "e.g. --config.data.files='/data/books/*.txt'.")
  found = set()
  for pattern in patterns:
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    files = [os.path.abspath(m) for m in matches if os.path.isfile(m)]
    if not files:
      what = "only folders (add /*.txt or /**/*)" if matches else "no file"
      raise ConfigError(f"--config.data.{field}: the glob {pattern!r} matches {what} "
                        f"(relative globs start in {os.getcwd()}).")
    found.update(files)
  return sorted(found)


def _decode(path: str, data: bytes) -> str:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ConfigError(
        f"{path} is not UTF-8: the bytes at offset {e.start} (line {line}) do not "
        "decode; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out "
        "of --config.data.files.") from None
  return text[1:] if text.startswith("\ufeff") else text


def _jsonl_documents(path: str, text: str, key: str) -> list[str]:
  docs = []
  for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is text
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} line {number} is not JSON ({e.msg}); each line of a "
                        ".jsonl file must be one JSON object.") from None
    if not isinstance(record, dict) or key not in record:
      raise ConfigError(f"{path} line {number} has no {key!r} field; set "
                        "--config.data.text_key to the field that holds the text.")
    if not isinstance(record[key], str):
      raise ConfigError(f"{path} line {number}: field {key!r} is "
                        f"{type(record[key]).__name__}, not a string.")
    docs.append(record[key])
  return docs


def _parquet_documents(path: str, data: bytes, key: str) -> list[str]:
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise ConfigError(f"Reading {path} needs pyarrow, which is not installed; install "
                      "it with: pip install pyarrow.") from None
  try:
    table = pq.read_table(pa.BufferReader(data))
  except pa.ArrowException as e:
    raise ConfigError(f"{path} is not a readable Parquet file ({e}).") from None
  if key not in table.column_names:
    raise ConfigError(f"{path} has no column {key!r} (it has {table.column_names}); set "
                      "--config.data.text_key to the column that holds the text.")
  docs = table.column(key).to_pylist()
  for row, value in enumerate(docs):
    if not isinstance(value, str):
      raise ConfigError(f"{path} row {row}: column {key!r} holds "
                        f"{type(value).__name__}, not a string.")
  return docs


def read_documents(path: str, data: bytes, settings: Settings) -> list[str]:
  """The documents of one file (raw bytes `data`), empty ones dropped."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".parquet":
    docs = _parquet_documents(path, data, settings.text_key)
  elif suffix == ".jsonl":
    docs = _jsonl_documents(path, _decode(path, data), settings.text_key)
  elif settings.txt_documents == "blank_line":
    docs = [block.lstrip("\r\n").rstrip()
            for block in _BLANK_LINES.split(_decode(path, data))]
  else:
    docs = [_decode(path, data)]
  return [d for d in docs if d.strip()]


def _matched(settings: Settings) -> tuple[str, list[tuple[str, bool]]]:
  """The corpus root and its files as (absolute path, is an eval file)."""
  train = expand(settings.files, "files")
  evals = expand(settings.eval_files, "eval_files") if settings.eval_files.strip() else []
  chosen = [(p, False) for p in train if p not in evals] + [(p, True) for p in evals]
  root = os.path.commonpath([os.path.dirname(p) for p, _ in chosen])
  return root, sorted(chosen)


def scan(settings: Settings) -> Corpus:
  """Reads and checks every matched file once; cached while no file changes."""
  root, chosen = _matched(settings)
  stats = tuple((p, e, *_size_and_mtime(p)) for p, e in chosen)
  return _scan(settings, root, stats)


def _size_and_mtime(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _scan(settings: Settings, root: str, stats: tuple) -> Corpus:
  files, skipped = [], []
  counts = dict.fromkeys(SPLITS, 0)
  for path, eval_file, _, _ in stats:
    with open(path, "rb") as f:
      data = f.read()
    relative = os.path.relpath(path, root).replace(os.sep, "/")
    files.append(SourceFile(path, relative, hashlib.sha256(data).hexdigest(), eval_file))
    docs = read_documents(path, data, settings)
    if not docs:
      logging.warning("data: skipping %s: it holds no text", path)
      skipped.append(relative)
    for index in range(len(docs)):
      counts["validation" if eval_file else
             split_of(relative, index, settings.eval_fraction)] += 1
  where = f"--config.data.files={settings.files!r}"
  if not any(counts.values()):
    raise ConfigError(f"The {len(files)} file(s) matched by {where} hold no text.")
  if not counts["validation"]:
    blocks = ("use --config.data.txt_documents=blank_line for more documents, "
              if settings.txt_documents == "file" else "")
    raise ConfigError(
        f"No document of the {counts['train']} in {where} falls in the validation split "
        f"(eval_fraction={settings.eval_fraction}); raise --config.data.eval_fraction, "
        f"{blocks}or set --config.data.eval_files.")
  if not counts["train"]:
    raise ConfigError(
        f"Every document of {where} is in the validation split, none is left to train on; "
        "lower --config.data.eval_fraction or match fewer files with "
        "--config.data.eval_files.")
  return Corpus(settings=settings, root=root, files=tuple(files), skipped=tuple(skipped),
                documents=tuple(counts.items()), fingerprint=fingerprint(files, settings))


def fingerprint(files: list[SourceFile], settings: Settings) -> str:
  h = hashlib.sha256()
  for f in sorted(files, key=lambda f: f.relative):
    h.update(f.relative.encode() + b"\0" + bytes.fromhex(f.sha256))
  split = dict(eval_files=sorted(f.relative for f in files if f.eval_file),
               eval_fraction=settings.eval_fraction, txt_documents=settings.txt_documents,
               text_key=settings.text_key)
  h.update(json.dumps(split, sort_keys=True).encode())
  return h.hexdigest()


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """One set of files; named by the first 16 hex digits of its fingerprint."""
  corpus: Corpus | None = dataclasses.field(default=None, repr=False)


class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of local text files, one example per document."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: documents split by hash of path#index."}

  def _info(self) -> tfds.core.DatasetInfo:
    corpus = self.builder_config.corpus
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(
            fingerprint=corpus.fingerprint, root=corpus.root, files=len(corpus.files),
            skipped_empty_files=list(corpus.skipped), documents=dict(corpus.documents),
            settings=dataclasses.asdict(corpus.settings)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    corpus = self.builder_config.corpus
    for f in corpus.files:
      with open(f.path, "rb") as handle:
        data = handle.read()
      if hashlib.sha256(data).hexdigest() != f.sha256:
        raise ConfigError(f"{f.path} changed while the dataset was being prepared; "
                          "rerun once the files stay put.")
      for index, text in enumerate(read_documents(f.path, data, corpus.settings)):
        doc_split = "validation" if f.eval_file else split_of(
            f.relative, index, corpus.settings.eval_fraction)
        if doc_split == split:
          yield f"{f.relative}#{index}", {"text": text, "path": f.relative}


class _WithoutCustomConfigWarning(std_logging.Filter):
  """TFDS warns whenever a config is not in a class-level list; ours never is."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


def builder(corpus: Corpus, data_dir: str) -> LocalFiles:
  config = LocalFilesConfig(name=corpus.fingerprint[:16], corpus=corpus,
                            description=f"files under {corpus.root}")
  quiet = _WithoutCustomConfigWarning()
  logging.get_absl_logger().addFilter(quiet)
  try:
    return LocalFiles(data_dir=data_dir, config=config, file_format="array_record")
  finally:
    logging.get_absl_logger().removeFilter(quiet)
