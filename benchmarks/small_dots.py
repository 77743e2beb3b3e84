"""How fast XLA:CPU runs the small matmuls of an expert loop, on one core and all.

XLA:CPU splits a dot over its threads only above a size threshold, so an
expert tile's matmul may run on one core however many the machine has. This
times each `[m, k] x [k, n]` dot (forward only) in a loop of `--dots_per_call`
independent dots inside one jitted call, so call overhead does not count, and
reports GFLOP/s in processes pinned to one core and left on all cores, the two
alternating round by round. A dot whose rate does not grow with the cores runs
on one thread. `block_swiglu.auto_tile_rows` sizes tiles from these numbers.

It also times two independent loops of such dots in one program against one
loop (`--overlap_shape`): 1.0x would mean XLA:CPU runs the two loops fully in
parallel, 2.0x not at all.

  python benchmarks/small_dots.py --out=benchmarks/results/small_dots_cpu.md
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_list("shapes", ["256x128x192", "2048x128x192", "384x128x48", "256x512x256",
                             "4096x512x256"],
                  "Dots as MxKxN: [M, K] x [K, N].")
flags.DEFINE_string("overlap_shape", "384x128x48",
                    "The dot of the one-loop vs two-loop comparison (deepseek_tiny's "
                    "expert: about 384 rows, d=128, width 48).")
flags.DEFINE_integer("dots_per_call", 64, "Independent dots per jitted call.")
flags.DEFINE_integer("rounds", 5, "Rounds; each runs a one-core and an all-core process.")
flags.DEFINE_integer("repeats", 9, "Timed calls per case within a process (median).")
flags.DEFINE_integer("child_cores", 0, "Internal: measure in this process, pinned to this "
                     "many cores (0: this is the parent).")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def _parse(shape: str) -> tuple[int, int, int]:
  m, k, n = (int(v) for v in shape.lower().split("x"))
  return m, k, n


def _dot_loops():
  """A jitted call running one fori_loop of dots per (xs, w) pair, summed; the
  loops share no data."""
  import jax
  import jax.numpy as jnp

  def one_loop(xs, w):
    def body(i, acc):
      return acc + xs[i] @ w
    return jax.lax.fori_loop(0, xs.shape[0], body,
                             jnp.zeros((xs.shape[1], w.shape[1]), xs.dtype))

  def fn(xs_list, ws):
    return sum(one_loop(xs, w) for xs, w in zip(xs_list, ws))

  return jax.jit(fn)


def _case(shape, loops: int, key):
  import jax
  m, k, n = shape
  keys = jax.random.split(key, 2 * loops)
  xs = [jax.random.normal(keys[2 * i], (FLAGS.dots_per_call, m, k)) for i in range(loops)]
  ws = [jax.random.normal(keys[2 * i + 1], (k, n)) for i in range(loops)]
  return (xs, ws)


def measure_here() -> dict:
  """Medians of --repeats calls per case in this process: GFLOP/s per shape and the
  two-loop / one-loop time ratio."""
  import jax
  import numpy as np
  key = jax.random.PRNGKey(0)
  fn = _dot_loops()
  rates = {}
  for shape in FLAGS.shapes:
    m, k, n = _parse(shape)
    args = _case((m, k, n), 1, key)
    jax.block_until_ready(fn(*args))
    t = float(np.median([common.time_once(fn, args) for _ in range(FLAGS.repeats)]))
    rates[shape] = 2 * m * k * n * FLAGS.dots_per_call / t / 1e9
  shape = _parse(FLAGS.overlap_shape)
  one, two = _case(shape, 1, key), _case(shape, 2, key)
  jax.block_until_ready(fn(*one))
  jax.block_until_ready(fn(*two))
  ratios = []
  for _ in range(FLAGS.repeats):
    ratios.append(common.time_once(fn, two) / common.time_once(fn, one))
  return dict(gflops=rates, two_loops_over_one=float(np.median(ratios)))


def run_child(cores: int) -> dict:
  """The measurement in a fresh process pinned to the first `cores` CPUs."""
  argv = [sys.executable, os.path.abspath(__file__), f"--child_cores={cores}",
          f"--shapes={','.join(FLAGS.shapes)}", f"--overlap_shape={FLAGS.overlap_shape}",
          f"--dots_per_call={FLAGS.dots_per_call}", f"--repeats={FLAGS.repeats}"]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"the {cores}-core measurement failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.child_cores:
    # Pinned before jax starts its thread pool, whose threads inherit the mask.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:FLAGS.child_cores])
    print(json.dumps(measure_here()))
    return
  all_cores = len(os.sched_getaffinity(0))
  counts = [1] if all_cores == 1 else [1, all_cores]
  results = {c: [] for c in counts}
  for r in range(FLAGS.rounds):
    for c in counts:
      results[c].append(run_child(c))
    print(f"round {r + 1}/{FLAGS.rounds} done", file=sys.stderr)
  rows = []
  for shape in FLAGS.shapes:
    m, k, n = _parse(shape)
    row = dict(shape=shape, macs=m * k * n)
    for c in counts:
      row.update(common.median_range([res["gflops"][shape] for res in results[c]],
                                     f"gflops_{c}_cores"))
    rows.append(row)
  overlap = {c: common.median_range([res["two_loops_over_one"] for res in results[c]], "ratio")
             for c in counts}
  res = dict(rows=rows, overlap_shape=FLAGS.overlap_shape, overlap=overlap,
             dots_per_call=FLAGS.dots_per_call, rounds=FLAGS.rounds, repeats=FLAGS.repeats)
  res.update(common.environment())
  heads = [f"GFLOP/s, {c} core{'s' if c > 1 else ''} (min-max)" for c in counts]
  lines = ["# Small float32 dots on XLA:CPU: one core vs all", "", *common.header_lines(res),
           f"- {FLAGS.dots_per_call} independent dots per jitted call; median of "
           f"{FLAGS.repeats} calls per process, then median over {FLAGS.rounds} rounds, "
           "each round a process pinned to one core and one on all cores", "",
           "| [M, K] x [K, N] | multiply-adds | " + " | ".join(heads) + " |",
           "|---|---|" + "---|" * len(counts)]
  for row in rows:
    m, k, n = _parse(row["shape"])
    cells = [f"{row[f'gflops_{c}_cores']:.0f} ({row[f'gflops_{c}_cores_min']:.0f}-"
             f"{row[f'gflops_{c}_cores_max']:.0f})" for c in counts]
    lines.append(f"| [{m}, {k}] x [{k}, {n}] | {row['macs']:,} | " + " | ".join(cells) + " |")
  m, k, n = _parse(FLAGS.overlap_shape)
  lines += ["", f"Two independent loops of [{m}, {k}] x [{k}, {n}] dots in one program, "
            "time over one loop (1.0: fully overlapped, 2.0: not at all):", ""]
  lines += [f"- {c} core{'s' if c > 1 else ''}: {o['ratio']:.2f} ({o['ratio_min']:.2f}-"
            f"{o['ratio_max']:.2f})" for c, o in overlap.items()]
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", res)


if __name__ == "__main__":
  app.run(main)
