"""MoE layer vs a dense SwiGLU of equal active FLOPs: forward+backward time ratio.

For each (E, k) the MoE sublayer (router, dispatch, experts, combine, aux losses)
has experts of width F / k, so k experts cost what one dense SwiGLU of width F
costs. Every variant and the dense layer are timed interleaved in one process
(median of --repeats rounds), so a noisy machine affects them alike; the ratio
is what counts, not the seconds. Peak memory is XLA's own plan for the compiled
forward+backward (arguments + outputs + temporaries, from memory_analysis()).

  python benchmarks/moe_layer.py --out=benchmarks/results/moe_layer_cpu.md

Goals (CPU, default backend `sorted`): (64, 8) at most 1.5x dense;
(256, 8) at most 1.3x the (8, 2) time.
"""

import os
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_integer("tokens", 8192, "Tokens per call (batch 8 x seq tokens/8).")
flags.DEFINE_integer("d_model", 512, "Model width.")
flags.DEFINE_integer("dense_ffn", 2048, "Dense SwiGLU width F; experts are F / k wide.")
flags.DEFINE_list("cases", ["8:2", "64:8", "256:8"], "E:k pairs.")
flags.DEFINE_list("backends", ["sorted", "capacity", "ragged_dot"], "Dispatch backends.")
flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds (median).")
flags.DEFINE_float("slow_limit_s", 20.0,
                   "A variant slower than this per call is timed once, not --repeats times.")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def _layer_fns(backend, num_experts, top_k):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moejax.config.base import base_config
  from moejax.model import sublayers

  cfg = base_config()
  cfg.model.d_model = FLAGS.d_model
  if backend == "dense":
    cfg.model.sublayer, cfg.model.ffn_dim = "dense", FLAGS.dense_ffn
  else:
    cfg.model.sublayer = "moe"
    cfg.moe.num_experts, cfg.moe.top_k = num_experts, top_k
    cfg.moe.expert_ffn_dim = FLAGS.dense_ffn // top_k
    cfg.moe.backend = backend
  layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x, train=True)
    aux_loss = sum((v for k, v in aux.items() if k.startswith("loss/")), 0.0)
    return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux_loss

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step, params


def run() -> dict:
  import jax
  import numpy as np

  batch = 8
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, FLAGS.tokens // batch, FLAGS.d_model))
  variants = [("dense", 0, 0)]
  for case in FLAGS.cases:
    e, k = (int(v) for v in case.split(":"))
    variants += [(b, e, k) for b in FLAGS.backends]
  compiled, times, memory, once = {}, {}, {}, set()
  for v in variants:
    step, params = _layer_fns(*v)
    lowered = step.lower(params, x).compile()
    mem = lowered.memory_analysis()
    memory[v] = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
                 mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x))  # warm-up run
    first = time.perf_counter() - t0
    compiled[v] = (step, params)
    times[v] = []
    if first > FLAGS.slow_limit_s:
      once.add(v)
      times[v].append(first)
    print(f"compiled {v}: first call {first:.2f}s, peak {memory[v] / 2**20:.0f} MiB",
          flush=True)
  for _ in range(FLAGS.repeats):
    for v in variants:
      if v in once:
        continue
      step, params = compiled[v]
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, x))
      times[v].append(time.perf_counter() - t0)
  med = {v: float(np.median(t)) for v, t in times.items()}
  dense = med[("dense", 0, 0)]
  rows = []
  for v in variants[1:]:
    backend, e, k = v
    rows.append(dict(backend=backend, experts=e, top_k=k, expert_ffn=FLAGS.dense_ffn // k,
                     seconds=med[v], ratio_vs_dense=med[v] / dense,
                     peak_mib=memory[v] / 2**20, timed_once=v in once))
  for r in rows:  # flatness in E: every case against (8, 2) of the same backend
    base = [q for q in rows if q["backend"] == r["backend"] and (q["experts"], q["top_k"]) == (8, 2)]
    r["ratio_vs_8x2"] = r["seconds"] / base[0]["seconds"] if base else None
  return dict(dense_seconds=dense, dense_peak_mib=memory[("dense", 0, 0)] / 2**20, rows=rows)


def main(argv):
  del argv
  r = run()
  r.update(tokens=FLAGS.tokens, d_model=FLAGS.d_model, dense_ffn=FLAGS.dense_ffn,
           repeats=FLAGS.repeats)
  r.update(common.environment("platform", "device", "cores", "cpu", "jax", "flax", "python",
                              "command", cpu=common.processor()))
  lines = [
      "# MoE layer forward+backward vs dense SwiGLU (equal active FLOPs)", "",
      f"- device: {r['device']} ({r['platform']}, {r['cores']} cores, {r['cpu']})",
      common.versions_line(r),
      f"- shapes: T={r['tokens']}, d={r['d_model']}, dense F={r['dense_ffn']}, experts F/k; "
      f"median of {r['repeats']} interleaved rounds",
      f"- command: `{r['command']}`",
      f"- dense SwiGLU: {r['dense_seconds']:.3f} s, peak {r['dense_peak_mib']:.0f} MiB", "",
      "| backend | E | k | expert width | seconds | x dense | x own (8,2) | peak MiB |",
      "|---|---|---|---|---|---|---|---|"]
  for q in r["rows"]:
    own = "" if q["ratio_vs_8x2"] is None else f"{q['ratio_vs_8x2']:.2f}"
    note = " (timed once)" if q["timed_once"] else ""
    lines.append(f"| {q['backend']} | {q['experts']} | {q['top_k']} | {q['expert_ffn']} | "
                 f"{q['seconds']:.3f}{note} | {q['ratio_vs_dense']:.2f} | {own} | "
                 f"{q['peak_mib']:.0f} |")
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", r)


if __name__ == "__main__":
  app.run(main)
