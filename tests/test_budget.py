"""Budget formulas against the parameters of the built model."""

import math

import jax
import pytest
from flax import nnx

from moejax import budget
from moejax.model.transformer import Transformer
from tests.helpers import tiny_config


@pytest.mark.parametrize("overrides", [
    {}, {"model.tie_embeddings": False},
    {"model.num_kv_heads": 1, "model.ffn_dim": 96, "model.num_layers": 3},
])
def test_param_count_matches_built_model(overrides):
  cfg = tiny_config(**overrides)
  model = nnx.eval_shape(lambda: Transformer(cfg, 264, nnx.Rngs(params=0)))
  built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert budget.model_budget(cfg, 264)["params"] == built


def test_flops_per_token_written_out():
  cfg = tiny_config()
  m, L, V, S = cfg.model, cfg.model.num_layers, 264, cfg.data.seq_len
  attn_proj = m.d_model * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim \
      + m.num_heads * m.head_dim * m.d_model
  per_layer = 2 * attn_proj + 4 * S * m.num_heads * m.head_dim + 2 * 3 * m.d_model * m.ffn_dim
  want = L * per_layer + 2 * V * m.d_model
  b = budget.model_budget(cfg, V)
  assert b["forward_flops_per_token"] == want
  assert b["train_flops_per_token"] == 3 * want


@pytest.mark.parametrize("preset", ["switch_tiny", "mixtral_tiny", "deepseek_tiny"])
def test_moe_param_count_matches_built_model(preset):
  from configs.moe import get_config
  cfg = get_config(preset)
  model = nnx.eval_shape(lambda: Transformer(cfg, 2048, nnx.Rngs(params=0)))
  built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert budget.model_budget(cfg, 2048)["params"] == built


def test_moe_active_params_and_flops_written_out():
  # deepseek-like: first block dense, then E=64 experts of width 48, top-6, 2 shared.
  from configs.moe import get_config
  cfg = get_config("deepseek_tiny")
  m, e, V, S = cfg.model, cfg.moe, 2048, cfg.data.seq_len
  d = m.d_model
  attn_proj = d * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim + m.num_heads * m.head_dim * d
  dense_ffn = 3 * d * m.ffn_dim
  moe_active = d * 64 + (6 + 2) * 3 * d * 48  # router + routed + shared
  moe_total = d * 64 + (64 + 2) * 3 * d * 48
  L = m.num_layers
  b = budget.model_budget(cfg, V)
  norms = (2 * L + 1) * d
  assert b["params"] == V * d + L * attn_proj + dense_ffn + (L - 1) * moe_total + norms
  assert b["active_params"] == V * d + L * attn_proj + dense_ffn + (L - 1) * moe_active + norms
  moe_flops = 2 * d * 64 + 2 * (6 + 2) * 3 * d * 48 + 4 * 6 * d  # router, experts, gathers
  per_layer_attn = 2 * attn_proj + 4 * S * m.num_heads * m.head_dim
  want = L * per_layer_attn + 2 * dense_ffn + (L - 1) * moe_flops + 2 * V * d
  assert b["forward_flops_per_token"] == want
  assert b["ffn_breakdown"]["router_flops_per_token"] == (L - 1) * 2 * d * 64
