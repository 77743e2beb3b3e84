"""Every Pallas kernel, compiled for this device, against its XLA reference.

Run by benchmarks/device_check.py (its `kernels` part). On a GPU or TPU the
kernels compile for the device; on CPU they run in Pallas interpret mode, which
is how the dry run checks this file itself. Each check yields one line: the
kernel, the dtype, the largest error relative to the reference's largest value,
the tolerance and whether it holds. Inputs are random, with ragged groups that
include empty ones and rows past the last group.

Tolerances are relative to max |reference|: float32 2e-3 (XLA may use TF32
for float32 matmuls on a GPU), bfloat16 4e-2 (bf16 has an 8-bit mantissa).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {"float32": 2e-3, "bfloat16": 4e-2}


def _sizes(small: bool) -> dict:
  if small:  # CPU interpret mode: seconds, not minutes
    return dict(rows=64, k=32, n=32, groups=4, tokens=32, d=32, f=32, experts=4,
                top_k=2, atoms=64, pk_n=8, l3_vocab=12, l3_rows=8)
  return dict(rows=4096, k=512, n=1024, groups=16, tokens=2048, d=512, f=256, experts=16,
              top_k=4, atoms=16384, pk_n=128, l3_vocab=512, l3_rows=32)


def _ragged(rng, rows: int, groups: int) -> np.ndarray:
  """Group sizes summing to under `rows`, two of them empty."""
  sizes = rng.multinomial(rows - rows // 8, np.ones(groups) / groups)
  sizes[1] += sizes[0]
  sizes[0] = 0
  sizes[-2] += sizes[-1]
  sizes[-1] = 0
  return sizes.astype(np.int32)


def _error(got, want) -> float:
  got, want = (np.asarray(jax.device_get(a), np.float64) for a in (got, want))
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _lines(name, dtype, pairs, seconds):
  tol = TOLERANCE[dtype]
  out = []
  for part, (got, want) in pairs.items():
    err = _error(got, want)
    out.append(dict(kernel=f"{name}:{part}", dtype=dtype, rel_error=err, tolerance=tol,
                    ok=bool(err <= tol), seconds=round(seconds, 3)))
  return out


def grouped_matmul(s, dtype, variant=None):
  from pallas_kernels.grouped_matmul import grouped_matmul as gmm
  from pallas_kernels.grouped_matmul_reference import gmm_reference
  rng = np.random.default_rng(0)
  sizes = jnp.asarray(_ragged(rng, s["rows"], s["groups"]))
  lhs = jnp.asarray(rng.normal(size=(s["rows"], s["k"])), dtype)
  rhs = jnp.asarray(rng.normal(size=(s["groups"], s["k"], s["n"])) / np.sqrt(s["k"]), dtype)

  def loss(op):
    return lambda a, b: jnp.sum(op(a, b).astype(jnp.float32) ** 2)

  ours = lambda a, b: gmm(a, b, sizes, variant=variant, preferred_element_type=jnp.float32)
  ref = lambda a, b: gmm_reference(a, b, sizes, preferred_element_type=jnp.float32)
  t0 = time.perf_counter()
  y = jax.jit(ours)(lhs, rhs)
  dl, dw = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(lhs, rhs)
  jax.block_until_ready((y, dl, dw))
  seconds = time.perf_counter() - t0
  rl, rw = jax.grad(loss(ref), argnums=(0, 1))(lhs, rhs)
  name = "grouped_matmul" + (f"[{variant}]" if variant else "")
  return _lines(name, dtype, {"forward": (y, ref(lhs, rhs)), "dlhs": (dl, rl),
                              "dW": (dw, rw)}, seconds)


def moe_ffn(s, dtype, fused=None):
  from pallas_kernels.moe_ffn import moe_ffn as ffn
  rng = np.random.default_rng(1)
  t, d, f, e, k = s["tokens"], s["d"], s["f"], s["experts"], s["top_k"]
  x = jnp.asarray(rng.normal(size=(t, d)), dtype)
  idx = rng.integers(0, e, size=(t, k)).astype(np.int32)
  idx[: t // 8, -1] = e  # some slots route nowhere (dropped)
  idx[:, 0] = np.where(np.arange(t) % 5 == 0, e - 1, idx[:, 0])  # skewed load
  w = jnp.asarray(rng.dirichlet(np.ones(k), size=t), jnp.float32)
  wg, wu = (jnp.asarray(rng.normal(size=(e, d, f)) / np.sqrt(d), dtype) for _ in range(2))
  wd = jnp.asarray(rng.normal(size=(e, f, d)) / np.sqrt(f), dtype)
  idx = jnp.asarray(idx)

  def reference(x, wg, wu, wd):
    """y_t = sum_j w_tj SwiGLU_{e_tj}(x_t), dense over experts (one-hot)."""
    onehot = jax.nn.one_hot(idx, e, dtype=jnp.float32) * w[..., None]  # [T, k, E]
    gate = jnp.einsum("td,edf->tef", x.astype(jnp.float32), wg.astype(jnp.float32))
    up = jnp.einsum("td,edf->tef", x.astype(jnp.float32), wu.astype(jnp.float32))
    out = jnp.einsum("tef,efd->ted", jax.nn.silu(gate) * up, wd.astype(jnp.float32))
    return jnp.einsum("tke,ted->td", onehot, out)

  ours = lambda *a: ffn(a[0], idx, w, *a[1:], fused=fused).astype(jnp.float32)
  loss = lambda op: (lambda *a: jnp.sum(op(*a) ** 2))
  t0 = time.perf_counter()
  y = jax.jit(ours)(x, wg, wu, wd)
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
  jax.block_until_ready((y, grads))
  seconds = time.perf_counter() - t0
  ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  name = "moe_ffn" + ("" if fused is None else f"[fused={fused}]")
  pairs = {"forward": (y, reference(x, wg, wu, wd))}
  pairs.update({f"d{n}": (g, r) for n, g, r in zip(("x", "w_gate", "w_up", "w_down"),
                                                    grads, ref_grads)})
  return _lines(name, dtype, pairs, seconds)


def atomic_experts(s, dtype):
  from pallas_kernels.atomic_experts import atomic_pallas
  from pallas_kernels.atomic_experts_reference import atomic_gather
  rng = np.random.default_rng(2)
  t, d, n, k = s["tokens"], s["d"], s["atoms"], 4 * s["top_k"]
  x = jnp.asarray(rng.normal(size=(t, d)), dtype)
  idx = rng.integers(0, n, size=(t, k)).astype(np.int32)
  idx[:, -1] = np.where(np.arange(t) % 3 == 0, n, idx[:, -1])  # ids >= N add nothing
  idx = jnp.asarray(idx)
  gates = jnp.asarray(rng.uniform(size=(t, k)), dtype)
  up, down = (jnp.asarray(rng.normal(size=(n, d)) / np.sqrt(d), dtype) for _ in range(2))
  ours = lambda x, u, v: atomic_pallas(x, idx, gates, u, v, out_dtype=jnp.float32)
  ref = lambda x, u, v: atomic_gather(x, idx, gates, u, v, out_dtype=jnp.float32)
  loss = lambda op: (lambda *a: jnp.sum(op(*a) ** 2))
  t0 = time.perf_counter()
  y = jax.jit(ours)(x, up, down)
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, up, down)
  jax.block_until_ready((y, grads))
  seconds = time.perf_counter() - t0
  ref_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(x, up, down)
  pairs = {"forward": (y, ref(x, up, down))}
  pairs.update({f"d{n_}": (g, r) for n_, g, r in zip(("x", "up", "down"), grads, ref_grads)})
  return _lines("atomic_experts", dtype, pairs, seconds)


def product_topk(s, dtype):
  from moejax.papers.omnimoe.product_router import product_topk as reference
  from pallas_kernels.product_topk import product_topk_pallas
  rng = np.random.default_rng(3)
  t, n, k = s["tokens"], s["pk_n"], 4 * s["top_k"]
  a, b = (jnp.asarray(rng.normal(size=(t, n)), dtype) for _ in range(2))
  t0 = time.perf_counter()
  scores, ids = jax.block_until_ready(jax.jit(lambda a, b: product_topk_pallas(a, b, k))(a, b))
  seconds = time.perf_counter() - t0
  ref_scores, ref_ids = reference(a, b, k)
  lines = _lines("product_topk", dtype, {"scores": (scores, ref_scores)}, seconds)
  # Ties may order ids differently; the chosen scores must agree and each id
  # must hold the score it claims.
  full = (a.astype(jnp.float32)[:, :, None] + b.astype(jnp.float32)[:, None, :]).reshape(t, -1)
  claimed = jnp.take_along_axis(full, ids, axis=1)
  lines += _lines("product_topk", dtype, {"ids_hold_their_scores": (claimed, scores)}, 0.0)
  del ref_ids
  return lines


def l3_lookup(s, dtype):
  from moejax.papers.l3 import lookup as reference
  from pallas_kernels import l3_lookup as kernel
  rng = np.random.default_rng(4)
  vocab, t, d, e = s["l3_vocab"], s["tokens"], s["d"] // 2, s["d"] // 2
  max_rows = s["l3_rows"]
  counts = rng.integers(0, max_rows + 1, size=vocab).astype(np.int32)
  counts[0] = 0  # a token with no rows
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  rows = int(counts.sum())
  h = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, vocab, size=t).astype(np.int32))
  keys = jnp.asarray(0.5 * rng.normal(size=(rows, d)), dtype)
  values = jnp.asarray(rng.normal(size=(rows, e)), dtype)
  args = (h, ids, keys, values, jnp.asarray(offsets), jnp.asarray(counts))
  t0 = time.perf_counter()
  got = jax.block_until_ready(jax.jit(
      lambda *a: kernel.lookup_partials(*a, max_rows=max_rows))(*args))
  seconds = time.perf_counter() - t0
  want = reference.lookup_partials(*args, max_rows=max_rows, path="padded")
  names = ("m", "s", "u", "numer")
  return _lines("l3_lookup", dtype, {n: (g, w) for n, g, w in zip(names, got, want)},
                seconds)


def checks(platform: str, device_kind: str):
  """(name, function) for this platform: TPU has no L3 or fused-FFN body; the
  Mosaic-GPU grouped matmul needs a Hopper GPU."""
  out = [("grouped_matmul", grouped_matmul), ("moe_ffn", moe_ffn),
         ("atomic_experts", atomic_experts), ("product_topk", product_topk)]
  if platform == "gpu":
    out.insert(1, ("moe_ffn[unfused]", lambda s, dt: moe_ffn(s, dt, fused=False)))
    if any(h in device_kind for h in ("H100", "H200", "H800", "GH200")):
      out.insert(1, ("grouped_matmul[mgpu]",
                     lambda s, dt: grouped_matmul(s, dt, variant="mgpu")))
  if platform != "tpu":
    out.append(("l3_lookup", l3_lookup))
  return out


def run(small: bool, say=print):
  """Yields one line per checked output; a check that raises yields its error."""
  device = jax.devices()[0]
  sizes = _sizes(small)
  for name, fn in checks(device.platform, device.device_kind):
    for dtype in ("float32", "bfloat16"):
      if name == "grouped_matmul[mgpu]" and dtype == "float32":
        continue  # the Hopper kernels take bf16 operands
      try:
        lines = fn(sizes, dtype)
      except Exception as e:  # pylint: disable=broad-except  # reported, not fatal
        lines = [dict(kernel=name, dtype=dtype, ok=False,
                      error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")]
      for line in lines:
        say(f"{line['kernel']:<36s} {dtype:<8s} "
            + (f"rel err {line['rel_error']:.2e} (tol {line['tolerance']:.0e}) "
               f"{'ok' if line['ok'] else 'FAILED'}" if "rel_error" in line
               else f"FAILED {line['error']}"))
        yield line
