"""Finding and reading prepared TFDS datasets, offline and without TensorFlow.

Reading goes through `as_data_source()` (array_record, random access, NumPy
decoding): TensorFlow is never imported during training.
"""

from __future__ import annotations

import functools
import os

import tensorflow_datasets as tfds

from moejax.errors import ConfigError

EMBEDDED = "stdlib_source"
FILES = "files"  # local text files (local_files.py)


def disable_gcs() -> None:
  """No probing of gs://tfds-data: it stalls for a minute per request offline."""
  os.environ.setdefault("NO_GCE_CHECK", "true")
  gcs_utils = getattr(getattr(tfds.core, "utils", None), "gcs_utils", None)
  if gcs_utils is not None and hasattr(gcs_utils, "_is_gcs_disabled"):
    gcs_utils._is_gcs_disabled = True


@functools.lru_cache(maxsize=16)
def get_builder(name: str, data_dir: str):
  """The builder of the embedded corpus or of a TFDS catalog dataset (cached).

  Callers that prepare a dataset call `forget_builders()` afterwards, since a
  builder reads its dataset_info.json once, at construction.
  """
  disable_gcs()
  if name == EMBEDDED:
    from moejax.data.stdlib_corpus import StdlibSource
    return StdlibSource(data_dir=data_dir, file_format="array_record")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(
        f"Unknown dataset --config.data.name={name!r}: use 'stdlib_source' (embedded), "
        "'synthetic', or a TFDS catalog name such as 'lm1b'.") from None


def builder_for(data_cfg, data_dir: str):
  """The builder of a data config: `get_builder` by name, or, for `files`, the
  builder of the files the config matches now (one per content fingerprint).

  Reads and hashes the matched files (cached until one changes); a problem with
  them is raised here as a ConfigError.
  """
  if data_cfg.name != FILES:
    return get_builder(data_cfg.name, data_dir)
  from moejax.data import local_files
  return _files_builder(local_files.scan(local_files.Settings.of(data_cfg)), data_dir)


@functools.lru_cache(maxsize=16)
def _files_builder(corpus, data_dir: str):
  disable_gcs()
  from moejax.data import local_files
  return local_files.builder(corpus, data_dir)


def forget_builders() -> None:
  get_builder.cache_clear()
  _files_builder.cache_clear()


def is_prepared(builder) -> bool:
  return (builder.data_path / "dataset_info.json").exists()


def file_format(builder) -> str:
  fmt = builder.info.file_format
  return getattr(fmt, "value", str(fmt))


def read_texts(builder, split: str, text_key: str):
  """Yields the documents of `split` as str, in the prepared files' order."""
  source = builder.as_data_source(split=split)
  for i in range(len(source)):
    value = source[i][text_key]
    yield value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
