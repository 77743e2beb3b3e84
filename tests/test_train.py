"""End-to-end training in-process: outputs, the NaN guard, config validation."""

import json
import os

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.checkpoint import Checkpointer
from moejax.errors import ConfigError, NonFiniteLossError
from moejax.train import train_and_evaluate
from tests.helpers import losses_by_step, read_metrics, tiny_config


def test_trains_and_writes_all_outputs(tmp_path):
  cfg = tiny_config(**{"train.steps": 40, "train.learning_rate": 1e-2,
                       "train.eval_every": 20, "debug.tensorboard": True})
  final = train_and_evaluate(cfg, str(tmp_path))
  files = set(os.listdir(tmp_path))
  assert {"config.json", "metrics.jsonl", "final.json", "checkpoints",
          "tensorboard"} <= files
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == config_lib.to_dict(cfg)
  with open(tmp_path / "final.json") as f:
    on_disk = json.load(f)
  assert on_disk["status"] == "completed" and on_disk["step"] == 40
  assert on_disk["eval/loss"] == pytest.approx(final["eval/loss"])
  assert 0 < final["eval/bits_per_byte"] < 8.5
  losses = losses_by_step(str(tmp_path))
  assert sorted(losses) == list(range(1, 41))
  assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 0.5  # it learns
  rows = read_metrics(str(tmp_path))
  assert any("eval/loss" in r and r["step"] == 20 for r in rows)
  assert rows[0]["params"] == final["params"] > 0
  assert all(r["perf/tokens_per_s"] > 0 for r in rows if "loss" in r)
  assert Checkpointer(str(tmp_path / "checkpoints"), keep=3).latest_step() == 40


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(**{"debug.inject_nan_at_step": 6, "checkpoint.every": 4,
                       "train.steps": 12})
  with pytest.raises(NonFiniteLossError, match=r"step 6.*last good checkpoint \(step 4\)"):
    train_and_evaluate(cfg, str(tmp_path))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  assert ckpt.all_steps() == [4]
  with open(tmp_path / "final.json") as f:
    final = json.load(f)
  assert final["status"] == "failed_nonfinite_loss" and final["first_bad_step"] == 6
  # Without the poison, the same workdir resumes from step 4 and finishes.
  cfg.debug.inject_nan_at_step = -1
  assert train_and_evaluate(cfg, str(tmp_path))["status"] == "completed"


def test_validation_errors_are_one_sentence_with_the_fix(tmp_path):
  def error(num_devices=8, **overrides):
    with pytest.raises(ConfigError) as e:
      config_lib.validate(tiny_config(**overrides), num_devices=num_devices)
    message = str(e.value)
    assert "\n" not in message  # one sentence, no traceback
    return message

  assert "multiple of 8" in error(**{"train.global_batch": 12})
  assert "eval_batches must be >= 0" in error(**{"train.eval_batches": -1})
  assert "grad_clip must be positive" in error(**{"train.grad_clip": -1.0})
  assert "b2=1.0 must lie in [0, 1)" in error(**{"train.b2": 1.0})
  assert "rope_theta must be positive" in error(**{"model.rope_theta": 0.0})
  assert "multiple of 4" in error(**{"train.global_batch": 6, "mesh.tensor": 2})
  assert "8 are available" in error(**{"mesh.data": 2, "mesh.fsdp": 2})
  assert "max_seq_len=64" in error(**{"data.seq_len": 128, "model.max_seq_len": 64})
  assert "num_kv_heads" in error(**{"model.num_kv_heads": 3})
  assert "model.sublayer" in error(**{"model.sublayer": "nope"})
  missing = error(**{"data.name": "lm1b", "data.data_dir": str(tmp_path)})
  assert "lm1b" in missing and "tfds build" in missing

  from configs.dense import get_config
  with pytest.raises(ConfigError, match="Unknown preset 'huge'"):
    get_config("huge")


def test_resume_refuses_an_incompatible_checkpoint(tmp_path):
  train_and_evaluate(tiny_config(**{"train.steps": 4}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"model.d_model: 32 -> 64.*new --workdir"):
    train_and_evaluate(tiny_config(**{"train.steps": 8, "model.d_model": 64}),
                       str(tmp_path))
  # A longer schedule is compatible: training continues from step 4.
  final = train_and_evaluate(tiny_config(**{"train.steps": 8}), str(tmp_path))
  assert final["step"] == 8


def test_restart_before_any_checkpoint_starts_clean(tmp_path):
  with pytest.raises(NonFiniteLossError, match="at step 3, before any checkpoint was saved; "
                     ".*to start over"):
    train_and_evaluate(tiny_config(**{"debug.inject_nan_at_step": 3}), str(tmp_path))
  assert sorted(losses_by_step(str(tmp_path))) == [1, 2, 3]
  train_and_evaluate(tiny_config(), str(tmp_path))
  assert sorted(losses_by_step(str(tmp_path))) == list(range(1, 13))  # no duplicates


def test_resume_refuses_different_data_under_the_same_config(tmp_path, monkeypatch):
  import moejax.data as data_lib
  train_and_evaluate(tiny_config(**{"train.steps": 4}), str(tmp_path))
  real = data_lib.RunData._read_info
  monkeypatch.setattr(data_lib.RunData, "_read_info", lambda self: {
      **real(self), "tokenizer_fingerprint": "retrained"})
  with pytest.raises(ConfigError, match="trained on different data.*tokenizer_fingerprint"):
    train_and_evaluate(tiny_config(**{"train.steps": 8}), str(tmp_path))
