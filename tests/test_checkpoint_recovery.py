"""Corrupted checkpoints are detected, never used: a resume skips every newer
checkpoint that does not read, restore or hold finite values (saying which and
why, and setting it aside), and starts from the newest whole one; with none
whole the run stops with one sentence."""

import json
import os

import numpy as np
import pytest

from moejax.checkpoint import Checkpointer
from moejax.errors import ConfigError
from moejax.train import train_and_evaluate
from tests.helpers import read_metrics, tiny_config


def _cfg(steps):
  return tiny_config(**{"train.steps": steps, "checkpoint.every": 4, "checkpoint.keep": 5,
                        "checkpoint.async_save": False})


def _truncate_arrays(step_dir):
  """Cuts every array data file of a step in half (a copy cut short)."""
  cut = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        cut += 1
  assert cut


def test_resume_skips_unreadable_checkpoints_and_starts_from_the_newest_whole_one(
    tmp_path, capsys):
  workdir = tmp_path / "run"
  train_and_evaluate(_cfg(12), str(workdir))
  ckpts = workdir / "checkpoints"
  _truncate_arrays(str(ckpts / "12"))                 # arrays cut short
  (ckpts / "8" / "meta" / "metadata").write_text("{not json")  # metadata unparsable
  (ckpts / "16").mkdir()                              # a stray empty step directory
  capsys.readouterr()
  final = train_and_evaluate(_cfg(14), str(workdir))
  out = capsys.readouterr().out
  assert "skipping the checkpoint at step 16: its metadata does not read" in out
  assert "skipped the checkpoint at step 12 (" in out
  assert "Resumed from checkpoint at step 4." in out
  assert final["status"] == "completed" and final["step"] == 14
  # Steps 5.. were retrained once each: no step is logged twice.
  steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 14
  aside = sorted(os.listdir(tmp_path / "run" / "checkpoints_skipped"))
  assert [name.split("-")[0] for name in aside] == ["12", "16", "8"]
  assert Checkpointer(str(ckpts), keep=5).all_steps() == [4, 8, 12, 14]


def test_a_checkpoint_holding_nan_is_refused_like_a_corrupted_one(tmp_path, capsys):
  workdir = tmp_path / "run"
  train_and_evaluate(_cfg(8), str(workdir))
  ckpt = Checkpointer(str(workdir / "checkpoints"), keep=5, async_save=False)
  state = ckpt.restore_arrays(8)
  meta = ckpt.read_meta(8)
  embed = state["params"]["embed"]["value"]
  state["params"]["embed"]["value"] = np.where(np.arange(embed.size).reshape(embed.shape) == 7,
                                               np.nan, embed)
  ckpt.close()
  # Rewrite step 8 with one NaN in the embedding (bits flipped on disk).
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "8")
  ckpt = Checkpointer(str(workdir / "checkpoints"), keep=5, async_save=False)
  ckpt.save(8, state, meta)
  ckpt.close()
  capsys.readouterr()
  final = train_and_evaluate(_cfg(10), str(workdir))
  out = capsys.readouterr().out
  assert "skipped the checkpoint at step 8 (NaN or inf in ['params']['embed']" in out
  assert "Resumed from checkpoint at step 4." in out
  assert final["status"] == "completed" and np.isfinite(final["eval/loss"])


def test_no_whole_checkpoint_stops_with_one_sentence(tmp_path):
  workdir = tmp_path / "run"
  train_and_evaluate(_cfg(4), str(workdir))
  _truncate_arrays(str(workdir / "checkpoints" / "4"))
  with pytest.raises(ConfigError, match=r"No checkpoint in .*checkpoints is whole: step 4 "):
    train_and_evaluate(_cfg(8), str(workdir))
  assert json.loads((workdir / "final.json").read_text())["step"] == 4  # untouched
