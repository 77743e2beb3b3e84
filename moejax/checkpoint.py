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

import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving `state` at `step` (returns once the device copy is done)."""
    self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=True,
    )

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

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster announced a preemption (multi-process runs)."""
    if jax.process_count() == 1:
      return False
    return self._manager.reached_preemption(int(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
