"""Every preset's --dry_run numbers are pinned: a refactor must not move them.

tests/pinned_budgets.json holds, for each `configs/<file>.py:<preset>`, the params,
active params, FLOPs/token and breakdown that `run.py --dry_run` reported (and the
parameter count of the built model) before the library was regrouped into one
package per paper. tests/configs_before_layout.json holds config.json files
written then: a checkpoint saved with them must still resume.
"""

import contextlib
import importlib
import io
import json
import os

import pytest

from moejax import config as config_lib
from moejax import dry_run
from moejax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = json.load(open(os.path.join(HERE, "pinned_budgets.json")))
BEFORE = json.load(open(os.path.join(HERE, "configs_before_layout.json")))


# Fields added since those config.json files were written (with defaults that
# leave an old run's meaning unchanged): the only differences allowed.
ADDED_SINCE = {"data": ("files", "eval_files", "eval_fraction", "txt_documents"),
               "debug": ("peak_tflops", "profile_steps")}


def _without_added_fields(cfg: dict) -> dict:
  return {group: ({k: v for k, v in fields.items() if k not in ADDED_SINCE[group]}
                  if group in ADDED_SINCE else fields) for group, fields in cfg.items()}


def _config(spec: str):
  module, preset = spec.split(":")
  return importlib.import_module(f"configs.{module}").get_config(preset)


@pytest.mark.parametrize("spec", sorted(PINNED))
def test_dry_run_budget_is_pinned(spec):
  with contextlib.redirect_stdout(io.StringIO()):
    report = dry_run.report(_config(spec), compile_step=False)
  b, want = report["budget"], PINNED[spec]
  got = dict(params=b["params"], active_params=b["active_params"],
             forward_flops_per_token=b["forward_flops_per_token"],
             num_params=report["num_params"], non_embedding_params=b["non_embedding_params"],
             attn_ffn_active_ratio=b["attn_ffn_active_ratio"], ffn_breakdown=b["ffn_breakdown"])
  assert got == want


def test_every_preset_is_pinned():
  presets = {f"{name[:-3]}:{p}" for name in os.listdir(os.path.join(HERE, "..", "configs"))
             if name.endswith(".py") and name != "__init__.py"
             for p in importlib.import_module(f"configs.{name[:-3]}").PRESETS}
  assert presets == set(PINNED)


@pytest.mark.parametrize("spec", sorted(BEFORE))
def test_configs_saved_before_the_layout_still_resume(spec):
  saved = BEFORE[spec]
  current = config_lib.to_dict(_config(spec))
  config_lib.check_resume_compatible(saved, current, "runs/x")  # raises if refused
  assert saved == _without_added_fields(current)  # every field kept its name and value


def test_a_changed_paper_field_in_an_old_config_is_refused():
  saved = BEFORE["l3:lzw_tiny"]
  current = config_lib.to_dict(_config("l3:lzw_tiny"))
  current["l3"]["rows"] *= 2
  with pytest.raises(ConfigError, match=r"l3\.rows: 8192 -> 16384"):
    config_lib.check_resume_compatible(saved, current, "runs/x")
