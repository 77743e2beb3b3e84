"""MoE config validation: bad values stop before anything is built, in one sentence."""

import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError
from tests.helpers import tiny_config


def _moe(**overrides):
  return tiny_config(**{"model.sublayer": "moe", **overrides})


@pytest.mark.parametrize("overrides, devices, message", [
    ({"moe.top_k": 9, "moe.num_experts": 8}, 1, "top_k=9 exceeds"),
    ({"moe.backend": "magic"}, 1, "Unknown --config.moe.backend='magic'"),
    ({"moe.score_fn": "relu"}, 1, "score_fn='relu' is not one of"),
    ({"moe.num_experts": 6, "mesh.expert": 4, "mesh.data": 2}, 8, "not divisible by the expert"),
    ({"moe.expert_ffn_dim": 15, "mesh.tensor": 2, "mesh.expert": 2, "mesh.data": 2}, 8,
     "expert_ffn_dim=15 is not divisible by the tensor"),
    ({"moe.backend": "capacity", "mesh.expert": 2, "mesh.data": 4}, 8,
     "runs without expert parallelism"),
    ({"moe.first_dense_layers": 5}, 1, "first_dense_layers=5 must lie in"),
    ({"moe.capacity_factor": 0.0, "moe.backend": "capacity"}, 1, "capacity_factor must be"),
])
def test_bad_moe_config_is_one_sentence(overrides, devices, message):
  with pytest.raises(ConfigError, match=message) as err:
    config_lib.validate(_moe(**overrides), num_devices=devices, check_data=False)
  assert str(err.value).count(". ") <= 1 and "\n" not in str(err.value)


def test_presets_validate():
  from configs.moe import PRESETS, get_config
  for preset in PRESETS:
    config_lib.validate(get_config(preset), num_devices=1, check_data=False)


def test_a_resume_refuses_any_changed_routing_field_and_allows_the_backend():
  """The moe group fixes a resume as a whole, less its resume_free fields; a field
  the checkpoint's config lacks (added since) passes while it holds its default."""
  from moejax import config as config_lib
  from moejax.config.files import load_config
  from moejax.errors import ConfigError
  saved = config_lib.to_dict(load_config("configs/moe.py:mixtral_tiny"))
  for field, value in (("top_k", 1), ("score_fn", "sigmoid"), ("load_balance_coef", 0.0),
                       ("capacity_factor", 2.0)):
    current = load_config("configs/moe.py:mixtral_tiny")
    current.moe[field] = value
    with pytest.raises(ConfigError, match=f"moe.{field}: "):
      config_lib.check_resume_compatible(saved, config_lib.to_dict(current), "runs/x")
  current = load_config("configs/moe.py:mixtral_tiny")
  current.moe.backend, current.moe.block_size = "ragged_dot", 64
  config_lib.check_resume_compatible(saved, config_lib.to_dict(current), "runs/x")
  older = {**saved, "moe": {k: v for k, v in saved["moe"].items() if k != "z_loss_coef"}}
  current = load_config("configs/moe.py:mixtral_tiny")
  config_lib.check_resume_compatible(older, config_lib.to_dict(current), "runs/x")
  current.moe.z_loss_coef = 0.5  # not its default: the older run cannot have used it
  with pytest.raises(ConfigError, match="moe.z_loss_coef: '<missing>' -> 0.5"):
    config_lib.check_resume_compatible(older, config_lib.to_dict(current), "runs/x")
