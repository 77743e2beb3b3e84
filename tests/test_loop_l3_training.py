"""LoopMoE and L3 train end to end through the real train loop: losses fall,
the diagnostics reach metrics.jsonl, the L3 allocation is saved in the
checkpoint, an interrupted run resumes onto the uninterrupted trajectory, and
the budget formula counts exactly the parameters the built model has."""

import jax
import math
import numpy as np
import pytest
from flax import nnx

from moejax import budget as budget_lib
from moejax import data as data_lib
from moejax.papers.l3 import allocation as l3_allocation
from moejax.checkpoint import Checkpointer
from moejax.model.transformer import Transformer
from moejax.train import train_and_evaluate
from tests.helpers import read_metrics, tiny_config

LOOP = {"model.sublayer": "moe", "model.num_layers": 3, "loop.prefix_layers": 1,
        "loop.block_layers": 1, "loop.iterations": 3, "moe.num_experts": 4,
        "moe.expert_ffn_dim": 32}
L3 = {"l3.after_layers": (1,), "l3.rows": 1024, "l3.max_rows_per_token": 8,
      "l3.emb_dim": 16, "l3.up_dim": 16, "l3.allocation": "lzw"}


def _train(workdir, overrides, steps=6):
  cfg = tiny_config(**{"train.steps": steps, "train.warmup_steps": 1,
                       "checkpoint.every": 3, **overrides})
  final = train_and_evaluate(cfg, str(workdir))
  assert final["status"] == "completed" and np.isfinite(final["eval/loss"])
  return {r["step"]: r for r in read_metrics(str(workdir)) if "loss" in r}


OVERRIDES = {**LOOP, **L3, "l3.after_layers": (1, 3)}


@pytest.mark.slow  # about 45 s of compiles: train, eval, host eval, two evaluate_run meshes
def test_looped_moe_with_l3_trains_logs_diagnostics_and_saves_its_allocation(tmp_path):
  cfg = tiny_config(**{"train.steps": 6, "train.warmup_steps": 1, "checkpoint.every": 3,
                       **OVERRIDES, "l3.host_eval": True})
  final = train_and_evaluate(cfg, str(tmp_path))
  straight = {r["step"]: r for r in read_metrics(str(tmp_path)) if "loss" in r}
  # The final evaluation again with host-resident tables gives the same loss.
  host = final["l3_host_eval"]
  assert host["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
  assert host["batches"] >= 1 and 0 < host["mean_fraction"] <= 1 and host["mean_kib"] > 0
  assert straight[6]["loss"] < straight[1]["loss"]
  row = straight[6]
  assert np.shape(row["aux/loop/cos_consecutive"]) == (3,)
  assert np.shape(row["aux/loop/load_entropy"]) == (3,)
  assert "aux/expert_load/layer_01/iter_2" in row
  assert 0 < row["aux/l3_entropy/after_01"] and "aux/l3_entropy/after_03" in row

  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  state = ckpt.restore_arrays(ckpt.latest_step())
  saved = [np.asarray(v) for path, v in _leaves(state["model_state"])
           if "counts" in path.split("/")]
  cfg = tiny_config(**OVERRIDES)
  expected = l3_allocation.load_or_build(cfg.data, cfg.l3, data_lib.vocab_size(cfg.data))
  assert len(saved) == 2 and all(np.array_equal(s, expected) for s in saved)

  # moejax.evaluate restores the looped model with its L3 tables (the saved
  # allocation, not a stand-in) and scores as the trainer did, on the run's mesh
  # and on one device.
  from moejax.evaluate import evaluate_run
  for one_device in (False, True):
    record = evaluate_run(str(tmp_path), max_batches=2, one_device=one_device,
                          say=lambda _: None)
    assert record["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
  assert int(expected.sum()) == 1024 and expected.max() == 8 and expected.min() >= 1


@pytest.mark.slow
def test_interrupted_looped_l3_run_resumes_onto_the_same_trajectory(tmp_path):
  from moejax.errors import NonFiniteLossError
  straight = _train(tmp_path / "straight", OVERRIDES)
  # A NaN at step 5 stops the run; the last checkpoint is step 3.
  with pytest.raises(NonFiniteLossError):
    _train(tmp_path / "split", {**OVERRIDES, "debug.inject_nan_at_step": 5})
  resumed = _train(tmp_path / "split", OVERRIDES)
  for step in (4, 5, 6):
    assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5)


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f"{prefix}/{k}")
  else:
    yield prefix, tree


@pytest.mark.parametrize("overrides", [
    L3, {**L3, "l3.tie_kv": True, "l3.emb_dim": 32}, {**L3, "l3.after_layers": (1, 2)},
    LOOP, {**LOOP, "loop.iter_adaln": False}, {**LOOP, "loop.adaln_gate": False},
    {**LOOP, **L3, "l3.after_layers": (3,)},
])
def test_budget_counts_the_parameters_the_model_has(overrides):
  cfg = tiny_config(**overrides)
  vocab = data_lib.vocab_size(cfg.data)
  counts = (l3_allocation.uniform_allocation(vocab, cfg.l3.rows, cfg.l3.max_rows_per_token)
            if cfg.l3.after_layers else None)
  model = nnx.eval_shape(lambda: Transformer(cfg, vocab, nnx.Rngs(params=0),
                                             inputs={"l3": counts}))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  built = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert budget_lib.model_budget(cfg, vocab)["params"] == built


