"""budget_match.reference: a claimed budget match is checked from the configs."""

import textwrap

import pytest

from configs.moe import get_config
from moejax.config import budget_match
from moejax.config.files import load_config
from moejax.errors import ConfigError
from moejax.papers.loopmoe.balance import balance_loop

VOCAB = 2048


@pytest.fixture
def reference_file(tmp_path):
  """A config file whose presets are mixtral_tiny with 8 layers and a different
  seq_len (the candidate's data must replace it)."""
  path = tmp_path / "refs.py"
  path.write_text(textwrap.dedent("""\
      from moejax.config.base import parse_preset
      from configs.moe import get_config as moe_config

      def get_config(arg=None):
        name = parse_preset(arg, {"vanilla8": None}, default="vanilla8")
        c = moe_config("mixtral_tiny")
        c.name = name
        c.model.num_layers = 8
        c.data.seq_len = 64
        return c
      """))
  return str(path)


def candidate(reference, **overrides):
  c = get_config("mixtral_tiny")
  c.model.num_layers = 8
  for key, value in overrides.items():
    group, field = key.split(".")
    c[group][field] = value
  c.budget_match.reference = reference
  return c


def test_no_reference_is_a_no_op():
  c = get_config("mixtral_tiny")
  assert c.budget_match.reference == ""
  assert budget_match.check_config(c, VOCAB) is None


def test_matching_pair_passes_with_the_candidates_data(reference_file):
  c = candidate(f"{reference_file}:vanilla8")  # seq_len 128 here, 64 in the file
  report = budget_match.check_config(c, VOCAB)
  assert set(report) == set(c.budget_match.quantities)
  for ours, theirs, rel in report.values():
    assert ours == theirs and rel == 0


def test_balanced_loop_passes(reference_file):
  c, _ = balance_loop(load_config(f"{reference_file}:vanilla8"), prefix_layers=1,
                      block_layers=2, iterations=3, vocab_size=VOCAB)
  c.budget_match.reference = f"{reference_file}:vanilla8"
  report = budget_match.check_config(c, VOCAB)
  assert all(abs(rel) <= 0.01 for _, _, rel in report.values())
  text = budget_match.format_report(report)
  lines = text.splitlines()
  assert len(lines) == 1 + len(report)
  assert len({len(line) for line in lines}) == 1  # aligned columns
  assert lines[1].startswith("params") and "%" in lines[1]


def test_mismatch_names_the_quantity(reference_file):
  c = candidate(f"{reference_file}:vanilla8", **{"moe.num_experts": 16})
  with pytest.raises(ConfigError, match=r"in params [\d,]+ vs [\d,]+ \(\+\d") as e:
    budget_match.check_config(c, VOCAB)
  assert "forward_flops_per_token" not in str(e.value)  # E moves FLOPs < 1%
  c = candidate(f"{reference_file}:vanilla8", **{"moe.expert_ffn_dim": 96})
  with pytest.raises(ConfigError, match="attn_ffn_active_ratio") as e:
    budget_match.check_config(c, VOCAB)
  assert "params" in str(e.value) and "forward_flops_per_token" in str(e.value)


def test_tolerance_and_quantity_selection(reference_file):
  c = candidate(f"{reference_file}:vanilla8", **{"moe.num_experts": 9})
  c.budget_match.quantities = ("forward_flops_per_token",)
  report = budget_match.check_config(c, VOCAB)
  assert list(report) == ["forward_flops_per_token"]
  c.budget_match.quantities = ("params",)
  with pytest.raises(ConfigError, match="params"):
    budget_match.check_config(c, VOCAB)
  c.budget_match.tolerance = 0.2
  assert budget_match.check_config(c, VOCAB)["params"][2] > 0.01


def test_unknown_quantity_lists_valid_ones(reference_file):
  c = candidate(f"{reference_file}:vanilla8")
  c.budget_match.quantities = ("params", "flops")
  with pytest.raises(ConfigError, match=r"forward_flops_per_token.*\(unknown: \['flops'\]\)"):
    budget_match.check_config(c, VOCAB)
  c.budget_match.quantities = ("ffn_breakdown",)  # a dict, not a number
  with pytest.raises(ConfigError, match="unknown"):
    budget_match.check_config(c, VOCAB)


def test_bad_spec_paths():
  with pytest.raises(ConfigError, match="exists neither"):
    budget_match.check_config(candidate("configs/no_such_file.py:x"), VOCAB)
  with pytest.raises(ConfigError, match="file.py:preset"):
    load_config("configs/moe:mixtral_tiny")
  with pytest.raises(ConfigError, match="Unknown preset"):
    load_config("configs/moe.py:no_such_preset")


def test_load_config_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # falls back to the repository root
  c = load_config("configs/moe.py:deepseek_tiny")
  assert c.name == "moe_deepseek_tiny"
  assert load_config("configs/moe.py").name == "moe_mixtral_tiny"
