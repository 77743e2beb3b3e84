"""Capacity balancing: the looped model's budget, counted here from the formulas
(not by model_budget), matches the vanilla MoE's within the tolerance."""

import pytest

from configs.moe import get_config
from moejax import budget
from moejax.errors import ConfigError
from moejax.papers.loopmoe.balance import balance_loop

VOCAB = 2048


def vanilla(preset="mixtral_tiny", **overrides):
  c = get_config(preset)
  for key, value in overrides.items():
    group, field = key.split(".")
    c[group][field] = value
  return c


def written_out(cfg, vocab):
  """params, forward FLOPs/token, attention/FFN active ratio and effective depth.
  Params per unique layer; active params and FLOPs per effective layer."""
  m, e, lp, S = cfg.model, cfg.moe, cfg.loop, cfg.data.seq_len
  d, L = m.d_model, m.num_layers
  attn = 2 * d * m.head_dim * (m.num_heads + m.num_kv_heads)  # q, k, v, o
  attn_flops = 2 * attn + 4 * S * m.num_heads * m.head_dim
  reps = [1] * L
  if lp.block_layers:
    reps[lp.prefix_layers:lp.prefix_layers + lp.block_layers] = [lp.iterations] * lp.block_layers
  params = vocab * d * (1 if m.tie_embeddings else 2) + (2 * L + 1) * d
  flops, attn_active, ffn_active = 2 * vocab * d, 0, 0
  for i, r in enumerate(reps):
    if i < e.first_dense_layers:
      ffn_p = ffn_a = 3 * d * m.ffn_dim
      ffn_f = 2 * ffn_a
    else:
      router, expert, shared = d * e.num_experts, 3 * d * e.expert_ffn_dim, \
          3 * d * e.num_shared_experts * e.expert_ffn_dim
      ffn_p = router + e.num_experts * expert + shared
      ffn_a = router + e.top_k * expert + shared
      ffn_f = 2 * ffn_a + 4 * e.top_k * d  # + dispatch/combine copies
    params += attn + ffn_p
    flops += r * (attn_flops + ffn_f)
    attn_active += r * attn
    ffn_active += r * ffn_a
  if lp.block_layers and lp.iter_adaln:
    a, mods = lp.adaln_dim, 3 if lp.adaln_gate else 2
    per_token = d * a + a * mods * d  # W_h (no bias), W_mod
    mlp = lp.adaln_pe_dim * a + a + a * a + a  # MLP_iter(PE(k)), once per iteration
    sites = 2 * lp.block_layers  # before attention and before the MoE FFN
    params += sites * (mlp + per_token + mods * d)
    flops += sites * lp.iterations * 2 * per_token
  return dict(params=params, forward_flops_per_token=flops,
              attn_ffn_active_ratio=attn_active / ffn_active, effective_layers=sum(reps))


CASES = [
    ("mixtral_tiny", {}, (0, 2, 2), True),
    ("mixtral_tiny", {"model.num_layers": 8}, (1, 2, 3), True),
    ("mixtral_tiny", {"model.num_layers": 8}, (1, 2, 3), False),
    ("mixtral_tiny", {"model.num_layers": 8}, (0, 4, 2), False),
    ("mixtral_tiny", {"model.num_layers": 8, "loop.adaln_dim": 2}, (0, 4, 2), True),
    ("mixtral_tiny", {"model.num_layers": 8, "model.d_model": 256}, (1, 2, 3), True),
    ("deepseek_tiny", {}, (1, 1, 3), True),
    ("deepseek_tiny", {"model.num_layers": 8}, (1, 2, 3), True),
    ("deepseek_tiny", {"model.num_layers": 8, "model.d_model": 256}, (1, 2, 3), False),
]


@pytest.mark.parametrize("preset,overrides,plan,adaln", CASES)
def test_balanced_budget_matches_written_out_count(preset, overrides, plan, adaln):
  v = vanilla(preset, **overrides)
  prefix, block, R = plan
  c, report = balance_loop(v, prefix_layers=prefix, block_layers=block, iterations=R,
                           iter_adaln=adaln, vocab_size=VOCAB)
  want, got = written_out(v, VOCAB), written_out(c, VOCAB)
  assert got["effective_layers"] == want["effective_layers"] == v.model.num_layers
  assert c.model.num_layers == v.model.num_layers - (R - 1) * block
  assert (c.loop.prefix_layers, c.loop.block_layers, c.loop.iterations,
          c.loop.iter_adaln) == (prefix, block, R, adaln)
  for q in ("params", "forward_flops_per_token", "attn_ffn_active_ratio"):
    err = (got[q] - want[q]) / want[q]
    assert abs(err) <= 0.01, (q, err)
    assert report["errors"][q] == pytest.approx(err, abs=1e-12)
    assert report["vanilla"][q] == pytest.approx(want[q])
    assert report["looped"][q] == pytest.approx(got[q])
  # The written-out count is model_budget's, loop or not.
  for cfg, count in ((v, want), (c, got)):
    b = budget.model_budget(cfg, VOCAB)
    assert b["params"] == count["params"]
    assert b["forward_flops_per_token"] == count["forward_flops_per_token"]
    assert b["effective_layers"] == count["effective_layers"]
  # Only the two knobs moved.
  assert (c.moe.num_experts, c.moe.expert_ffn_dim) == (report["num_experts"],
                                                       report["expert_ffn_dim"])
  for group, field in [("model", "d_model"), ("model", "num_heads"), ("model", "head_dim"),
                       ("model", "num_kv_heads"), ("moe", "top_k"),
                       ("moe", "num_shared_experts"), ("model", "ffn_dim")]:
    assert c[group][field] == v[group][field]
  assert c.moe.num_experts > v.moe.num_experts
  assert report["explanation"].startswith(f"E'={c.moe.num_experts}")


