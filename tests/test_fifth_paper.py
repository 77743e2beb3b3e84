"""A fifth paper plugs in from tests/ alone (tests/toy_paper): its config group,
validation, budget, presets and a one-row experiment, trained through run.py,
with no shared file knowing its name."""

import json
import os
import subprocess

from tests.helpers import ROOT, read_metrics, run_py

PRESET = "--config=tests/toy_paper/presets.py:tiny"


def _toy_budget(d_model=32, width=96, layers=2, vocab=264, heads=4, kv_heads=2, head_dim=8,
                seq=16) -> dict:
  """The toy model's budget written out (byte vocabulary: 256 bytes and 8 special
  ids): embeddings (tied), attention, the ReLU^2 FFN (two [d, width] matrices),
  norms."""
  attn = d_model * head_dim * (2 * heads + 2 * kv_heads)
  ffn = 2 * d_model * width
  norms = (2 * layers + 1) * d_model
  params = vocab * d_model + layers * (attn + ffn) + norms
  fwd = layers * (2 * attn + 4 * seq * heads * head_dim + 2 * ffn) + 2 * vocab * d_model
  return dict(params=params, forward_flops=fwd)


def test_no_shared_file_names_the_toy_paper():
  """No code outside tests/ names it (docs/design.md points at it as the example)."""
  found = subprocess.run(["git", "grep", "-l", "toy_paper", "--", ".", ":!tests", ":!*.md"],
                         cwd=ROOT, capture_output=True, text=True)
  assert found.returncode in (0, 1) and found.stdout == ""


def test_dry_run_shows_the_toy_budget():
  r = run_py([PRESET, "--dry_run"])
  assert r.returncode == 0, r.stderr
  want = _toy_budget()
  assert f"params          {want['params']:,} " in r.stdout
  assert f"model built: {want['params']:,}" in r.stdout


def test_a_bad_value_of_its_own_field_is_one_sentence():
  r = run_py([PRESET, "--config.toy.power=3"])
  assert r.returncode == 2
  assert r.stderr.strip() == ("config error: --config.toy.power=3 must be 1 (ReLU) or 2 "
                              "(squared ReLU).")


def test_trains_through_run_py_and_resume_checks_its_fields(tmp_path):
  workdir = str(tmp_path / "toy")
  r = run_py([PRESET, f"--workdir={workdir}"])
  assert r.returncode == 0, r.stderr
  final = json.load(open(os.path.join(workdir, "final.json")))
  assert final["status"] == "completed" and final["params"] == _toy_budget()["params"]
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["toy"] == {"width": 96, "power": 2}
  # Its resume-fixed field is honoured by the generic resume check.
  r = run_py([PRESET, f"--workdir={workdir}", "--config.toy.width=64",
              "--config.train.steps=12"])
  assert r.returncode == 2 and "toy.width: 96 -> 64" in r.stderr


def test_its_one_row_experiment_runs(tmp_path):
  from experiments import registry, sweep  # pylint: disable=import-outside-toplevel
  import tests.toy_paper.experiment  # noqa: F401  (registers the experiment)
  assert "toy" in registry.names()
  records = sweep.run_sweep("toy", "tiny", str(tmp_path), say=lambda *_: None)
  assert [r["status"] for r in records] == ["completed"]
  row = os.path.join(tmp_path, "toy", "tiny", "toy_s0")
  final = json.load(open(os.path.join(row, "final.json")))
  first = next(r["loss"] for r in read_metrics(row) if "loss" in r)
  assert final["eval/loss"] < first  # it learned something in 8 steps
