"""run.py as a user runs it: progress output, errors, --dry_run."""

import json

import pytest

from tests.helpers import TINY_FLAGS, config_flags, run_py


def test_run_prints_progress_and_final_summary(tmp_path):
  r = run_py([*config_flags({**TINY_FLAGS, "train.log_every": 4}),
              f"--workdir={tmp_path}", "--profile_steps=2:4"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "params" in out and "FLOPs/token" in out
  assert "compiling the train step ... (peak " in out and "compiled and ran the first step in" in out
  assert "step      4/12 | loss" in out and "tok/s" in out and "ETA" in out
  assert "TFLOP/s/dev (MFU " in out
  assert "validation loss" in out and "bits/byte" in out
  assert f"outputs in {tmp_path}" in out
  final = json.loads((tmp_path / "final.json").read_text())
  assert final["peak_tflops"] > 0 and 0 < final["mfu"] < 1
  assert final["tflops_per_device"] == pytest.approx(final["mfu"] * final["peak_tflops"])
  # The lr logged at a step is the schedule's value there, not an interval mean.
  from moejax.optim import learning_rate_schedule
  from tests.helpers import read_metrics, tiny_config
  schedule = learning_rate_schedule(tiny_config(**{"train.log_every": 4}).train)
  logged = {m["step"]: m["lr"] for m in read_metrics(str(tmp_path)) if "lr" in m}
  assert logged[8] == pytest.approx(float(schedule(7)))
  # --profile_steps wrote a trace TensorBoard's profile plugin reads.
  assert "profile of steps 2..3 written to" in out
  assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))


def test_bad_config_exits_2_with_one_sentence(tmp_path):
  r = run_py([*config_flags({**TINY_FLAGS, "train.global_batch": 7}),
              f"--workdir={tmp_path}"], devices=2)
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.startswith("config error:")]
  assert len(lines) == 1 and "multiple of 2" in lines[0]
  assert "Traceback" not in r.stderr

  r = run_py(["--config=configs/dense.py:huge"])
  assert r.returncode == 2 and "Unknown preset 'huge'" in r.stderr
  assert "Traceback" not in r.stderr

  r = run_py(["--config.train.stepz=3"])
  assert r.returncode == 2 and "stepz" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_prints_budget_without_training(tmp_path):
  r = run_py(["--config=configs/dense.py:small", "--dry_run", f"--workdir={tmp_path}"],
             devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "active/token" in r.stdout and "memory/device" in r.stdout
  assert "mesh            {'data': 4" in r.stdout
  assert not (tmp_path / "checkpoints").exists()
