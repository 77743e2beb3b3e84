"""MoE layer vs a dense SwiGLU of equal active FLOPs: forward+backward time ratio.

For each (E, k) the MoE sublayer (router, dispatch, experts, combine, aux losses)
has experts of width F / k, so k experts cost what one dense SwiGLU of width F
costs. Rounds are interleaved: in each round every variant is timed right after
its own dense reference, and a 2048^3 matmul is timed once, so a machine that
gets busier slows a variant and its reference alike. A variant's ratio is the
median over rounds of (variant time / the reference time beside it), with the
smallest and largest round ratio; the matmul rate of the same rounds says how
close the dense reference runs to this machine's peak. Peak memory is XLA's own
plan for the compiled forward+backward (arguments + outputs + temporaries).

The "weight floor" column times one pass that reads every expert weight and
writes a gradient-sized array (w -> 2w for the three [E, d, F/k] matrices), in
the same rounds: a forward+backward cannot do less memory traffic than that, so
where the floor alone exceeds a goal, the goal is out of reach of any dispatch
on this machine.

  python benchmarks/moe_layer.py --out=benchmarks/results/moe_layer_cpu.md

Goals (CPU, default backend `sorted`): at most 1.0x dense at every E up to 256
with 4,096 tokens and at most 1.5x with 512 tokens; the dense reference at 70%
or more of the matmul rate.
"""

import functools
import os
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks.sublayer_step import sublayer_step  # pylint: disable=wrong-import-position

flags.DEFINE_list("tokens", ["512", "4096"], "Tokens per call (batch 8 x seq tokens/8).")
flags.DEFINE_integer("d_model", 512, "Model width.")
flags.DEFINE_integer("dense_ffn", 2048, "Dense SwiGLU width F; experts are F / k wide.")
flags.DEFINE_list("cases", ["8:8", "32:8", "64:8", "128:8", "256:8"], "E:k pairs.")
flags.DEFINE_list("backends", ["sorted"], "Dispatch backends.")
flags.DEFINE_integer("repeats", 7, "Interleaved timing rounds.")
flags.DEFINE_float("slow_limit_s", 20.0,
                   "A variant slower than this per call is timed once, not --repeats times.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS

GOALS = {512: 1.5, 4096: 1.0}  # tokens -> most `sorted` may cost, as a multiple of dense
DENSE_GOAL = 0.7               # dense SwiGLU rate / matmul rate, at least


def _timer(fn, *args):
  """A no-argument function timing one call of fn(*args)."""
  return functools.partial(common.time_once, fn, args)


def measure(tokens: int) -> dict:
  """Interleaved rounds at one token count: the dense reference, each variant, the matmul."""
  import jax
  import numpy as np

  batch = 8
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens // batch, FLAGS.d_model))
  n = FLAGS.matmul_size
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n)) for i in (1, 2))
  matmul = _timer(jax.jit(lambda p, q: p @ q), a, b)
  matmul()
  variants = [(bk, *(int(v) for v in case.split(":")))
              for case in FLAGS.cases for bk in FLAGS.backends]
  floors = {}
  for e, k in sorted({(v[1], v[2]) for v in variants}):
    f = FLAGS.dense_ffn // k
    ws = [jax.numpy.ones((e, FLAGS.d_model, f)) for _ in range(3)]
    floors[(e, k)] = _timer(jax.jit(lambda ws: [w * 2 for w in ws]), ws)
    floors[(e, k)]()
  timers, memory, once = {}, {}, set()
  for v in [("dense", 0, 0)] + variants:
    step, params = sublayer_step(*v, d_model=FLAGS.d_model, dense_ffn=FLAGS.dense_ffn)
    compiled = step.lower(params, x).compile()  # timed as is: calling step would compile again
    memory[v] = common.memory_bytes(compiled)["peak"]
    timers[v] = _timer(compiled, params, x)
    first = timers[v]()  # warms up (compiled above)
    if first > FLAGS.slow_limit_s:
      once.add(v)
    print(f"T={tokens} compiled {v}: first call {first:.2f}s, peak "
          f"{common.mib(memory[v])} MiB", flush=True)
  dense_t, mm_t = [], []
  ratios = {v: [] for v in variants}
  seconds = {v: [] for v in variants}
  floor_ratios = {c: [] for c in floors}
  for _ in range(FLAGS.repeats):
    mm_t.append(matmul())
    for v in variants:
      if v in once and seconds[v]:
        continue
      ref = timers[("dense", 0, 0)]()
      t = timers[v]()
      dense_t.append(ref)
      seconds[v].append(t)
      ratios[v].append(t / ref)
    for c, floor in floors.items():
      floor_ratios[c].append(floor() / dense_t[-1])
  dense_s, mm_s = float(np.median(dense_t)), float(np.median(mm_t))
  dense_flops = 18 * tokens * FLAGS.d_model * FLAGS.dense_ffn  # 3 matmuls, fwd + 2x bwd
  matmul_rate, dense_rate = 2 * n**3 / mm_s, dense_flops / dense_s
  rows = []
  for v in variants:
    backend, e, k = v
    rows.append(dict(tokens=tokens, backend=backend, experts=e, top_k=k,
                     expert_ffn=FLAGS.dense_ffn // k, seconds=float(np.median(seconds[v])),
                     **common.median_range(ratios[v], "ratio_vs_dense"),
                     rounds=len(ratios[v]),
                     weight_floor_vs_dense=float(np.median(floor_ratios[(e, k)])),
                     peak_mib=None if memory[v] is None else memory[v] / 2**20,
                     timed_once=v in once))
  dense_peak = memory[("dense", 0, 0)]
  return dict(tokens=tokens, dense_seconds=dense_s, dense_gflops=dense_rate / 1e9,
              matmul_gflops=matmul_rate / 1e9, dense_over_matmul=dense_rate / matmul_rate,
              dense_peak_mib=None if dense_peak is None else dense_peak / 2**20, rows=rows)


