"""What a result file records about where it was computed: the jax version, the
devices and the code's git commit, so that numbers from different machines or
code versions are never mixed unknowingly. (A change that only reorders float
sums, such as a different tile size, moves a 300-step MoE run by as much as
the seed-to-seed spread, because a flipped top-k choice changes what follows.)"""

import functools
import os
import subprocess

import jax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True,
                         timeout=20, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def code_version() -> str | None:
  """The commit of the moejax checkout this runs from ("+dirty" when tracked files
  differ from it); None for an installed copy outside git."""
  top = _git("rev-parse", "--show-toplevel")
  if top is None or os.path.realpath(top) != os.path.realpath(_ROOT):
    return None
  commit = _git("rev-parse", "--short=12", "HEAD")
  if commit is None:
    return None
  dirty = _git("status", "--porcelain", "--untracked-files=no")
  return commit + ("+dirty" if dirty else "")


def provenance(device_count: int | None = None) -> dict:
  """{jax_version, devices: "N x KIND", code_version}; N defaults to every device
  of the job."""
  count = jax.device_count() if device_count is None else device_count
  return dict(jax_version=jax.__version__, devices=f"{count} x {jax.devices()[0].device_kind}",
              code_version=code_version())
