"""Any prepared TFDS dataset by name: the path lm1b or c4 take, on a local stand-in.

A GeneratorBasedBuilder defined here registers itself in the TFDS catalog under
its snake-case class name, exactly as catalog datasets do; it is prepared as
array_record in a temporary data_dir and then used like `--config.data.name=lm1b`.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import moejax.data as data
from moejax.errors import ConfigError
from moejax.train import train_and_evaluate
from tests.helpers import tiny_config


class MoejaxTestSentences(tfds.core.GeneratorBasedBuilder):
  """Short English-like sentences with an lm1b-style 'text' feature."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 400), "test": self._generate_examples(1, 40)}

  def _generate_examples(self, seed, n):
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(np.random.default_rng(k).choice(letters, size=2 + k % 6))
             for k in range(300)] + ["the", "cat", "sat", "on", "a", "mat"]
    for i in range(n):
      yield i, {"text": " ".join(rng.choice(words, size=rng.integers(4, 12))) + "."}


def test_prepared_named_dataset_trains_like_lm1b(tmp_path):
  overrides = {"data.name": "moejax_test_sentences", "data.data_dir": str(tmp_path),
               "data.tokenizer": "sentencepiece", "data.vocab_size": 320,
               "data.eval_split": "test", "train.steps": 8}
  with pytest.raises(ConfigError, match="tfds build moejax_test_sentences"):
    data.check_ready(tiny_config(**overrides).data)
  MoejaxTestSentences(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  data.tfds_access.forget_builders()  # the unprepared builder was cached above
  with pytest.raises(ConfigError, match="eval_split='validation': dataset "
                     "'moejax_test_sentences' has no such split"):
    data.check_ready(tiny_config(**{**overrides, "data.eval_split": "validation"}).data)
  with pytest.raises(ConfigError, match=r"too small for --config.data.vocab_size=65536; use at most \d+"):
    data.prepare(tiny_config(**{**overrides, "data.vocab_size": 65536}).data)

  final = train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
  assert final["status"] == "completed" and np.isfinite(final["eval/loss"])
  assert final["dataset"]["name"] == "moejax_test_sentences"
  assert final["dataset"]["train_tokens"] > 400 and final["dataset"]["eval_tokens"] > 40
  tok = data.load_tokenizer(tiny_config(**overrides).data)
  assert tok.decode(tok.encode("the cat sat on a mat.")) == "the cat sat on a mat."
