"""Where a train step's (or one MoE layer's) time goes, op by op.

Runs the program under `jax.profiler`, reads the trace's per-op durations
(each event names the HLO instruction it ran), and joins them with the compiled
HLO: each op's shape and the JAX source op it came from. Reports time per
named scope (the `sorted` dispatch names its stages route, layout, gather,
experts and combine), split into forward and backward (ops under a
`transpose(...)` are backward), and the most expensive single ops.

  python benchmarks/profile_ops.py --config=configs/moe.py:mixtral_tiny
  python benchmarks/profile_ops.py --layer=sorted --experts=64 --top_k=8 \
      --d_model=512 --dense_ffn=2048 --layer_tokens=4096

Op durations on XLA:CPU are per thunk; a dot that hands its work to the
intra-op thread pool may be charged partly to the op that waits for it, so
read single dots with care and stages with more confidence. On GPU the trace
names kernels, which this join does not resolve.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks.stepper import Stepper  # pylint: disable=wrong-import-position
from benchmarks.sublayer_step import sublayer_step  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file("config", None, "A preset whose train step to profile.",
                                lock_config=True)
flags.DEFINE_string("layer", "", "Instead of a train step: one MoE sublayer's forward+backward "
                    "with this dispatch backend (or 'dense' for the dense SwiGLU).")
flags.DEFINE_integer("experts", 8, "With --layer: routed experts.")
flags.DEFINE_integer("top_k", 2, "With --layer: experts per token.")
flags.DEFINE_integer("layer_tokens", 4096, "With --layer: tokens per call.")
flags.DEFINE_integer("d_model", 512, "With --layer: model width.")
flags.DEFINE_integer("dense_ffn", 2048, "With --layer: dense SwiGLU width F; experts are F / k wide.")
flags.DEFINE_integer("steps", 4, "Profiled calls (after two untimed ones).")
flags.DEFINE_integer("top", 25, "Most expensive ops to list.")
flags.DEFINE_list("scopes", ["route", "layout", "gather", "experts", "combine"],
                  "Named scopes to total (the first one found in an op's name wins).")
flags.DEFINE_string("out", "", "Write the report here (.md, with a .json beside it).")
FLAGS = flags.FLAGS

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict:
  """instruction name -> (opcode, result shape, JAX op_name) from compiled HLO text."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op_name = _OP_NAME.search(line)
      ops[m.group(1)] = (m.group(3), m.group(2), op_name.group(1) if op_name else "")
  return ops


def traced_op_times(run, calls: int) -> tuple[collections.Counter, collections.Counter]:
  """(total microseconds, event count) per HLO instruction over `calls` calls of run()."""
  import jax
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(calls):
      run()
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  micros, count = collections.Counter(), collections.Counter()
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") == "X" and op:
      micros[op] += e["dur"]
      count[op] += 1
  return micros, count


def stage_of(op_name: str, scopes) -> str:
  stage = next((s for s in scopes if re.search(rf"\b{re.escape(s)}\b", op_name)), "other")
  return f"{stage} {'backward' if 'transpose(' in op_name else 'forward'}"


def profile(run, hlo_text: str, calls: int, scopes, top: int) -> dict:
  """Wall time per call, and the traced op time by stage and by op."""
  run()
  run()
  start = time.perf_counter()
  for _ in range(calls):
    run()
  wall = (time.perf_counter() - start) / calls
  ops = hlo_ops(hlo_text)
  micros, count = traced_op_times(run, calls)
  micros = {k: v for k, v in micros.items() if k in ops}
  total = sum(micros.values())
  stages = collections.Counter()
  for name, us in micros.items():
    stages[stage_of(ops[name][2], scopes)] += us
  top_ops = [dict(op=name, opcode=ops[name][0], shape=ops[name][1], source=ops[name][2],
                  ms=us / calls / 1e3, runs=count[name] // calls)
             for name, us in sorted(micros.items(), key=lambda kv: -kv[1])[:top]]
  return dict(wall_ms=wall * 1e3, op_ms=total / calls / 1e3,
              stages={k: v / calls / 1e3 for k, v in stages.most_common()}, top_ops=top_ops)


def train_step_program(cfg):
  """(run, compiled HLO text) of a preset's train step on its own data."""
  from moejax import sharding
  stepper = Stepper(cfg, warmup=0)
  with sharding.use_mesh(stepper.mesh, cfg.sharding.rules):
    hlo = stepper.step_fn.lower(stepper.state, stepper.next_batch()).compile().as_text()
  return (lambda: stepper.run(1)), hlo


def layer_program(backend: str, experts: int, top_k: int, tokens: int):
  """(run, compiled HLO text) of one sublayer's forward+backward (sublayer_step.py)."""
  import jax
  step, params = sublayer_step(backend, experts, top_k, d_model=FLAGS.d_model,
                               dense_ffn=FLAGS.dense_ffn)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, tokens // 8, FLAGS.d_model))
  compiled = step.lower(params, x).compile()  # run this one: calling step would compile again
  return (lambda: jax.block_until_ready(compiled(params, x))), compiled.as_text()


def render(r: dict, what: str) -> str:
  lines = [f"# profile_ops: {what}", "", *common.header_lines(r),
           f"- {r['calls']} profiled calls: {r['wall_ms']:.1f} ms each (wall, untraced); "
           f"{r['op_ms']:.1f} ms of traced op time", "",
           "| stage | ms per call | share |", "|---|---|---|"]
  for stage, ms in r["stages"].items():
    lines.append(f"| {stage} | {ms:.2f} | {100 * ms / r['op_ms']:.1f}% |")
  lines += ["", "| ms | runs | op | shape | from |", "|---|---|---|---|---|"]
  for o in r["top_ops"]:
    lines.append(f"| {o['ms']:.2f} | {o['runs']} | {o['opcode']} | `{o['shape']}` | "
                 f"`{o['source'][-90:]}` |")
  return "\n".join(lines)


def main(argv):
  del argv
  if bool(FLAGS.config) == bool(FLAGS.layer):
    raise app.UsageError("Give exactly one of --config (a train step) or --layer (one MoE layer).")
  if FLAGS.layer:
    run, hlo = layer_program(FLAGS.layer, FLAGS.experts, FLAGS.top_k, FLAGS.layer_tokens)
    what = (f"{FLAGS.layer} layer, {FLAGS.layer_tokens} tokens, d={FLAGS.d_model}, "
            f"E={FLAGS.experts}, k={FLAGS.top_k}, dense F={FLAGS.dense_ffn}")
  else:
    run, hlo = train_step_program(FLAGS.config)
    what = f"train step of {FLAGS.config.name}"
  r = profile(run, hlo, FLAGS.steps, FLAGS.scopes, FLAGS.top)
  r.update(calls=FLAGS.steps, **common.environment("devices", "platform", "cpu", "cores", "jax",
                                                   "flax", "python", "date", "command"))
  common.write_results(FLAGS.out, render(r, what), r)


if __name__ == "__main__":
  app.run(main)
