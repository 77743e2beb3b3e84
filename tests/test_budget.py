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
