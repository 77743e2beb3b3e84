"""Paper-scale arms (experiments/paper_sizes.py): the papers' model sizes, checked without a model.

Each size is also recomputed here from the architecture (layers x widths), so a
change in moejax/budget.py's conventions or in a preset shows up as a failure
that names the paper number it moved.
"""

import dataclasses
import math

import pytest

from experiments import paper_sizes as ps
from experiments import registry, sweep
from moejax import data as data_lib
from moejax.errors import ConfigError
from moejax.papers.loopmoe.balance import balance_loop

NAMES = ("omnimoe", "mohge", "loopmoe", "l3")


@pytest.fixture(scope="module")
def budgets():
  """name -> arm -> moejax.budget.model_budget at the paper scale."""
  return {n: sweep.arm_budgets(registry.get(n), "paper") for n in NAMES}


def paper_config(name: str, arm: str):
  exp = registry.get(name)
  row = next(r for r in exp.rows("paper") if r["arm"] == arm)
  return sweep.row_config(exp, row, "paper")


def attention_params(d, heads, kv_heads, head_dim):
  return d * head_dim * (2 * heads + 2 * kv_heads)


@pytest.mark.parametrize("name", NAMES)
def test_targets_are_well_formed(name, budgets):
  for t in registry.get(name).targets:
    assert t.scale == "paper" and t.quantity in budgets[name][t.arm]
    assert "docs/papers/" in t.source and 0 < t.tolerance <= 0.10


@pytest.mark.parametrize("name", ("omnimoe", "loopmoe", "l3"))
def test_a_target_off_by_more_than_its_tolerance_is_a_config_error(name, budgets):
  exp = registry.get(name)
  t = exp.targets[0]
  ours = budgets[name][t.arm][t.quantity]
  near = dataclasses.replace(t, value=ours / (1 + t.tolerance / 2))
  assert len(sweep.check_targets(dataclasses.replace(exp, targets=(near,)), "paper",
                                 budgets[name])) == 1
  for factor in (1 + 2 * t.tolerance, 1 - 2 * t.tolerance):
    far = dataclasses.replace(t, value=ours / factor)
    with pytest.raises(ConfigError, match="from the paper's"):
      sweep.check_targets(dataclasses.replace(exp, targets=(far,)), "paper", budgets[name])
  # A target for another scale is not checked here.
  other = dataclasses.replace(t, scale="small", value=1.0)
  assert sweep.check_targets(dataclasses.replace(exp, targets=(other,)), "paper",
                             budgets[name]) == []


def test_omnimoe_has_17b_active_params(budgets):
  """active = L (attention + shared SwiGLU + 2 sqrt(N) d router + 2 k d experts + 2 norms)
  + final norm + tied unembedding."""
  c = paper_config("omnimoe", "omnimoe")
  m, a = c.model, c.atomic
  d, vocab = m.d_model, data_lib.vocab_size(c.data)
  layer = (attention_params(d, m.num_heads, m.num_kv_heads, m.head_dim)
           + 3 * d * a.shared_ffn_dim + 2 * d * math.isqrt(a.num_experts)
           + 2 * a.top_k * d + 2 * d)
  active = m.num_layers * layer + d + vocab * d
  ours = budgets["omnimoe"]
  assert ours["omnimoe"]["active_params"] == pytest.approx(active, rel=1e-3)
  assert active == pytest.approx(1.7e9, rel=0.05)
  # the README's N and k are kept; every baseline sits at the same active params
  assert (a.num_experts, a.top_k) == (4096, 16)
  for arm in ("dense", "deepseek", "peer"):
    assert ours[arm]["active_params"] == pytest.approx(active, rel=0.01)


