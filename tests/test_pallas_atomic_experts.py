"""The atomic-expert kernel (pallas_kernels/atomic_experts.py) against float64 loops.

Interpret mode on CPU (the Triton body, traced as JAX ops):
  * values and gradients (x, gates, U, V) == atomic_reference's per-pair loops
    and hand-written backward, on ragged sorted runs: one expert holding every
    pair (a run across several tiles), experts with no pairs, "no expert" ids
    >= N (and a token with none), all pairs "no expert", k = 1, an expert twice
    in one token, a tile boundary inside runs; SiLU and (tanh) GELU;
  * d not a power of two (padded) and one that is; bfloat16 tokens and tables,
    and float32 output from bfloat16 tokens (as expert parallelism asks);
  * the "tpu" variant is the XLA expert-sorted path; bad arguments are refused;
  * an OmniMoE layer with --config.atomic.path=pallas and router=pallas equals
    the gather path with the product router, output and every gradient, and the
    config accepts both names.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.model import sublayers
from moejax.papers.omnimoe import atomic_experts
from pallas_kernels.atomic_experts import atomic_pallas
from tests import atomic_reference as ref
from tests.helpers import tiny_config
from tests.sharded_layer import loss_and_grads

BLOCK = 4  # sorted pairs per program: small, so runs cross tiles


def _inputs(name, d, seed_text):
  rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
  num_tokens, num_experts, idx = ref.ragged_ids(name, rng)
  k = idx.shape[1]
  return dict(
      idx=idx,
      x=rng.normal(size=(num_tokens, d)).astype(np.float32),
      gates=rng.uniform(0.1, 1.0, size=(num_tokens, k)).astype(np.float32),
      up=(0.5 * rng.normal(size=(num_experts, d))).astype(np.float32),
      down=rng.normal(size=(num_experts, d)).astype(np.float32),
      dy=rng.normal(size=(num_tokens, d)).astype(np.float32))


def _run(inp, activation, dtype=jnp.float32, table_dtype=jnp.float32, out_dtype=None):
  """(y, (dx, dgates, dup, ddown)) of sum(y * dy) through the kernel, as float32 numpy."""
  idx = jnp.asarray(inp["idx"], jnp.int32)
  dy = jnp.asarray(inp["dy"])

  def loss(x, gates, up, down):
    y = atomic_pallas(x, idx, gates, up, down, activation=activation, out_dtype=out_dtype,
                      variant="gpu", interpret=True, block_pairs=BLOCK)
    return jnp.sum(y.astype(jnp.float32) * dy), y

  args = (jnp.asarray(inp["x"], dtype), jnp.asarray(inp["gates"]),
          jnp.asarray(inp["up"], table_dtype), jnp.asarray(inp["down"], table_dtype))
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
  for g, a in zip(grads, args):
    assert g.dtype == a.dtype and g.shape == a.shape
  return y, jax.device_get([g.astype(jnp.float32) for g in grads])


def _check(inp, activation, y, grads, rtol, atol, rounded=lambda a: a):
  """Compare with the float64 loops, run on the inputs as the kernel saw them."""
  x, up, down = rounded(inp["x"]), rounded(inp["up"]), rounded(inp["down"])
  want_y = ref.atomic_ref(x, inp["idx"], inp["gates"], up, down, activation)
  np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=rtol, atol=atol)
  want = ref.atomic_grads_ref(x, inp["idx"], inp["gates"], up, down, inp["dy"], activation)
  for name, got, w in zip(("x", "gates", "up", "down"), grads, want):
    np.testing.assert_allclose(got, w, rtol=rtol, atol=atol, err_msg=name)


CASES = [("random", "silu", 12), ("one_expert", "silu", 12), ("sparse", "gelu", 16),
         ("no_expert", "silu", 12), ("all_none", "silu", 8), ("k1", "gelu", 12),
         ("dup_in_token", "silu", 12)]


@pytest.mark.parametrize("name, activation, d", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_loops_values_and_grads(name, activation, d):
  inp = _inputs(name, d, f"{name}/{activation}")
  y, grads = _run(inp, activation)
  assert y.dtype == jnp.float32 and y.shape == inp["x"].shape
  _check(inp, activation, y, grads, rtol=1e-5, atol=1e-5)
  if name == "all_none":
    assert not np.asarray(y).any() and not np.abs(grads[0]).any()
  if name == "sparse":   # experts nobody chose get exactly zero table gradients
    unused = np.setdiff1d(np.arange(16), inp["idx"])
    assert not grads[2][unused].any() and not grads[3][unused].any()


@pytest.mark.parametrize("activation", ["silu", pytest.param("gelu", marks=pytest.mark.slow)])
def test_bfloat16_tokens_and_tables(activation):
  inp = _inputs("random", 16, f"bf16/{activation}")
  y, grads = _run(inp, activation, jnp.bfloat16, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16

  def rounded(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))

  _check(inp, activation, y, grads, rtol=2e-2, atol=2e-2, rounded=rounded)


def test_bfloat16_tokens_float32_output_and_tables():
  # Expert parallelism: bfloat16 tokens, float32 tables, float32 output (summed
  # across shards); the tables are used at the tokens' precision.
  inp = _inputs("no_expert", 12, "bf16-out32")
  y, grads = _run(inp, "silu", jnp.bfloat16, jnp.float32, out_dtype=jnp.float32)
  assert y.dtype == jnp.float32

  def rounded(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))

  _check(inp, "silu", y, grads, rtol=2e-2, atol=2e-2, rounded=rounded)


@pytest.mark.slow
@pytest.mark.parametrize("block", [1, 8, 64])
def test_tile_sizes_agree(block):
  inp = _inputs("random", 12, "tiles")
  args = [jnp.asarray(inp[k]) for k in ("x", "idx", "gates", "up", "down")]
  y = atomic_pallas(*args, variant="gpu", interpret=True, block_pairs=block)
  want = ref.atomic_ref(inp["x"], inp["idx"], inp["gates"], inp["up"], inp["down"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_tpu_variant_is_the_expert_sorted_path():
  inp = _inputs("no_expert", 12, "tpu")
  args = [jnp.asarray(inp[k]) for k in ("x", "idx", "gates", "up", "down")]
  got = atomic_pallas(*args, variant="tpu")
  np.testing.assert_array_equal(got, atomic_experts.atomic_expert_sorted(*args))


def test_bad_arguments_are_refused():
  x, idx, g, t = jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2)), jnp.zeros(
      (6, 8))
  with pytest.raises(ValueError, match="Unknown activation 'relu'"):
    atomic_pallas(x, idx, g, t, t, activation="relu")
  with pytest.raises(ValueError, match=r"Expected x \[T, d\]"):
    atomic_pallas(x, idx, g, t, jnp.zeros((6, 4)))


# --------------------------------------------------------------------------- #
# The layer and the config
# --------------------------------------------------------------------------- #

def _omnimoe_loss_and_grads(path, router, x):
  """(y, parameter gradients, x gradient) of sum(y * P) for a fixed projection P."""
  cfg = tiny_config(**{"model.sublayer": "omnimoe", "model.d_model": 16,
                       "atomic.num_experts": 16, "atomic.top_k": 6,
                       "atomic.shared_ffn_dim": 8, "atomic.expert_init_std": 1.0,
                       "atomic.path": path, "atomic.router": router})
  config_lib.validate(cfg, num_devices=1, check_data=False)
  layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
  _, y, _, _, grads, dx = loss_and_grads(cfg, layer, x)
  return y, grads, dx


def test_omnimoe_with_pallas_path_and_router_equals_gather():
  # k = 6 > sqrt(N) = 4: the router's candidate set is the whole grid.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16), jnp.float32)
  y_ref, gp_ref, gx_ref = _omnimoe_loss_and_grads("gather", "product", x)
  y, gp, gx = _omnimoe_loss_and_grads("pallas", "pallas", x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-6)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(gp_ref))
  flat = jax.tree_util.tree_leaves_with_path(gp)
  assert len(flat) == len(flat_ref) > 4
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    assert np.abs(flat_ref[path]).max() > 0, name
    np.testing.assert_allclose(g, flat_ref[path], rtol=1e-4, atol=1e-6, err_msg=name)


def test_pallas_path_is_registered():
  assert atomic_experts.PATHS["pallas"] is atomic_experts.atomic_pallas
  cfg = tiny_config(**{"model.sublayer": "peer", "atomic.path": "pallas"})
  config_lib.validate(cfg, num_devices=1, check_data=False)
