"""One training process per workdir: an advisory lock on `<workdir>/.lock`.

Two runs started on the same --workdir would write the same checkpoints and
append to the same metrics.jsonl. The first takes an exclusive `flock` on the
lock file and writes who it is (pid, host, start time) into it; a second finds
the lock held and stops with one sentence naming the holder. The operating
system drops a flock when its process dies, SIGKILL included, so a crashed
run leaves no stale lock: the next run takes it over and resumes.

Only process 0 of a multi-process run takes it (all processes share the
workdir). flock is not shared between machines, so on a multi-host slice the
lock guards each host's process 0 only; the scheduler is what keeps a second
launch away there.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from moejax.errors import ConfigError

LOCK_NAME = ".lock"


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      who = json.load(f)
    return f"pid {who['pid']} on {who['host']}, started {who['started']}"
  except (OSError, ValueError, KeyError):
    return "another process"


class WorkdirLock:
  """with WorkdirLock(workdir): ...  (raises ConfigError if another process holds it)."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._file = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    f = open(self.path, "a+")  # pylint: disable=consider-using-with  # held until release
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.close()
      raise ConfigError(
          f"Another run ({_holder(self.path)}) is training in {self.workdir}; wait for it "
          "to finish, stop it, or pass another --workdir.") from None
    f.seek(0)
    f.truncate()
    json.dump(dict(pid=os.getpid(), host=socket.gethostname(),
                   started=datetime.datetime.now().isoformat(timespec="seconds")), f)
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
