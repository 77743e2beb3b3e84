"""Lower bound of a capacity-shaped expert layout: batched einsums vs dense.

A capacity layout puts each expert's rows in an [E, C, d] buffer and runs the
experts as batched matmuls. This times that SwiGLU forward+backward with C
exactly the mean load, C = T k / E: no slack and no routing, the best case such
a layout can have. It is timed against the dense SwiGLU of equal FLOPs on
[T, d] (width F, experts F / k), in interleaved rounds, median ratio. If this
bound is no better than the `sorted` expert loop (benchmarks/moe_layer.py), a
capacity-shaped backend cannot beat it on the platform.

  python benchmarks/batched_experts.py --out=benchmarks/results/batched_experts_cpu.md
"""

import os
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_list("tokens", ["512", "4096"], "Tokens T per call.")
flags.DEFINE_list("experts", ["8", "64", "256"], "Expert counts E.")
flags.DEFINE_integer("top_k", 8, "Experts per token k.")
flags.DEFINE_integer("d_model", 512, "Model width d.")
flags.DEFINE_integer("dense_ffn", 2048, "Dense width F; experts are F / k wide.")
flags.DEFINE_integer("repeats", 5, "Interleaved rounds.")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def _swiglu_loss(params, x):
  import jax
  import jax.numpy as jnp
  g, u, down = params
  if x.ndim == 2:
    h = jax.nn.silu(x @ g) * (x @ u)
    return jnp.mean(jnp.square(h @ down))
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, g)) * jnp.einsum("ecd,edf->ecf", x, u)
  return jnp.mean(jnp.square(jnp.einsum("ecf,efd->ecd", h, down)))


def measure(tokens: int) -> list[dict]:
  import jax
  d, big, k = FLAGS.d_model, FLAGS.dense_ffn, FLAGS.top_k
  step = jax.jit(jax.value_and_grad(_swiglu_loss, argnums=(0, 1)))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)

  def case(lead, width):
    x = jax.random.normal(keys[0], (*lead, d))
    shapes = [(d, width), (d, width), (width, d)]
    prefix = lead[:-1]
    params = tuple(0.02 * jax.random.normal(kk, (*prefix, *s)) for kk, s in zip(keys[1:], shapes))
    return params, x

  dense = case((tokens,), big)
  variants = {e: case((e, tokens * k // e), big // k) for e in (int(v) for v in FLAGS.experts)}
  for args in [dense, *variants.values()]:
    jax.block_until_ready(step(*args))

  ratios = {e: [] for e in variants}
  for _ in range(FLAGS.repeats):
    for e, args in variants.items():
      ref = common.time_once(step, dense)
      ratios[e].append(common.time_once(step, args) / ref)
  return [dict(tokens=tokens, experts=e, capacity=tokens * k // e,
               **common.median_range(r, "ratio_vs_dense")) for e, r in ratios.items()]


def main(argv):
  del argv
  rows = [r for t in FLAGS.tokens for r in measure(int(t))]
  res = dict(rows=rows, top_k=FLAGS.top_k, d_model=FLAGS.d_model, dense_ffn=FLAGS.dense_ffn,
             repeats=FLAGS.repeats)
  res.update(common.environment())
  lines = ["# Capacity-shaped experts at their lower bound vs dense SwiGLU", "",
           *common.header_lines(res),
           f"- d={FLAGS.d_model}, dense F={FLAGS.dense_ffn}, k={FLAGS.top_k}, experts F/k wide, "
           f"C = T k / E rows each; forward+backward; {FLAGS.repeats} interleaved rounds", "",
           "| tokens | E | C | x dense (min-max) |", "|---|---|---|---|"]
  lines += [f"| {r['tokens']:,} | {r['experts']} | {r['capacity']} | {r['ratio_vs_dense']:.2f} "
            f"({r['ratio_vs_dense_min']:.2f}-{r['ratio_vs_dense_max']:.2f}) |" for r in rows]
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", res)


if __name__ == "__main__":
  app.run(main)
