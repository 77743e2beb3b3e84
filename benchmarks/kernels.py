"""Grouped matmul and MoE layer speed: our Pallas kernels against their baselines.

Everything is timed in one process on one device, interleaved (median of
--repeats rounds), on random normal inputs, so a shared machine slows all rows
alike and the ratios hold. Two tables:

1. Grouped matmul, forward and forward+backward (dlhs and dW), for each shape
   and rows-per-expert, in TFLOP/s with FLOPs = 2 * rows * K * N per matmul
   (x3 for forward+backward). Rows per expert are drawn multinomially around
   the target, so groups are ragged as in training. Baselines:
     dense       one [rows, K] x [K, N] matmul of the same FLOPs (the ceiling:
                 every row in one group)
     ragged_dot  jax.lax.ragged_dot (XLA), differentiated by autodiff
     tokamax     tokamax.ragged_dot, if the package is importable
     ours:<v>    pallas_kernels.grouped_matmul with kernel variant v
                 (gpu = Triton-dialect, mgpu = JAX's Mosaic-GPU kernels under
                 our VJP, tpu = Mosaic TPU)
2. The whole MoE layer (router, permute, three matmuls, unpermute, combine)
   forward+backward per dispatch backend against a dense SwiGLU of equal
   active FLOPs (width k * f), tokens = experts * rows_per_expert / k.

Shapes (expert count E, d, expert width f, top-k):
    mixtral   8 x (4096 -> 14336), top-2
    deepseek  256 x (7168 -> 2048), top-8 (DeepSeek-V3-like; no shared expert)
    small     64 x (1024 -> 512), top-8 (a small research model)
Goals (GPU): grouped matmul >= 80% of dense at >= 512 rows/expert
and >= 70% at 128-256; >= 3x ragged_dot; >= tokamax; layer >= 75% of dense.

  python benchmarks/kernels.py --out=benchmarks/results/kernels_h100.md      # on a GPU
  python benchmarks/kernels.py --quick                                        # CPU smoke run

On CPU the kernels run in Pallas interpret mode (an emulation), so --quick only
checks that every row runs and agrees with the reference; its times mean nothing.
"""

import functools
import os
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

SHAPES = {  # name: (experts, d_model, expert width, top_k)
    "mixtral": (8, 4096, 14336, 2),
    "deepseek": (256, 7168, 2048, 8),
    "small": (64, 1024, 512, 8),
}
QUICK_SHAPES = {"quick": (4, 64, 96, 2)}

flags.DEFINE_list("shapes", list(SHAPES), f"Shapes among {sorted(SHAPES)}.")
flags.DEFINE_list("rows_per_expert", ["128", "512", "2048"], "Mean rows per expert.")
flags.DEFINE_list("variants", [], "Kernel variants of ours; default: gpu,mgpu on GPU, tpu on "
                  "TPU, gpu elsewhere.")
flags.DEFINE_list("backends", ["pallas", "ragged_dot", "sorted"], "Layer table backends.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Operand dtype.")
flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (median).")
flags.DEFINE_integer("inner", 3, "Calls per timed round (their mean).")
flags.DEFINE_integer("max_rows", 1 << 19, "Skip cases with more rows than this.")
flags.DEFINE_bool("layer", True, "Also time the whole MoE layer.")
flags.DEFINE_bool("quick", False, "Tiny shapes, 2 repeats: a smoke run (CPU: interpret mode).")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def _group_sizes(key, experts, rows):
  import jax
  import jax.numpy as jnp
  choice = jax.random.randint(key, (rows,), 0, experts)
  return jnp.bincount(choice, length=experts).astype(jnp.int32)


def _matmul_fns(variant_names):
  """name -> f(lhs, rhs, sizes) (forward) for the grouped matmul table."""
  import jax
  import jax.numpy as jnp

  fns = {"ragged_dot": lambda lhs, rhs, sizes: jax.lax.ragged_dot(
      lhs, rhs, sizes, preferred_element_type=lhs.dtype)}
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
    fns["tokamax"] = lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, sizes)
  except ImportError:
    pass
  from pallas_kernels.grouped_matmul import grouped_matmul  # pylint: disable=import-outside-toplevel
  for v in variant_names:
    fns[f"ours:{v}"] = functools.partial(_ours, grouped_matmul, v)
  del jnp
  return fns


def _ours(grouped_matmul, variant, lhs, rhs, sizes):
  return grouped_matmul(lhs, rhs, sizes, variant=variant)


def _timed(fn, args, repeats_store, key):
  import jax
  t0 = time.perf_counter()
  for _ in range(FLAGS.inner):
    out = fn(*args)
  jax.block_until_ready(out)
  repeats_store.setdefault(key, []).append((time.perf_counter() - t0) / FLAGS.inner)