def test_mohge_has_the_paper_architecture_and_about_20_percent_fewer_params(budgets):
  c = paper_config("mohge", "mohge")
  m, h = c.model, c.mohge
  assert (m.num_layers, m.d_model, m.num_heads) == (15, 1024, 16)
  assert tuple(h.group_widths) == (384, 512, 640, 768, 896, 1024, 1152, 1280)
  assert (h.experts_per_group * len(h.group_widths), h.top_groups, h.top_k) == (64, 4, 6)
  assert h.shared_ffn_dim == 2 * 1024
  # routed parameters: 8 experts of each width against 64 of width 1024
  routed = 8 * sum(h.group_widths)
  base_routed = 64 * ps.MOHGE_BASELINE_WIDTH
  assert routed / base_routed == 0.8125
  ours = budgets["mohge"]
  d, layers, groups = m.d_model, m.num_layers, len(h.group_widths)
  # the budgets differ by the routed experts only, less MoHGE's group router (d x G)
  saved = layers * (3 * d * (base_routed - routed) - d * groups)
  assert ours["baseline"]["params"] - ours["mohge"]["params"] == saved
  # "approximately 20% fewer total parameters": 18.75% of the routed ones, less of
  # the whole model, whose attention and embeddings are unchanged
  whole = 1 - ours["mohge"]["params"] / ours["baseline"]["params"]
  assert 0.15 < whole < 0.1875
  # "A3B" is a preset name: only MoHGE's total params come near 3B
  assert ours["mohge"]["params"] == pytest.approx(3e9, rel=0.05)
  assert ours["mohge"]["active_params"] < 0.25 * 3e9
  assert ours["dense"]["active_params"] == pytest.approx(ours["baseline"]["active_params"],
                                                         rel=0.01)


def test_loopmoe_vanilla_is_3b_and_the_loop_arms_are_what_balance_loop_picks(budgets):
  v = paper_config("loopmoe", "vanilla")
  m, e = v.model, v.moe
  d, vocab = m.d_model, data_lib.vocab_size(v.data)
  layer = (attention_params(d, m.num_heads, m.num_kv_heads, m.head_dim)
           + e.num_experts * (3 * d * e.expert_ffn_dim + d) + 2 * d)
  total = m.num_layers * layer + d + vocab * d  # tied embeddings
  ours = budgets["loopmoe"]
  assert ours["vanilla"]["params"] == pytest.approx(total, rel=1e-3)
  assert total == pytest.approx(3e9, rel=0.02)
  for arm in ("loopbase", "loopmoe"):
    looped, report = balance_loop(v, **ps.LOOP_PLAN, iter_adaln=arm == "loopmoe",
                                  vocab_size=vocab)
    assert (report["num_experts"], report["expert_ffn_dim"]) == ps.LOOP_EXPERTS[arm]
    c = paper_config("loopmoe", arm)
    assert c.model.num_layers == looped.model.num_layers == 7
    assert ours[arm]["effective_layers"] == m.num_layers
  assert not paper_config("loopmoe", "loopmoe_nogate").loop.adaln_gate


def test_l3_tables_and_the_papers_active_and_total_params(budgets):
  c = paper_config("l3", "lzw")
  m, l3 = c.model, c.l3
  d, vocab = m.d_model, data_lib.vocab_size(c.data)
  assert (l3.rows, l3.max_rows_per_token, len(l3.after_layers)) == (710_000, 512, 2)
  table = l3.rows * (d + l3.emb_dim)  # keys d wide, values emb_dim wide (untied)
  layer = table + l3.emb_dim * l3.up_dim + (d + l3.up_dim) * d + d + 2 * l3.up_dim
  dense_ffn = paper_config("l3", "dense").model.ffn_dim
  ours = budgets["l3"]
  narrowing = m.num_layers * 3 * d * (dense_ffn - m.ffn_dim)
  assert ours["lzw"]["params"] - ours["dense"]["params"] == 2 * layer - narrowing
  # ~1.6K params a row: 2 tables hold the 3.1B total less the ~0.8B model
  assert 2 * table == pytest.approx(3.1e9 - 0.803e9, rel=0.05)
  assert ours["lzw"]["params"] == pytest.approx(3.1e9, rel=0.05)
  assert ours["dense"]["params"] == pytest.approx(809e6, rel=0.01)
  # the paper counts the (untied) input embedding as active; moejax.budget does not
  assert not m.tie_embeddings and vocab * d == ps.L3_INPUT_EMBEDDING
  assert ours["dense"]["active_params"] + vocab * d == pytest.approx(809e6, rel=0.01)
  assert ours["lzw"]["active_params"] + vocab * d == pytest.approx(803e6, rel=0.01)
  assert ours["uniform"]["params"] == ours["lzw"]["params"]
  assert paper_config("l3", "uniform").l3.allocation == "uniform"
