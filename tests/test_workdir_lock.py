"""One run per workdir: a second run.py on a held workdir stops with one sentence
naming the holder, a lock left by a killed process is taken over, and a workdir
that is a file is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moejax.errors import ConfigError
from moejax.workdir_lock import WorkdirLock
from tests.helpers import ROOT, TINY_FLAGS, config_flags, run_py


def _one_error_line(r, prefix="config error:"):
  lines = [l for l in r.stderr.splitlines() if l.startswith(prefix)]
  assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  return lines[0]


def test_a_second_run_on_a_held_workdir_stops_naming_the_holder(tmp_path):
  with WorkdirLock(str(tmp_path)):
    r = run_py([*config_flags(TINY_FLAGS), f"--workdir={tmp_path}"])
  line = _one_error_line(r)
  assert f"Another run (pid {os.getpid()} on " in line and str(tmp_path) in line
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  code = ("import sys, time; from moejax.workdir_lock import WorkdirLock; "
          f"lock = WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == "held"
  recorded = json.loads((tmp_path / ".lock").read_text())
  assert recorded["pid"] == holder.pid
  with pytest.raises(ConfigError, match=f"Another run \\(pid {holder.pid} on "):
    WorkdirLock(str(tmp_path)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  time.sleep(0.1)
  with WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a directory")
  r = run_py([*config_flags(TINY_FLAGS), f"--workdir={path}"])
  assert "is a file, not a directory" in _one_error_line(r)
  assert path.read_text() == "not a directory"


@pytest.mark.parametrize("name,make", [
    ("metrics.jsonl", "directory"), ("final.json", "directory"), ("config.json", "directory"),
    ("tensorboard", "file"), ("checkpoints", "file")])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_before_training(tmp_path, name, make):
  from moejax.train import train_and_evaluate
  from tests.helpers import tiny_config
  path = tmp_path / name
  if make == "directory":
    path.mkdir()
  else:
    path.write_text("x")
  with pytest.raises(ConfigError, match=f"{name} is a {make}, but the run writes a "):
    train_and_evaluate(tiny_config(), str(tmp_path))
  assert not (tmp_path / ".lock").exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
  from moejax import data as data_lib
  from tests.helpers import tiny_config
  (tmp_path / "data").write_text("x")
  cfg = tiny_config(**{"data.name": "stdlib_source", "data.data_dir": str(tmp_path / "data")})
  with pytest.raises(ConfigError, match="is a file; set --config.data.data_dir"):
    data_lib.resolve_data_dir(cfg.data)
