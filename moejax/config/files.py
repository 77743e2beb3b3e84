"""Load a config from a `path.py:arg` spec, as --config does, but from code.

Used where one config names another (budget_match.reference). The path is
taken relative to the current directory, else to the repository root (the
folder holding run.py), so a spec works from any working directory. Presets
import `configs.*` and `moejax.*`, both installed packages (pip install -e .).
"""

import importlib.util
import os

from moejax.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_path(path: str) -> str | None:
  """The file `path` names (cwd first, then the repo root), or None."""
  for base in (os.getcwd(), REPO_ROOT):
    candidate = os.path.join(base, path)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return None


def load_config(spec: str):
  """Spec "configs/loopmoe.py:vanilla_tiny" -> that file's
  get_config("vanilla_tiny"); without ":arg", get_config(None) (its default)."""
  path, sep, arg = spec.strip().partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"A config spec is 'file.py' or 'file.py:preset', got {spec!r}; "
                      f"e.g. configs/moe.py:mixtral_tiny.")
  found = resolve_path(path)
  if found is None:
    raise ConfigError(f"Config file {path!r} (from {spec!r}) exists neither under "
                      f"{os.getcwd()} nor under {REPO_ROOT}; give a path like "
                      f"configs/moe.py:mixtral_tiny.")
  name = "_moejax_config_" + "".join(ch if ch.isalnum() else "_" for ch in found)
  module_spec = importlib.util.spec_from_file_location(name, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"Config file {found} has no get_config(arg) function; define one "
                      f"returning an ml_collections.ConfigDict.")
  return module.get_config(arg if sep else None)
