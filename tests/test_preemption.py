"""SIGTERM (preemption) saves a checkpoint at the current step and exits; a rerun resumes."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.helpers import ROOT, TINY_FLAGS, config_flags, losses_by_step, run_py

FLAGS = config_flags({**TINY_FLAGS, "train.steps": 400, "checkpoint.every": 1000})


def test_sigterm_saves_current_step_then_resume_completes(tmp_path):
  workdir = str(tmp_path)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *FLAGS,
                           f"--workdir={workdir}"], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    try:
      if max(losses_by_step(workdir), default=0) >= 30:
        break
    except (OSError, ValueError):
      pass
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Preemption requested: saved step" in out
  saved = int(out.split("Preemption requested: saved step ")[1].split(";")[0])
  assert 30 <= saved < 400
  # The checkpoint interval (1000) was never reached: this save is the preemption's.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved)]
  with open(os.path.join(workdir, "final.json")) as f:
    assert json.load(f)["status"] == "preempted"

  resumed = run_py([*FLAGS, f"--workdir={workdir}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from checkpoint at step {saved}." in resumed.stdout
  assert sorted(losses_by_step(workdir)) == list(range(1, 401))
