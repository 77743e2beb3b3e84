"""LoopMoE and L3 config checks: bad values stop before anything is built, in one
sentence; presets validate; a broken budget match stops run.py; resume refuses a
changed loop or L3 shape."""

import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError
from tests.helpers import TINY_FLAGS, config_flags, run_py, tiny_config

_LOOP = {"model.num_layers": 4, "loop.prefix_layers": 1, "loop.block_layers": 2,
         "loop.iterations": 2}
_L3 = {"model.num_layers": 4, "l3.after_layers": (2,), "l3.rows": 512,
       "l3.max_rows_per_token": 4}


@pytest.mark.parametrize("overrides, devices, message", [
    ({"loop.iterations": 3}, 1, "needs a looped block"),
    ({**_LOOP, "loop.block_layers": 4}, 1, "exceed model.num_layers=4"),
    ({**_LOOP, "loop.iterations": 0}, 1, "iterations must be at least 1"),
    ({**_LOOP, "loop.adaln_pe_dim": 7}, 1, "must be even"),
    ({**_LOOP, "loop.adaln_dim": 0}, 1, "adaln_dim must be positive"),
    ({**_L3, "l3.after_layers": (0,)}, 1, "between 1 and model.num_layers=4"),
    ({**_L3, "l3.after_layers": (3, 2)}, 1, "must increase strictly"),
    ({**_L3, "l3.rows": 100}, 1, "at least one row"),
    ({**_L3, "l3.rows": 5000}, 1, "vocab x l3.max_rows_per_token"),
    ({**_L3, "l3.allocation": "zipf"}, 1, "allocation='zipf' is not one of"),
    ({**_L3, "l3.path": "magic"}, 1, "path='magic' is not one of"),
    ({**_L3, "l3.tie_kv": True, "l3.emb_dim": 16}, 1, "must equal model.d_model=32"),
    ({**_L3, "l3.host_eval": True, "mesh.expert": 2, "mesh.data": 4}, 8,
     "host_eval keeps whole tables on one host device"),
    ({**_L3, "l3.rows": 514, "mesh.expert": 4, "mesh.data": 2}, 8,
     "not divisible by the expert mesh axis"),
    ({**_LOOP, **_L3, "l3.after_layers": (2,)}, 1, "inside the looped block"),
])
def test_bad_loop_or_l3_config_is_one_sentence(overrides, devices, message):
  with pytest.raises(ConfigError, match=message) as err:
    config_lib.validate(tiny_config(**overrides), num_devices=devices, check_data=False)
  assert str(err.value).count(". ") <= 1 and "\n" not in str(err.value)


def test_l3_next_to_a_loop_is_allowed():
  cfg = tiny_config(**{**_LOOP, **_L3, "l3.after_layers": (1, 3, 4)})
  config_lib.validate(cfg, num_devices=1, check_data=False)


@pytest.mark.parametrize("module", ["configs.loopmoe", "configs.l3"])
def test_presets_validate_and_claimed_matches_hold(module):
  import importlib
  from moejax import data
  from moejax.config import budget_match
  mod = importlib.import_module(module)
  claims = 0
  for preset in mod.PRESETS:
    cfg = mod.get_config(preset)
    config_lib.validate(cfg, num_devices=1, check_data=False)
    if cfg.budget_match.reference:  # check_config raises on a miss
      report = budget_match.check_config(cfg, data.vocab_size(cfg.data))
      assert report and set(report) == set(cfg.budget_match.quantities)
      claims += 1
  # every arm but the reference (vanilla / dense) claims a match
  assert claims == sum(not p.startswith(("vanilla_", "dense_")) for p in mod.PRESETS) > 0


def test_broken_budget_match_stops_run_py_before_training(tmp_path):
  r = run_py(["--config=configs/loopmoe.py:loopmoe_tiny", "--config.moe.num_experts=8",
              f"--workdir={tmp_path}", "--dry_run"])
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("config error:")]
  assert len(lines) == 1 and "params" in lines[0] and "Traceback" not in r.stderr


def test_resume_refuses_changed_loop_fields():
  saved = config_lib.to_dict(tiny_config(**_LOOP))
  for field, value in (("loop.iterations", 3), ("loop.block_layers", 1),
                       ("loop.prefix_layers", 0), ("loop.iter_adaln", False),
                       ("loop.adaln_dim", 8)):
    current = config_lib.to_dict(tiny_config(**{**_LOOP, field: value}))
    with pytest.raises(ConfigError, match=field):
      config_lib.check_resume_compatible(saved, current, "/w")
  # recomputing activations changes nothing the checkpoint holds
  config_lib.check_resume_compatible(
      saved, config_lib.to_dict(tiny_config(**{**_LOOP, "loop.remat": True})), "/w")


@pytest.mark.slow
def test_resume_refuses_a_changed_loop(tmp_path):
  flags = {**TINY_FLAGS, "model.sublayer": "moe", "model.num_layers": 3,
           "loop.prefix_layers": 1, "loop.block_layers": 1, "loop.iterations": 2,
           "train.steps": 4, "checkpoint.every": 2}
  r = run_py([*config_flags(flags), f"--workdir={tmp_path}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "loop/cos_last" in r.stdout
  r = run_py([*config_flags({**flags, "loop.iterations": 3, "train.steps": 6}),
              f"--workdir={tmp_path}"])
  assert r.returncode == 2 and "loop.iterations: 2 -> 3" in r.stderr, r.stderr[-2000:]


def test_resume_refuses_changed_l3_fields():
  saved = config_lib.to_dict(tiny_config(**_L3))
  for field, value in (("l3.rows", 1024), ("l3.allocation", "uniform"),
                       ("l3.after_layers", (1,)), ("l3.tie_kv", True)):
    current = config_lib.to_dict(tiny_config(**{**_L3, field: value}))
    with pytest.raises(ConfigError, match=field):
      config_lib.check_resume_compatible(saved, current, "/w")
  # how the lookup is computed may change: same table, same answer
  config_lib.check_resume_compatible(
      saved, config_lib.to_dict(tiny_config(**{**_L3, "l3.path": "sorted"})), "/w")
