"""The new sublayers train end to end through the real train loop, in bf16:
the step reaches MoHGE's scheduled loss, OmniMoE's BatchNorm statistics live in
the model state, and resuming with a shape-changing sublayer field is refused."""

import numpy as np
import pytest

from moejax.checkpoint import Checkpointer
from moejax.errors import ConfigError
from moejax.train import train_and_evaluate
from tests.helpers import read_metrics, tiny_config

OMNI = {"model.sublayer": "omnimoe", "atomic.num_experts": 64, "atomic.top_k": 4,
        "atomic.shared_ffn_dim": 32}
MOHGE = {"model.sublayer": "mohge", "mohge.group_widths": (8, 12, 16, 20),
         "mohge.experts_per_group": 2, "mohge.shared_ffn_dim": 16,
         "mohge.group_aux_coef": 0.1}


def _train(tmp_path, overrides):
  cfg = tiny_config(**{"train.steps": 4, "train.warmup_steps": 1, **overrides})
  final = train_and_evaluate(cfg, str(tmp_path))
  assert final["status"] == "completed" and np.isfinite(final["eval/loss"])
  return {r["step"]: r for r in read_metrics(str(tmp_path)) if "loss" in r}


# Slow (35-40 s of bf16 compiles): the schedule itself is checked at the layer in
# tests/test_mohge.py; this checks that the trainer's step reaches it.
@pytest.mark.slow
def test_mohge_group_loss_switches_on_after_half_of_training(tmp_path):
  rows = _train(tmp_path, {**MOHGE, "model.compute_dtype": "bfloat16"})
  assert sorted(rows) == [1, 2, 3, 4]
  # steps are 1-based here; on when step > train.steps * 0.5 = 2
  assert [rows[s]["aux/loss/group_balance"] > 0 for s in (1, 2, 3, 4)] == [
      False, False, True, True]
  assert all(rows[s]["aux/group_balance"] > 0 for s in rows)
  assert all(0 < rows[s]["aux/active_params"] for s in rows)


def test_omnimoe_trains_in_bf16_and_checkpoints_its_batchnorm_state(tmp_path):
  rows = _train(tmp_path, {**OMNI, "model.compute_dtype": "bfloat16"})
  assert all(np.isfinite(rows[s]["loss"]) and 0 < rows[s]["aux/gate_mass"] < 1
             for s in rows)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  state = ckpt.restore_arrays(ckpt.latest_step())
  stats = [v for path, v in _leaves(state["model_state"]) if "running_var" in path]
  assert stats and all(not np.allclose(v, 1.0) for v in stats)  # moved off the init


# Slow: PEER shares OmniMoE's atomic layer body, which the test above trains in
# bf16; PEER's own numerics are checked against its reference in test_atomic_experts.
@pytest.mark.slow
def test_peer_trains_in_bf16(tmp_path):
  rows = _train(tmp_path, {**OMNI, "model.sublayer": "peer", "atomic.peer_query_dim": 16,
                           "atomic.peer_heads": 2, "model.compute_dtype": "bfloat16"})
  assert all(np.isfinite(rows[s]["loss"]) for s in rows)
  assert all(rows[s]["aux/gate_mass"] == pytest.approx(2.0, rel=1e-3) for s in rows)  # 2 heads


# Slow: the same refusal for dense and MoE fields is test_train.py's
# test_resume_refuses_an_incompatible_checkpoint; this adds OmniMoE's field.
@pytest.mark.slow
def test_resume_refuses_a_changed_expert_table(tmp_path):
  _train(tmp_path, OMNI)
  with pytest.raises(ConfigError, match=r"atomic.num_experts: 64 -> 256"):
    train_and_evaluate(tiny_config(**{"train.steps": 8, **OMNI,
                                      "atomic.num_experts": 256}), str(tmp_path))


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


@pytest.mark.slow  # two short trainings; the warning's rule is also tested without training
def test_resume_with_more_steps_warns_that_the_mohge_switch_moves(tmp_path, capsys):
  _train(tmp_path, MOHGE)
  capsys.readouterr()
  final = train_and_evaluate(tiny_config(**{"train.steps": 6, "train.warmup_steps": 1,
                                            **MOHGE}), str(tmp_path))
  assert final["step"] == 6
  out = capsys.readouterr()
  assert "train.steps changed 4 -> 6, so MoHGE's group loss switches on" in out.out + out.err


def test_the_mohge_switch_warning_names_the_old_and_new_totals():
  """The rule behind the resume warning, without training: only a MoHGE config whose
  train.steps changed is warned about."""
  from moejax import config as config_lib
  saved = config_lib.to_dict(tiny_config(**MOHGE))
  longer = config_lib.to_dict(tiny_config(**{**MOHGE, "train.steps": 24}))
  warnings = config_lib.resume_warnings(saved, longer)
  assert len(warnings) == 1 and "train.steps changed 12 -> 24" in warnings[0]
  assert config_lib.resume_warnings(saved, saved) == []
  dense = config_lib.to_dict(tiny_config())
  assert config_lib.resume_warnings(dense, dict(dense, train={**dense["train"], "steps": 24})) == []