def _fwd_bwd(fn):
  """(out, dlhs, drhs) for a given cotangent: the forward is returned, so it is
  computed (a bare jax.grad would let XLA drop it), and the cotangent is random
  data read from memory, as in training (all-ones could be folded into a dot)."""
  import jax

  def step(lhs, rhs, sizes, dout):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return (out, *vjp(dout.astype(out.dtype)))
  return jax.jit(step)


def _mismatches(tag, results, reference):
  """Our (out, dlhs, drhs) against ragged_dot's, relative to each one's largest entry."""
  import jax.numpy as jnp
  if reference is None:
    return [f"{tag}: unchecked (ragged_dot, the reference, did not run)"]
  found = []
  for part, got, want in zip(("out", "dlhs", "drhs"), results, reference):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    err = float(jnp.max(jnp.abs(got - want)))
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    if err > 2e-2 * scale:
      found.append(f"{tag}: {part} max error {err:.3g} vs ragged_dot (scale {scale:.3g})")
      print("WRONG", found[-1], flush=True)
  return found


def matmul_table(shapes, rows_list, variants):
  import jax
  import jax.numpy as jnp
  import numpy as np

  dt = jnp.dtype(FLAGS.dtype)
  fns = _matmul_fns(variants)
  rows_out, errors = [], []
  for name, (experts, d, f, _) in shapes.items():
    for per_expert in rows_list:
      rows = experts * per_expert
      if rows > FLAGS.max_rows:
        print(f"skip {name} rows/expert={per_expert}: {rows} rows > --max_rows")
        continue
      for proj, (k_dim, n_dim) in (("up", (d, f)), ("down", (f, d))):
        keys = jax.random.split(jax.random.PRNGKey(rows + k_dim), 3)
        lhs = jax.random.normal(keys[0], (rows, k_dim), dt)
        rhs = jax.random.normal(keys[1], (experts, k_dim, n_dim), dt)
        sizes = _group_sizes(keys[2], experts, rows)
        dout = jax.random.normal(keys[2], (rows, n_dim), dt)
        dense = lambda a, b, s: a @ b
        cases = {"dense": (jax.jit(dense), _fwd_bwd(dense), (lhs, rhs[0], sizes))}
        for fname, fn in fns.items():
          cases[fname] = (jax.jit(fn), _fwd_bwd(fn), (lhs, rhs, sizes))
        reference = None
        times, usable = {}, []
        for cname, (fwd, fwdbwd, args) in cases.items():
          tag = f"{name}/{per_expert}/{proj}/{cname}"
          try:
            jax.block_until_ready(fwd(*args))
            results = jax.block_until_ready(fwdbwd(*args, dout))
          except Exception as e:  # pylint: disable=broad-except
            errors.append(f"{tag}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print("FAILED", errors[-1], flush=True)
            continue
          if cname == "ragged_dot":
            reference = results
          elif cname != "dense":
            errors.extend(_mismatches(tag, results, reference))
          usable.append(cname)
        for _ in range(FLAGS.repeats):
          for cname in list(usable):
            fwd, fwdbwd, args = cases[cname]
            try:
              _timed(fwd, args, times, (cname, "fwd"))
              _timed(fwdbwd, (*args, dout), times, (cname, "fwdbwd"))
            except Exception as e:  # pylint: disable=broad-except
              errors.append(f"{name}/{per_expert}/{proj}/{cname} (timing): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
              usable.remove(cname)
        flops = 2.0 * float(jnp.sum(sizes)) * k_dim * n_dim
        med = {key: float(np.median(v)) for key, v in times.items()}
        for cname in usable:
          row = dict(shape=name, rows_per_expert=per_expert, proj=proj, impl=cname,
                     K=k_dim, N=n_dim, rows=rows,
                     fwd_s=med[(cname, "fwd")], fwdbwd_s=med[(cname, "fwdbwd")],
                     fwd_tflops=flops / med[(cname, "fwd")] / 1e12,
                     fwdbwd_tflops=3 * flops / med[(cname, "fwdbwd")] / 1e12)
          row["fwdbwd_vs_dense"] = med[("dense", "fwdbwd")] / med[(cname, "fwdbwd")]
          if ("ragged_dot", "fwdbwd") in med:
            row["speedup_vs_ragged_dot"] = med[("ragged_dot", "fwdbwd")] / med[(cname, "fwdbwd")]
          rows_out.append(row)
          print(row, flush=True)
  return rows_out, errors


def layer_table(shapes, rows_list, backends):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from moejax.config.base import base_config
  from moejax.model import sublayers

  def build(kind, experts, d, f, top_k):
    cfg = base_config()
    cfg.model.d_model = d
    cfg.model.compute_dtype = cfg.model.param_dtype = FLAGS.dtype
    if kind == "dense":
      cfg.model.sublayer, cfg.model.ffn_dim = "dense", f * top_k
    else:
      cfg.model.sublayer = "moe"
      cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_dim = experts, top_k, f
      cfg.moe.backend = kind
    layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
      y, aux = nnx.merge(graphdef, params, rest)(x, train=True)
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + sum(
          (v for k, v in aux.items() if k.startswith("loss/")), 0.0)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params

  out, errors = [], []
  for name, (experts, d, f, top_k) in shapes.items():
    for per_expert in rows_list:
      tokens = experts * per_expert // top_k
      if tokens * top_k > FLAGS.max_rows:
        continue
      x = jax.random.normal(jax.random.PRNGKey(1), (1, tokens, d), jnp.dtype(FLAGS.dtype))
      steps, times = {}, {}
      for kind in ["dense"] + list(backends):
        try:
          step, params = build(kind, experts, d, f, top_k)
          jax.block_until_ready(step(params, x))
          steps[kind] = (step, (params, x))
        except Exception as e:  # pylint: disable=broad-except
          errors.append(f"layer {name}/{per_expert}/{kind}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}")
          print("FAILED", errors[-1], flush=True)
      for _ in range(FLAGS.repeats):
        for kind, (step, args) in list(steps.items()):
          try:
            _timed(step, args, times, kind)
          except Exception as e:  # pylint: disable=broad-except
            errors.append(f"layer {name}/{per_expert}/{kind} (timing): {type(e).__name__}")
            del steps[kind]
      if "dense" not in steps:
        continue
      dense = float(np.median(times["dense"]))
      for kind in steps:
        if kind == "dense":
          continue
        s = float(np.median(times[kind]))
        out.append(dict(shape=name, rows_per_expert=per_expert, tokens=tokens, backend=kind,
                        seconds=s, dense_seconds=dense, dense_over_layer=dense / s))
        print(out[-1], flush=True)
  return out, errors


def _markdown(env, matmul_rows, layer_rows, errors) -> str:
  lines = ["# Grouped matmul and MoE layer: Pallas kernels vs dense, ragged_dot, tokamax", ""]
  lines += common.header_lines(env)
  lines += [f"- dtype {FLAGS.dtype}; median of {FLAGS.repeats} interleaved rounds of "
            f"{FLAGS.inner} calls; random normal inputs, multinomial group sizes", ""]
  if env["platform"] == "cpu":
    lines += ["**CPU: Pallas kernels ran in interpret mode (an emulation); the times below "
              "only show that every row ran, not kernel speed.**", ""]
  lines += ["## Grouped matmul (TFLOP/s; x dense = dense time / our time, fwd+bwd)", "",
            "| shape | rows/expert | proj | K x N | impl | fwd TF/s | fwd+bwd TF/s | x dense | "
            "x ragged_dot |", "|---|---|---|---|---|---|---|---|---|"]
  for r in matmul_rows:
    rd = r.get("speedup_vs_ragged_dot")
    lines.append(f"| {r['shape']} | {r['rows_per_expert']} | {r['proj']} | {r['K']} x {r['N']} "
                 f"| {r['impl']} | {r['fwd_tflops']:.1f} | {r['fwdbwd_tflops']:.1f} | "
                 f"{r['fwdbwd_vs_dense']:.2f} | {'-' if rd is None else f'{rd:.2f}'} |")
  if layer_rows:
    lines += ["", "## MoE layer forward+backward vs dense SwiGLU of equal active FLOPs", "",
              "| shape | rows/expert | tokens | backend | seconds | dense seconds | "
              "dense / layer |", "|---|---|---|---|---|---|---|"]
    for r in layer_rows:
      lines.append(f"| {r['shape']} | {r['rows_per_expert']} | {r['tokens']} | {r['backend']} "
                   f"| {r['seconds']:.4f} | {r['dense_seconds']:.4f} | "
                   f"{r['dense_over_layer']:.2f} |")
  if errors:
    lines += ["", "## Failures and mismatches", ""] + [f"- {e}" for e in errors]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  import jax
  platform = jax.default_backend()
  variants = FLAGS.variants or {"gpu": ["gpu", "mgpu"], "tpu": ["tpu"]}.get(platform, ["gpu"])
  if FLAGS.quick:
    shapes, rows_list = QUICK_SHAPES, [8, 24]
    FLAGS.repeats, FLAGS.inner = 2, 1
  else:
    unknown = [s for s in FLAGS.shapes if s not in SHAPES]
    if unknown:
      raise app.UsageError(f"Unknown --shapes {unknown}; choose among {sorted(SHAPES)}.")
    shapes = {s: SHAPES[s] for s in FLAGS.shapes}
    rows_list = [int(r) for r in FLAGS.rows_per_expert]
  matmul_rows, errors = matmul_table(shapes, rows_list, variants)
  layer_rows = []
  if FLAGS.layer:
    layer_rows, layer_errors = layer_table(shapes, rows_list, FLAGS.backends)
    errors += layer_errors
  env = common.environment()
  data = dict(env=env, dtype=FLAGS.dtype, variants=variants, matmul=matmul_rows,
              layer=layer_rows, errors=errors)
  common.write_results(FLAGS.out, _markdown(env, matmul_rows, layer_rows, errors), data)


if __name__ == "__main__":
  app.run(main)