def test_vanilla_config_is_not_changed():
  v = vanilla(**{"model.num_layers": 8})
  before = v.to_dict()
  balance_loop(v, prefix_layers=1, block_layers=2, iterations=3, vocab_size=VOCAB)
  assert v.to_dict() == before


def test_loop_base_experts_near_the_formula():
  # All layers looped (L/R unique x R), no IterAdaLN, no shared experts:
  # E' ~ R E + (R - 1) A / (3 d F).
  v = vanilla(**{"model.num_layers": 8})
  m, e = v.model, v.moe
  A = 2 * m.d_model * m.head_dim * (m.num_heads + m.num_kv_heads)
  for R in (2, 4):
    c, report = balance_loop(v, prefix_layers=0, block_layers=8 // R, iterations=R,
                             iter_adaln=False, vocab_size=VOCAB)
    estimate = R * e.num_experts + (R - 1) * A / (3 * m.d_model * e.expert_ffn_dim)
    assert abs(c.moe.num_experts - estimate) <= 1.5, (R, c.moe.num_experts, estimate)
    assert abs(report["params_matching_experts"] - estimate) < 0.5


def test_iter_adaln_is_paid_with_narrower_experts():
  v = vanilla(**{"model.num_layers": 8, "loop.adaln_dim": 16})
  kw = dict(prefix_layers=1, block_layers=2, iterations=3, vocab_size=VOCAB, tolerance=0.05)
  _, base = balance_loop(v, iter_adaln=False, **kw)
  _, ada = balance_loop(v, iter_adaln=True, **kw)
  assert ada["expert_ffn_dim"] < base["expert_ffn_dim"]
  assert ada["iter_adaln_flops_share"] > 0 == base["iter_adaln_flops_share"]


def test_experts_multiple_of():
  v = vanilla("deepseek_tiny", **{"model.num_layers": 8})
  c, report = balance_loop(v, prefix_layers=1, block_layers=2, iterations=3,
                           vocab_size=VOCAB, experts_multiple_of=8, tolerance=0.02)
  assert c.moe.num_experts % 8 == 0 and c.moe.num_experts >= c.moe.top_k
  assert report["max_error"] <= 0.02


def test_search_is_deterministic():
  v = vanilla("deepseek_tiny", **{"model.num_layers": 8})
  kw = dict(prefix_layers=1, block_layers=2, iterations=3, vocab_size=VOCAB)
  c1, r1 = balance_loop(v, **kw)
  c2, r2 = balance_loop(v, **kw)
  assert c1.to_dict() == c2.to_dict() and r1 == r2


@pytest.mark.parametrize("overrides,plan,match", [
    ({"model.sublayer": "dense"}, (1, 2, 3), "needs a Vanilla MoE config"),
    ({"loop.block_layers": 2}, (1, 2, 3), "loop.block_layers=0"),
    ({}, (1, 4, 3), "fewer iterations"),  # 1 + 4 x 3 > 8 layers
    ({}, (1, 2, 1), "iterations >= 2"),
    ({}, (1, 0, 2), "block_layers >= 1"),
    ({"moe.first_dense_layers": 1}, (0, 4, 2), "prefix_layers >= 1"),
    ({"loop.adaln_dim": 64}, (1, 2, 3), "smaller loop.adaln_dim"),
])
def test_errors_say_what_to_change(overrides, plan, match):
  v = vanilla(**{"model.num_layers": 8, **overrides})
  prefix, block, R = plan
  with pytest.raises(ConfigError, match=match.replace(".", r"\.").replace("(", r"\(")):
    balance_loop(v, prefix_layers=prefix, block_layers=block, iterations=R, vocab_size=VOCAB)


def test_coarse_expert_steps_name_the_largest_error():
  # Switch-style top-1 experts of width 384: one expert is a ~6% params step.
  v = vanilla("switch_tiny", **{"model.num_layers": 8})
  with pytest.raises(ConfigError, match=r"is off by .* in params .*experts_multiple_of"):
    balance_loop(v, prefix_layers=1, block_layers=2, iterations=3, vocab_size=VOCAB)
