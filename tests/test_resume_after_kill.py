"""A run killed with SIGKILL resumes from its last checkpoint with the same data.

Three subprocesses of run.py: an uninterrupted reference, a run killed mid-way
(after at least one checkpoint), and its restart in the same workdir. The
restart's losses must equal the reference's, step for step.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.helpers import ROOT, TINY_FLAGS, config_flags, losses_by_step, run_py

STEPS = 400
FLAGS = config_flags({**TINY_FLAGS, "train.steps": STEPS, "checkpoint.every": 25,
                      "checkpoint.keep": 2})


def _last_logged_step(workdir):
  try:
    return max(losses_by_step(workdir), default=0)
  except (OSError, ValueError):
    return 0  # file not there yet, or a line being written


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
  ref_dir, dir_ = str(tmp_path / "reference"), str(tmp_path / "killed")
  ref = run_py([*FLAGS, f"--workdir={ref_dir}"])
  assert ref.returncode == 0, ref.stderr[-3000:]

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *FLAGS,
                           f"--workdir={dir_}"], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while _last_logged_step(dir_) < 60 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _last_logged_step(dir_)
  assert 60 <= killed_at < STEPS, f"the kill did not land mid-run (step {killed_at})"

  resumed = run_py([*FLAGS, f"--workdir={dir_}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from checkpoint at step" in resumed.stdout
  resumed_from = int(resumed.stdout.split("Resumed from checkpoint at step ")[1].split(".")[0])
  assert 25 <= resumed_from <= killed_at and resumed_from % 25 == 0

  want, got = losses_by_step(ref_dir), losses_by_step(dir_)
  assert sorted(got) == list(range(1, STEPS + 1))  # no gaps, no duplicates
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)], rtol=1e-6, atol=1e-6)
