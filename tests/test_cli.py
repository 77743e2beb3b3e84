"""run.py as a user runs it: progress output, errors, --dry_run."""

from tests.helpers import TINY_FLAGS, config_flags, run_py


def test_run_prints_progress_and_final_summary(tmp_path):
  r = run_py([*config_flags({**TINY_FLAGS, "train.log_every": 4}),
              f"--workdir={tmp_path}"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "params" in out and "FLOPs/token" in out
  assert "step      4/12 | loss" in out and "tok/s" in out and "ETA" in out
  assert "validation loss" in out and "bits/byte" in out
  assert f"outputs in {tmp_path}" in out


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
