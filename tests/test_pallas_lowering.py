"""Every compiled (non-interpret) kernel path lowers for its accelerator, here on CPU.

No GPU or TPU is needed to run Pallas' lowering rules: tracing with
lowering_platforms=("cuda",) turns each Triton-dialect kernel into Triton IR
(and a Mosaic-GPU kernel into its MLIR) inside the HLO, and ("tpu",) turns a
Mosaic kernel into Mosaic MLIR. This catches constructs that only interpret
mode accepts (it did: integer division in a TPU index map). It does not run
the final compile (Triton to PTX, Mosaic's layout passes), nor anything at run
time: that needs the device. Forward and backward are lowered together.
The grouped matmul and the fused permute kernels have their own lowering
tests in test_pallas_grouped_matmul.py and test_pallas_moe_ffn.py.
"""

import jax
import jax.numpy as jnp
import pytest

TRITON = "__gpu$xla.gpu.triton"


def _lowered(fn, *args, platform="cuda"):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _spec(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_fused_moe_ffn_forward_and_backward_lower_to_triton():
  from pallas_kernels.moe_ffn import moe_ffn

  def loss(x, cw, wg, wu, wd, idx):
    y = moe_ffn(x, idx, cw, wg, wu, wd, variant="gpu", fused=True, interpret=False)
    return jnp.sum(y.astype(jnp.float32))

  text = _lowered(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), _spec((48, 64)),
                  _spec((48, 2), jnp.float32), _spec((8, 64, 32)), _spec((8, 64, 32)),
                  _spec((8, 32, 64)), _spec((48, 2), jnp.int32))
  assert text.count(TRITON) >= 5


def test_atomic_expert_kernel_lowers_to_triton():
  from pallas_kernels.atomic_experts import atomic_pallas

  def loss(x, gates, up, down, idx):
    y = atomic_pallas(x, idx, gates, up, down, variant="gpu", interpret=False)
    return jnp.sum(y.astype(jnp.float32))

  text = _lowered(jax.grad(loss, argnums=(0, 1, 2, 3)), _spec((40, 32)),
                  _spec((40, 4), jnp.float32), _spec((64, 32)), _spec((64, 32)),
                  _spec((40, 4), jnp.int32))
  assert text.count(TRITON) >= 2


@pytest.mark.parametrize("variant,platform,marker", [
    ("gpu", "cuda", TRITON), ("tpu", "tpu", "tpu_custom_call")])
def test_product_key_topk_lowers(variant, platform, marker):
  from pallas_kernels.product_topk import product_topk_pallas

  def loss(a, b):
    scores, ids = product_topk_pallas(a, b, 8, variant=variant, interpret=False)
    return jnp.sum(scores) + 0.0 * jnp.sum(ids)

  text = _lowered(jax.grad(loss, argnums=(0, 1)), _spec((64, 16), jnp.float32),
                  _spec((64, 16), jnp.float32), platform=platform)
  assert marker in text


def test_l3_lookup_kernel_lowers_to_triton():
  from pallas_kernels.l3_lookup import lookup_partials

  def loss(h, keys, values, ids, offsets, counts):
    m, s, u, numer = lookup_partials(h, ids, keys, values, offsets, counts, max_rows=8,
                                     variant="gpu", interpret=False)
    del m
    return jnp.sum(s) + jnp.sum(u) + jnp.sum(numer)

  text = _lowered(jax.grad(loss, argnums=(0, 1, 2)), _spec((32, 64), jnp.float32),
                  _spec((512, 64), jnp.float32), _spec((512, 64), jnp.float32),
                  _spec((32,), jnp.int32), _spec((128,), jnp.int32), _spec((128,), jnp.int32))
  assert text.count(TRITON) >= 2


def test_mosaic_gpu_grouped_matmul_forward_and_input_gradient_lower():
  """JAX's Hopper kernels under our VJP (variant mgpu). Its weight-gradient kernel reads
  the GPU's SM count while tracing, so only a GPU can lower the full backward."""
  from pallas_kernels.grouped_matmul import grouped_matmul
  from pallas_kernels.grouped_matmul_mgpu import gmm_mgpu

  sizes = jnp.array([40, 0, 100, 60], jnp.int32)
  fwd = _lowered(lambda x, w: grouped_matmul(x, w, sizes, variant="mgpu"),
                 _spec((256, 128)), _spec((4, 128, 256)))
  dlhs = _lowered(lambda dy, w: gmm_mgpu(dy, w, sizes, transpose_rhs=True),
                  _spec((256, 256)), _spec((4, 128, 256)))
  for text in (fwd, dlhs):
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("device,compiled", [("cpu", ()), ("gpu", ("gpu",)), ("tpu", ("tpu",))])
def test_a_variant_compiles_only_on_its_own_platform(monkeypatch, device, compiled):
  """Elsewhere it runs in interpret mode (a Triton body on a TPU, say)."""
  from pallas_kernels import platform
  monkeypatch.setattr(platform, "default_platform", lambda: device)
  for variant in platform.VARIANTS:
    assert platform.resolve(variant, None) == (variant, variant not in compiled)
  assert platform.resolve(None, None)[0] == ("tpu" if device == "tpu" else "gpu")
