"""A checkpoint that cannot be written (a full disk) stops training at once with
one sentence, closes Orbax's threads (the process exits), keeps every whole
checkpoint, and the same command resumes once there is space again.

The first two tests make Orbax's save fail in-process (the synchronous part, and
the background write); the last fills a real tmpfs, where the machine allows
mounting one."""

import os
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from moejax.checkpoint import Checkpointer
from moejax.errors import CheckpointSaveError
from moejax.train import train_and_evaluate
from tests.helpers import ROOT, TINY_FLAGS, config_flags, read_metrics, tiny_config

FULL = "[Errno 28] No space left on device"


def _cfg(steps=16):
  return tiny_config(**{"train.steps": steps, "checkpoint.every": 4, "checkpoint.keep": 10})


def _trained_steps(workdir):
  return [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]


def test_a_save_that_fails_stops_the_run_with_one_sentence(tmp_path, monkeypatch):
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 8:  # what Orbax raises when it cannot create the step's directory
      raise OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  workdir = tmp_path / "run"
  with pytest.raises(CheckpointSaveError) as err:
    train_and_evaluate(_cfg(), str(workdir))
  message = str(err.value)
  assert "\n" not in message
  assert "checkpoint of step 8" in message and "(No space left on device)" in message
  assert "resume from step 4, the newest whole checkpoint" in message
  assert max(_trained_steps(workdir)) == 8  # not one step past the failed save
  assert Checkpointer(str(workdir / "checkpoints"), keep=10).all_steps() == [4]


def test_a_background_save_that_fails_stops_at_the_next_step(tmp_path, monkeypatch):
  """The async write fails after save() returned: the next step's check finds it."""
  real_save = Checkpointer.save
  failed = {}

  def save(self, step, state, meta):
    real_save(self, step, state, meta)
    if step == 8:
      manager = self._manager
      real_wait = manager.wait_until_finished

      def wait_until_finished():
        real_wait()
        if not failed:
          failed["step"] = step
          raise ValueError(f"RESOURCE_EXHAUSTED: Failed writing ...: {FULL}")

      monkeypatch.setattr(manager, "wait_until_finished", wait_until_finished)
      monkeypatch.setattr(manager, "is_saving_in_progress", lambda: False)

  monkeypatch.setattr(Checkpointer, "save", save)
  workdir = tmp_path / "run"
  with pytest.raises(CheckpointSaveError, match=r"step 8 .*\(No space left on device\)"):
    train_and_evaluate(_cfg(), str(workdir))
  # Found right after step 9 ran, before it was logged: not trained on to step 12.
  assert max(_trained_steps(workdir)) == 8


def _mount_tmpfs(path, size):
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.mark.slow  # two runs.py runs on a real tmpfs; the tests above cover the logic
def test_a_full_disk_stops_the_run_and_the_same_command_resumes(tmp_path):
  disk = tmp_path / "disk"
  if not _mount_tmpfs(disk, "8M"):
    pytest.skip("this machine cannot mount a small tmpfs (needs root and CAP_SYS_ADMIN)")
  try:
    filler = disk / "filler"
    # A checkpoint of this model takes about 450 KB: leave room for two.
    filler.write_bytes(b"\0" * (8 * 2**20 - 1_150_000))
    workdir = disk / "run"
    args = [os.path.join(ROOT, "run.py"), *config_flags(TINY_FLAGS),
            "--config.train.steps=400", "--config.train.log_every=10",
            "--config.checkpoint.every=100", "--config.checkpoint.keep=10",
            f"--workdir={workdir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert "failed (No space left on device), so training stopped" in lines[0]
    assert "resume from step 200, the newest whole checkpoint" in lines[0]
    stopped = max(_trained_steps(workdir))
    assert stopped < 400  # it did not train on to the end without checkpoints

    filler.unlink()  # space again: the same command resumes and finishes
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resumed from checkpoint at step 200." in proc.stdout, proc.stdout[:3000]
  finally:
    subprocess.run(["umount", str(disk)], capture_output=True)