def test_looped_output_projections_start_at_the_unrolled_depth_scale():
  from moejax.model.params import residual_depth
  cfg = tiny_config(**LOOP)  # 3 unique layers, the middle one run 3 times
  vocab = data_lib.vocab_size(cfg.data)
  assert residual_depth(cfg) == budget_lib.model_budget(cfg, vocab)["effective_layers"] == 5
  model = Transformer(cfg, vocab, nnx.Rngs(params=0))
  for block in model.blocks:
    for w in (block.attn.wo[...], block.ffn.w_down[...]):
      assert float(np.std(np.asarray(w))) == pytest.approx(0.02 / math.sqrt(10), rel=0.1)


def _looped_l3_model(**overrides):
  """1 + 1 x 2 + 1 layers with L3 after layers 1 and 3, a frequency allocation
  and nonzero W_mix (so the lookups matter); -> (cfg, vocab, model)."""
  cfg = tiny_config(**{"model.num_layers": 3, "loop.prefix_layers": 1,
                       "loop.block_layers": 1, "loop.iterations": 2, **L3,
                       "l3.after_layers": (1, 3), **overrides})
  vocab = data_lib.vocab_size(cfg.data)
  counts = l3_allocation.frequency_allocation(
      np.random.default_rng(0).integers(0, vocab, 5000), vocab, cfg.l3.rows,
      cfg.l3.max_rows_per_token)
  model = Transformer(cfg, vocab, nnx.Rngs(params=0), inputs={"l3": counts})
  for i, layer in enumerate(model.l3):
    layer.w_mix[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.w_mix[...].shape)
  return cfg, vocab, model


def test_l3_layers_sit_where_after_layers_says_around_a_loop():
  """Transformer logits equal an explicit composition: block 1, L3, the looped
  block twice, block 3, L3, final norm, tied unembedding (W_mix nonzero)."""
  import jax.numpy as jnp
  cfg, vocab, model = _looped_l3_model()
  for block in model.blocks:  # make IterAdaLN matter too
    if block.attn_mod is not None:
      for mod in (block.attn_mod, block.ffn_mod):
        mod.w_mod[...] = 0.1 * jax.random.normal(jax.random.key(7), mod.w_mod[...].shape)
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, vocab)
  logits, aux = model(tokens)

  kw = dict(positions=jnp.broadcast_to(jnp.arange(16), tokens.shape),
            segment_ids=jnp.ones_like(tokens), token_ids=tokens, step=None, train=False)
  x = model.embed[...][tokens]
  x, _ = model.blocks[0](x, loop_index=None, **kw)
  x = x + model.l3[0](x, token_ids=tokens)[0]
  for k in range(2):
    x, _ = model.blocks[1](x, loop_index=jnp.int32(k), **kw)
  x, _ = model.blocks[2](x, loop_index=None, **kw)
  x = x + model.l3[1](x, token_ids=tokens)[0]
  expected = jnp.einsum("bsd,vd->bsv", model.final_norm(x), model.embed[...])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  assert "l3_entropy/after_01" in aux and "l3_entropy/after_03" in aux
  assert float(jnp.max(jnp.abs(model.l3[0](x, token_ids=tokens)[0]))) > 0


def test_l3_budget_equals_a_written_out_count():
  from configs.l3 import get_config
  cfg = get_config("lzw_tiny")
  d, e, up, rows, k = 128, 128, 128, 8192, 32
  layer_params = rows * (d + e) + e * up + (d + up) * d + d + 2 * up
  layer_active = k * (d + e) + e * up + (d + up) * d + d + 2 * up
  b = budget_lib.model_budget(cfg, 2048)
  dense = budget_lib.model_budget(get_config("dense_tiny"), 2048)
  ffn_delta = 4 * 3 * d * (344 - 384)  # the L3 arms' narrower SwiGLU, 4 layers
  assert b["params"] == dense["params"] + layer_params + ffn_delta
  assert b["active_params"] == dense["active_params"] + layer_active + ffn_delta
  assert abs(b["active_params"] / dense["active_params"] - 1) < 0.01
  flops = 2 * k * (d + e) + 2 * (e * up + (d + up) * d)
  assert b["forward_flops_per_token"] == dense["forward_flops_per_token"] + flops + 2 * ffn_delta


def test_looped_model_with_row_split_l3_on_a_mesh_equals_single_device(monkeypatch):
  """data=2 x expert=4 of the 8 fake devices: the L3 tables split by rows
  (l3_parallel), the batch over data and expert; loss and every gradient equal
  the single-device run."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moejax import sharding
  from moejax.papers.l3 import parallel as l3_parallel
  from moejax.papers.l3 import layer as l3_module
  cfg, vocab, model = _looped_l3_model(**{"mesh.data": 2, "mesh.expert": 4})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, vocab)

  def loss_fn(params, rest, tokens):
    logits, _ = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))(tokens)
    return jnp.sum(jnp.cos(logits) * logits)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  want = jax.device_get(grad_fn(params, rest, tokens))
  calls = []
  real = l3_parallel.l3_lookup_parallel
  monkeypatch.setattr(l3_module, "l3_lookup_parallel",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = cfg.sharding.rules
  with sharding.use_mesh(mesh, rules):
    p_sh = sharding.state_shardings(params, mesh, rules)
    assert p_sh["l3"][0]["keys"].get_value().spec[0] == "expert"
    got = jax.device_get(grad_fn(
        jax.device_put(params, p_sh),
        jax.device_put(rest, jax.tree.map(lambda _: sharding.replicated(mesh), rest)),
        jax.device_put(tokens, NamedSharding(mesh, P(sharding.BATCH_AXES, None)))))
  assert calls, "the row-split L3 path did not run"
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
