"""The product-key top-k kernel (pallas_kernels/product_topk.py) against a numpy full sort.

Interpret mode on CPU, both bodies (the Triton and the Mosaic one are the same
code under different compiler parameters):
  * scores and ids == a float64 sort of all n^2 cells and == product_topk,
    gradients == "each selected cell sends its cotangent to a[row] and b[col]",
    for k < n, k = n, k > n, k = N, k = 1, n not a power of two, and T not a
    multiple of the token tile;
  * ties (integer scores) and -inf scores: the same ids as product_topk (first
    position wins, documented order), distinct ids;
  * bfloat16 inputs; bad arguments refused;
  * --config.atomic.router=pallas selects it (PEER routing == the product router).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.model import sublayers
from moejax.papers.omnimoe.product_router import GRID_TOPK, product_topk
from pallas_kernels.product_topk import product_topk_pallas
from tests import atomic_reference as ref
from tests.helpers import tiny_config

TILE = 4  # tokens per program


def _ab(seed, num_tokens, n):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_tokens, n)).astype(np.float32),
          rng.normal(size=(num_tokens, n)).astype(np.float32))


def _topk(a, b, k, variant):
  return product_topk_pallas(jnp.asarray(a), jnp.asarray(b), k, variant=variant, interpret=True,
                             block_tokens=TILE)


# (T, n, k): T = 13 and 7 are not multiples of the tile; n = 5, 3, 6 are not powers of two.
CASES = [(13, 8, 3), (8, 4, 4), (6, 4, 8), (7, 5, 1), (5, 3, 9), (9, 6, 20)]
# The Mosaic parameters run the same body: one case by default, one more under -m slow.
PARAMS = [pytest.param(*case, "gpu", id=f"T{case[0]}_n{case[1]}_k{case[2]}-gpu")
          for case in CASES] + [
    pytest.param(13, 8, 3, "tpu", id="T13_n8_k3-tpu"),
    pytest.param(9, 6, 20, "tpu", id="T9_n6_k20-tpu", marks=pytest.mark.slow)]


@pytest.mark.parametrize("num_tokens, n, k, variant", PARAMS)
def test_equals_full_sort_and_product_topk_values_and_grads(num_tokens, n, k, variant):
  a, b = _ab(num_tokens * 100 + n * 10 + k, num_tokens, n)
  want_scores, want_ids, margin = ref.grid_topk_ref(a, b, k)
  assert margin.min() > 1e-5  # the float64 selection is unambiguous in float32
  w = np.random.default_rng(k).normal(size=(num_tokens, k)).astype(np.float32)

  def loss(a, b):
    scores, ids = product_topk_pallas(a, b, k, variant=variant, interpret=True,
                                      block_tokens=TILE)
    return jnp.sum(scores * w), (scores, ids)

  (_, (scores, ids)), (da, db) = jax.device_get(jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(jnp.asarray(a), jnp.asarray(b)))
  assert scores.shape == ids.shape == (num_tokens, k) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
  ref_scores, ref_ids = jax.device_get(product_topk(jnp.asarray(a), jnp.asarray(b), k))
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores)
  want_da, want_db = ref.grid_topk_grads_ref(want_ids, n, w)
  np.testing.assert_allclose(da, want_da, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(db, want_db, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["ties", "neg_inf"])
def test_ties_and_neg_inf_follow_product_topk(kind):
  # Integer scores tie a lot; -inf cells tie with each other (and must still be
  # picked once each when k exceeds the finite cells).
  rng = np.random.default_rng(5)
  n, k = 4, 6
  a = rng.integers(0, 3, size=(11, n)).astype(np.float32)
  b = rng.integers(0, 3, size=(11, n)).astype(np.float32)
  if kind == "neg_inf":
    a[:, 1:] = -np.inf       # row 0 is the only finite row
    b[3, :2] = -np.inf
  scores, ids = jax.device_get(_topk(a, b, k, "gpu"))
  ref_scores, ref_ids = jax.device_get(product_topk(jnp.asarray(a), jnp.asarray(b), k))
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores)
  with np.errstate(invalid="ignore"):   # its margin is -inf - -inf here
    want_scores, _, _ = ref.grid_topk_ref(a, b, k)
  np.testing.assert_array_equal(scores, want_scores)
  tok = np.arange(11)[:, None]
  np.testing.assert_array_equal(a[tok, ids // n] + b[tok, ids % n], scores)
  assert all(len(set(row)) == k for row in ids.tolist())


def test_bfloat16_inputs():
  a, b = _ab(3, 10, 8)
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  scores, ids = jax.device_get(product_topk_pallas(a16, b16, 5, variant="gpu", interpret=True,
                                                   block_tokens=TILE))
  assert scores.dtype == jnp.bfloat16
  want_scores, want_ids, margin = ref.grid_topk_ref(np.asarray(a16, np.float32),
                                                    np.asarray(b16, np.float32), 5)
  clear = margin > 0.05   # tokens whose selection does not hinge on a near-tie
  assert clear.sum() >= 5
  np.testing.assert_array_equal(ids[clear], want_ids[clear])
  np.testing.assert_allclose(np.asarray(scores, np.float32), want_scores, rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_refused():
  a = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"k=10 must lie in \[1, n \* n = 9\]"):
    product_topk_pallas(a, a, 10)
  with pytest.raises(ValueError, match="one shape and dtype"):
    product_topk_pallas(a, jnp.zeros((4, 4)), 2)


def test_router_config_selects_the_kernel():
  cfgs = {router: tiny_config(**{"model.sublayer": "peer", "model.d_model": 16,
                                 "atomic.num_experts": 36, "atomic.top_k": 4,
                                 "atomic.peer_heads": 2, "atomic.peer_query_dim": 8,
                                 "atomic.router": router})
          for router in ("product", "pallas")}
  config_lib.validate(cfgs["pallas"], num_devices=1, check_data=False)
  calls = []
  real = GRID_TOPK["pallas"]
  GRID_TOPK["pallas"] = lambda *args: calls.append(1) or real(*args)
  try:
    tokens = jax.random.normal(jax.random.PRNGKey(1), (10, 16), jnp.float32)
    route = nnx.jit(lambda layer, tokens: layer.route(tokens, train=True))
    got = {r: jax.device_get(route(sublayers.build(c, 0, nnx.Rngs(params=0)), tokens))
           for r, c in cfgs.items()}
  finally:
    GRID_TOPK["pallas"] = real
  assert calls
  np.testing.assert_array_equal(got["pallas"][1], got["product"][1])
  np.testing.assert_allclose(got["pallas"][0], got["product"][0], rtol=1e-6, atol=1e-7)
