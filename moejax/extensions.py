"""How a paper's package plugs into the generic trainer: one `register(Extension(...))`.

The generic layers (config, model, budget, trainer, dry run, report) know no
paper by name. Each paper package under moejax/papers/ describes itself once,
in its __init__.py:

    register(Extension(
        name="l3", group="l3", defaults=config.defaults, validate=config.validate,
        resume_free=config.RESUME_FREE, layer_plan=plan.add_l3_layers,
        budget=budget.l3_layers_budget, model_inputs=hooks.allocation_inputs,
        final_eval=hooks.host_table_eval,
        plots={"l3_entropy.png": plots.plot_l3_entropy}, notes="docs/papers/l3.md"))

and every generic hook point asks the registered extensions in registration
order. What each field is for:

  group, defaults   the config group it owns: `defaults()` returns its
                    ConfigDict, added to every base config (so `--config.<group>.*`
                    overrides work on any preset and papers compose).
  validate(cfg, axes)  raises ConfigError with one sentence; runs for every config,
                    so it returns early when the model does not use the group.
                    `axes` maps mesh axis names to their resolved sizes.
  resume_free       the group's dotted fields a resume may change: implementation
                    choices that leave the state and the results the same (a
                    dispatch backend, rematerialisation). Every other field of the
                    group fixes the run, and resuming with it changed is refused.
  resume_warnings(saved, current)  allowed changes a researcher should hear of.
  sublayers         {name: Sublayer(build, budget)} for `model.sublayer`.
  sharding_rules    (logical axis, mesh axes) pairs its parameters use.
  layer_plan(cfg, plan)  changes the decoder's layer plan (moejax/model/layer_plan.py):
                    a looped segment, modulated pre-norms, inserted layers.
  budget(cfg)       params / active_params / flops_per_token its plan additions
                    add to the model budget, plus breakdown entries (prefixed).
  model_inputs(cfg, data, vocab_size, shapes_only, say)  what its layers need
                    before the model is built (e.g. L3's rows per token id); the
                    result reaches its layer builders as inputs[name]. `data` is
                    the run's RunData (None with shapes_only, for --dry_run).
  final_eval(cfg, run)  extra entries for final.json after the final evaluation.
  plots             {file name: fn(runs, arms, path) -> bool} drawn by the report
                    (experiments/report) when some completed run logged the data.
  notes             the project's own notes on the paper (docs/papers/<name>.md).

Built-in extensions are the packages moejax.moe and moejax.papers; they are
imported the first time the registry is read, so any entry point sees them.
A package outside moejax registers the same way, by being imported before the
config is built (a config file that imports it is enough).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

# Imported on first use of the registry; each registers what it holds.
BUILTIN_PACKAGES = ("moejax.moe", "moejax.papers")

_REGISTERED: dict[str, "Extension"] = {}
_LOADING = {"done": False}


@dataclasses.dataclass(frozen=True)
class Extension:
  name: str
  group: str = ""
  defaults: Callable[[], Any] | None = None
  validate: Callable[[Any, dict], None] | None = None
  resume_free: tuple[str, ...] = ()
  resume_warnings: Callable[[dict, dict], list] | None = None
  sublayers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sharding_rules: tuple = ()
  layer_plan: Callable | None = None
  budget: Callable | None = None
  model_inputs: Callable | None = None
  final_eval: Callable | None = None
  plots: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  notes: str = ""

  def __post_init__(self):
    if bool(self.group) != (self.defaults is not None):
      raise ValueError(f"Extension {self.name!r}: a config group needs defaults() and "
                       "defaults() needs a group name.")


def register(extension: Extension) -> Extension:
  """Adds `extension` to the registry; a name, a group and a sublayer are taken once."""
  if extension.name in _REGISTERED:
    raise ValueError(f"Extension {extension.name!r} is registered twice.")
  groups = {e.group for e in _REGISTERED.values() if e.group}
  if extension.group and extension.group in groups | set(_GENERIC_GROUPS):
    raise ValueError(f"Extension {extension.name!r}: config group {extension.group!r} "
                     "is taken.")
  taken = {s for e in _REGISTERED.values() for s in e.sublayers} | {"dense"}
  for name in extension.sublayers:
    if name in taken:
      raise ValueError(f"Extension {extension.name!r}: sublayer {name!r} is taken.")
  _REGISTERED[extension.name] = extension
  return extension


def _load_builtin() -> None:
  if not _LOADING["done"]:
    _LOADING["done"] = True
    for package in BUILTIN_PACKAGES:
      importlib.import_module(package)


def registered() -> list[Extension]:
  """Every registered extension, built-in ones first, in registration order."""
  _load_builtin()
  return list(_REGISTERED.values())


def get(name: str) -> Extension:
  _load_builtin()
  if name not in _REGISTERED:
    raise KeyError(f"Unknown extension {name!r}; registered: {sorted(_REGISTERED)}.")
  return _REGISTERED[name]


# Groups of the base config (moejax/config/base.py): no extension may take them.
_GENERIC_GROUPS = ("model", "data", "train", "mesh", "sharding", "checkpoint", "debug",
                   "budget_match")
