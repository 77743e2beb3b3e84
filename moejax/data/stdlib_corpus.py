"""The embedded corpus: the running Python's standard library source, as TFDS.

Every machine with Python has it, so the default job needs no network. Each
example is one `.py` file (site-packages, tests, idlelib and lib2to3 left out).
The split is by file and deterministic: a file is in `validation` when
int(sha256(relative path)) mod 100 < 5, else in `train`. The corpus differs
between Python versions, so its fingerprint (sha256 over the sorted
(path, sha256(content)) pairs) and the Python version are recorded in the
dataset's metadata and in `corpus.json` beside the prepared files.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import platform
import sysconfig

import tensorflow_datasets as tfds

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def source_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
  root = root or stdlib_root()
  return sorted(p for p in root.rglob("*.py")
                if not EXCLUDED_DIRS & set(p.relative_to(root).parts))


def split_of(relative_path: str) -> str:
  digest = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16)
  return "validation" if digest % 100 < VALIDATION_PERCENT else "train"


@functools.lru_cache(maxsize=4)
def corpus_fingerprint(root: pathlib.Path | None = None) -> str:
  """sha256 over sorted (path, sha256(content)); cached: it reads every file."""
  root = root or stdlib_root()
  h = hashlib.sha256()
  for p in source_files(root):
    h.update(p.relative_to(root).as_posix().encode())
    h.update(hashlib.sha256(p.read_bytes()).digest())
  return h.hexdigest()


class StdlibSource(tfds.core.GeneratorBasedBuilder):
  """Python standard library source files, one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: .py files, split by path hash (5% validation)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(
            python_version=platform.python_version(),
            fingerprint=corpus_fingerprint()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    root = stdlib_root()
    for p in source_files(root):
      rel = p.relative_to(root).as_posix()
      if split_of(rel) == split:
        yield rel, {"text": p.read_text("utf-8", errors="replace"), "path": rel}
