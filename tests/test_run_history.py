"""A resume that changes a field which does not fix the state says so and loses
nothing: every config version is kept with the step it took effect at, and every
final.json written stays in final_history.jsonl. The default workdir follows the
overrides, so another command does not resume this run."""

import json

import pytest

from moejax import run_history
from moejax.train import train_and_evaluate
from moejax.workdir import default_workdir
from tests.helpers import tiny_config


def _cfg(**overrides):
  return tiny_config(**{"checkpoint.async_save": False, **overrides})


def _lines(path):
  return run_history.read_jsonl(str(path))


def test_a_changed_resume_is_announced_and_every_config_and_result_is_kept(
    tmp_path, capsys):
  workdir = tmp_path / "run"
  first = train_and_evaluate(_cfg(**{"train.steps": 8}), str(workdir))
  capsys.readouterr()
  # Same config again: resumes, re-evaluates, records no new config version.
  train_and_evaluate(_cfg(**{"train.steps": 8}), str(workdir))
  assert "changed config" not in capsys.readouterr().out
  assert [h["from_step"] for h in _lines(workdir / "config_history.jsonl")] == [1]

  second = train_and_evaluate(_cfg(**{"train.steps": 12, "train.learning_rate": 1e-3}),
                              str(workdir))
  out = capsys.readouterr().out
  assert "resuming from step 8 with a changed config (" in out
  assert "train.learning_rate: 0.003 -> 0.001" in out and "train.steps: 8 -> 12" in out

  history = _lines(workdir / "config_history.jsonl")
  assert [h["from_step"] for h in history] == [1, 9]
  assert history[0]["config"]["train"]["learning_rate"] == 3e-3
  assert history[1]["config"]["train"]["learning_rate"] == 1e-3
  assert sorted(history[1]["changed"]) == ["train.learning_rate: 0.003 -> 0.001",
                                           "train.steps: 8 -> 12"]
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 12

  finals = _lines(workdir / "final_history.jsonl")
  assert [f["step"] for f in finals] == [8, 8, 12]
  assert finals[0]["eval/loss"] == first["eval/loss"]
  assert finals[-1] == json.loads((workdir / "final.json").read_text()) == json.loads(
      json.dumps(second))


@pytest.mark.slow  # two more trainings; the default run keeps the test above
def test_a_workdir_without_history_keeps_what_it_had(tmp_path, capsys):
  """A run written before the history files existed: its checkpoint's config and
  its final.json become the first lines."""
  workdir = tmp_path / "run"
  first = train_and_evaluate(_cfg(**{"train.steps": 8}), str(workdir))
  (workdir / "config_history.jsonl").unlink()
  (workdir / "final_history.jsonl").unlink()
  train_and_evaluate(_cfg(**{"train.steps": 10}), str(workdir))
  history = _lines(workdir / "config_history.jsonl")
  assert [h["from_step"] for h in history] == [None, 9]
  assert history[0]["config"]["train"]["steps"] == 8
  finals = _lines(workdir / "final_history.jsonl")
  assert [f["step"] for f in finals] == [8, 10]
  assert finals[0]["eval/loss"] == first["eval/loss"]


def test_the_default_workdir_follows_the_overrides():
  assert default_workdir("dense_tiny", {}) == "runs/dense_tiny"
  assert default_workdir("dense_tiny", {"train.steps": 50, "train.learning_rate": 1e-3}) == (
      "runs/dense_tiny,train.learning_rate=0.001,train.steps=50")
  # A path in a value does not nest folders; a long list is named by its digest.
  assert default_workdir("x", {"data.files": "/data/*.txt"}) == "runs/x,data.files=_data__.txt"
  long = default_workdir("x", {f"train.f{i}": "v" * 20 for i in range(10)})
  assert long.startswith("runs/x,") and len(long) == len("runs/x,") + 12
  assert long != default_workdir("x", {f"train.f{i}": "w" * 20 for i in range(10)})