def run() -> dict:
  per_tokens = [measure(int(t)) for t in FLAGS.tokens]
  return dict(per_tokens=per_tokens, rows=[r for p in per_tokens for r in p["rows"]])


def _mib(value) -> str:
  return "-" if value is None else f"{value:.0f}"


def _verdict(ok: bool) -> str:
  return "meets" if ok else "misses"


def render(r: dict) -> str:
  lines = [
      "# MoE layer forward+backward vs dense SwiGLU (equal active FLOPs)", "",
      f"- device: {r['device']} ({r['platform']}, {r['cores']} cores, {r['cpu']})",
      common.versions_line(r),
      f"- date: {r['date']}",
      f"- shapes: d={r['d_model']}, dense F={r['dense_ffn']}, experts F/k, batch 8; "
      f"{r['repeats']} interleaved rounds (dense, variant, dense, variant, ...)",
      f"- command: `{r['command']}`",
      "- x dense: median over rounds of (variant time / the dense time measured just "
      "before it), with the round minimum and maximum", ""]
  for p in r["per_tokens"]:
    t = p["tokens"]
    goal = GOALS.get(t)
    lines += [
        f"## {t:,} tokens", "",
        f"- dense SwiGLU: {p['dense_seconds'] * 1e3:.1f} ms, {p['dense_gflops']:.1f} GFLOP/s "
        f"= {p['dense_over_matmul']:.0%} of the {p['matmul_gflops']:.1f} GFLOP/s of a "
        f"{FLAGS.matmul_size}^3 matmul in the same rounds ({_verdict(p['dense_over_matmul'] >= DENSE_GOAL)}"
        f" the {DENSE_GOAL:.0%} goal); peak {_mib(p['dense_peak_mib'])} MiB", "",
        "| backend | E | k | expert width | ms | x dense (min-max) | goal | weight floor, x dense "
        "| peak MiB |",
        "|---|---|---|---|---|---|---|---|---|"]
    for q in p["rows"]:
      note = " (timed once)" if q["timed_once"] else ""
      mark = ("-" if goal is None or q["backend"] != "sorted"
              else f"{_verdict(q['ratio_vs_dense'] <= goal)} <= {goal}")
      lines.append(f"| {q['backend']} | {q['experts']} | {q['top_k']} | {q['expert_ffn']} | "
                   f"{q['seconds'] * 1e3:.1f}{note} | {q['ratio_vs_dense']:.2f} "
                   f"({q['ratio_vs_dense_min']:.2f}-{q['ratio_vs_dense_max']:.2f}) | {mark} | "
                   f"{q['weight_floor_vs_dense']:.2f} | {_mib(q['peak_mib'])} |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  r = run()
  r.update(d_model=FLAGS.d_model, dense_ffn=FLAGS.dense_ffn, repeats=FLAGS.repeats)
  r.update(common.environment("platform", "device", "cores", "cpu", "jax", "flax", "python",
                              "date", "command", cpu=common.cpu_model()))
  common.write_results(FLAGS.out, render(r), r)


if __name__ == "__main__":
  app.run(main)
