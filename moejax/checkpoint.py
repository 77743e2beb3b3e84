"""Checkpoints: the one file that talks to Orbax.

A checkpoint holds the whole train state (params, non-param model state such as
router biases, optimizer state, step) plus JSON metadata: the data iterator's
position and the config that wrote it. Saves are asynchronous; the latest
`keep` are kept. Orbax writes each step to a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoint as
the latest. Keeping Orbax behind this class means the move to Orbax's v1 API
touches one file.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import os
import re
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging

from moejax.errors import CheckpointSaveError, ConfigError


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False
    self._pending: int | None = None  # the step of a save not yet known to be whole
    self._failed = False
    _quiet_orbax_errors()
    _quiet_closed_loop_errors()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving `state` at `step` (returns once the device copy is done).
    A failure of this save, or of the previous one, raises CheckpointSaveError."""
    if self._pending is not None:
      self.wait()  # Orbax waits for the previous save anyway; this names its step
    with self._save_errors(int(step)):
      self._manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta)),
          force=True,
      )
    self._pending = int(step)

  def check_saved(self) -> None:
    """Raises CheckpointSaveError as soon as a background save has failed (called
    every step: a local flag read while a save runs). Single-process only: on
    several processes the error surfaces at the next save or wait, which every
    process reaches together."""
    if self._pending is None or jax.process_count() > 1:
      return
    if not self._manager.is_saving_in_progress():
      self.wait()

  @contextlib.contextmanager
  def _save_errors(self, step: int | None):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # any failed write
      self._failed = True
      failed = step
      whole = [s for s in self.all_steps() if s != failed]
      raise CheckpointSaveError(
          f"Saving the checkpoint of step {failed} in {self.directory} failed "
          f"({_save_reason(e)}), so training stopped; free space or fix the disk, then "
          "rerun the same command to resume from "
          f"{f'step {whole[-1]}, the newest whole checkpoint' if whole else 'the start'}."
      ) from None

  def read_meta(self, step: int) -> dict:
    """The JSON metadata of a checkpoint, without touching the arrays."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, abstract_state) -> tuple:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying shardings)."""
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                meta=ocp.args.JsonRestore()))
    logging.info("Restored checkpoint at step %d from %s", step, self.directory)
    return restored.state, dict(restored.meta)

  def restore_arrays(self, step: int) -> dict:
    """The saved state as nested dicts of host arrays (for inspection: no
    shardings, no abstract state needed)."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state

  def newest_readable(self, say=print) -> tuple[int | None, dict | None]:
    """The newest step whose metadata reads, and that metadata; (None, None) when
    there is no checkpoint. Steps whose metadata does not read (a copy cut short,
    an empty step directory) are skipped with a warning."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step
        say(f"warning: skipping the checkpoint at step {step}: its metadata does not read "
            f"({_reason(e)})")
    return None, None

  def restore_newest_whole(self, abstract_state, *, newest: int, say=print) -> tuple:
    """(step, state, meta) of the newest checkpoint at or before `newest` that
    restores and holds only finite values. Each one skipped is announced with its
    reason; a ConfigError when none is whole."""
    skipped = []
    for step in reversed([s for s in self.all_steps() if s <= newest]):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # truncated, zeroed, missing
        skipped.append(f"step {step} ({_reason(e)})")
      else:
        bad = non_finite_leaves(state)
        if not bad:
          for s in skipped:
            say(f"warning: skipped the checkpoint at {s}; resuming from step {step}")
          self._set_aside(st for st in self.all_steps() if st > step)
          return step, state, meta
        skipped.append(f"step {step} (NaN or inf in {', '.join(bad[:3])})")
    raise ConfigError(
        f"No checkpoint in {self.directory} is whole: {'; '.join(skipped)}; move that folder "
        "away to start the run over, or restore its files from a copy.")

  def _set_aside(self, steps) -> None:
    """Moves the given step directories to <checkpoints>_skipped/ (kept for a look,
    out of the way of the saves that will reach those steps again)."""
    aside = self.directory + "_skipped"
    steps = list(steps)
    if not steps:
      return
    if jax.process_index() == 0:  # one mover; the others wait for it below
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.exists(src):
          os.makedirs(aside, exist_ok=True)
          os.replace(src, os.path.join(aside, f"{step}-{os.getpid()}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("moejax_checkpoints_set_aside")
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster announced a preemption (multi-process runs)."""
    if jax.process_count() == 1:
      return False
    return self._manager.reached_preemption(int(step))

  def wait(self) -> None:
    """Waits for a pending save; CheckpointSaveError if it failed."""
    with self._save_errors(self._pending):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    """Waits for pending saves and stops Orbax's threads; a second call does
    nothing. After a failed save (already raised) it only stops the threads."""
    if self._closed:
      return
    self._closed = True
    if self._failed:
      # Closing Orbax now would close its event loop under the failed save's
      # writes still in flight in TensorStore (a traceback per write); its
      # threads are daemons and end with the process.
      return
    try:
      self.wait()
    finally:
      self._manager.close()


class _OneLineOrbaxErrors(logging_std.Filter):
  """Orbax logs a failed background save from each of its threads with a full
  traceback (hundreds of lines for one full disk), and CheckpointSaveError says
  it in one sentence. Orbax's error records (and asyncio's about Orbax's writes)
  are therefore dropped at the default verbosity and cut to their first line at
  --verbosity=0 or above."""

  def filter(self, record):
    if record.levelno < logging_std.ERROR or not (
        "orbax" in record.pathname
        # asyncio reports, at exit, each write of the failed save nobody awaited
        or (record.name == "asyncio" and "orbax" in str(record.getMessage())
            + str(record.exc_info and record.exc_info[1]))):
      return True
    if logging.get_verbosity() < logging.INFO:
      return False
    record.msg = str(record.getMessage()).splitlines()[0][:300] if record.msg else ""
    record.args, record.exc_info, record.exc_text = (), None, None
    return True


def _quiet_closed_loop_errors() -> None:
  """When a background save fails, Orbax's save thread closes its event loop
  while TensorStore still completes the save's other writes; each completion then
  reports "Event loop is closed" as an unraisable exception, with a traceback.
  They say nothing that CheckpointSaveError does not, so they are dropped."""
  previous = sys.unraisablehook
  if getattr(previous, "moejax_quiet", False):
    return

  def hook(info):
    if not (info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"):
      previous(info)

  hook.moejax_quiet = True
  sys.unraisablehook = hook


def _quiet_orbax_errors() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OneLineOrbaxErrors) for f in handler.filters):
    handler.addFilter(_OneLineOrbaxErrors())


_OS_ERRORS = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|"
                        r"Permission denied|Input/output error|Stale file handle")


def _save_reason(error: Exception) -> str:
  """The operating system's reason when the error carries one, else its first line."""
  found = _OS_ERRORS.search(str(error))
  return found.group(0) if found else _reason(error)


def _reason(error: Exception) -> str:
  """The first line of an error, with its type."""
  lines = [l for l in str(error).splitlines() if l.strip()]
  return f"{type(error).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


def non_finite_leaves(state) -> list[str]:
  """Paths of the floating-point arrays of `state` that hold a NaN or an inf."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_leaves_with_path(state)
  floating = [(p, x) for p, x in leaves
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  finite = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in floating])
  return [jax.tree_util.keystr(p) for (p, _), ok in zip(floating, finite) if not ok]
