"""Errors a user can fix by changing a flag.

Every `ConfigError` message is one sentence that says what to change. `run.py`
prints it without a traceback and exits with status 2.
"""


class ConfigError(ValueError):
  """A config value that cannot work; the message says what to change."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or inf loss; the last good checkpoint is kept."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (full disk, lost mount); training stops at
  once, and the checkpoints already whole are kept."""
