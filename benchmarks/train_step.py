"""Train-step throughput: tokens/s, share of time waiting for input, and MFU.

Runs the trainer's own jitted step and data iterator (no checkpoints, no eval)
and times `--steps` steps after `--warmup` steps (compilation excluded).

  input wait share = time in next(iterator) + host->device assembly, divided by
                     wall time of the timed loop (goal: under 5%)
  MFU              = train FLOPs/token x tokens/s / (devices x --peak_tflops)
  matmul ratio     = the same achieved FLOP/s divided by that of one large
                     dense matmul (compute dtype of the config) timed in the same
                     run on the same devices: a machine-relative utilisation
                     that needs no published peak (CPUs have none).

  python benchmarks/train_step.py --config=configs/dense.py:tiny \
      --peak_tflops=0.1 --out=benchmarks/results/train_step_cpu.md

With --compare=SPEC,SPEC,... each config is timed against --config in
interleaved rounds, and the ratios are reported (median and min-max over
rounds), in tokens/s and in model FLOP/s:

  python benchmarks/train_step.py --config=configs/dense.py:tiny --steps=10 \
      --compare=configs/moe.py:mixtral_tiny,configs/mohge.py:tiny \
      --out=benchmarks/results/train_step_cpu_moe_vs_dense.md

Steps are dispatched asynchronously, as in training; the loop blocks on the
last step's outputs before stopping the clock.
"""

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks.stepper import Stepper  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "dense.py:tiny"),
                                "Config to benchmark.", lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
flags.DEFINE_float("peak_tflops", 0.0,
                   "Peak dense TFLOP/s of ONE device for MFU (e.g. 989 for H100 bf16); "
                   "0 skips MFU.")
flags.DEFINE_list("compare", [],
                  "Config specs to time against --config, interleaved (e.g. "
                  "configs/moe.py:mixtral_tiny); reports ratios instead of one config's numbers.")
flags.DEFINE_integer("rounds", 5, "With --compare: interleaved rounds of --steps steps each.")
flags.DEFINE_string("out", "", "Write the results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def measure(cfg, steps: int, warmup: int) -> dict:
  stepper = Stepper(cfg, warmup)
  elapsed, wait = stepper.run(steps)
  tokens = steps * stepper.tokens_per_step
  return dict(tokens_per_s=tokens / elapsed, step_time_s=elapsed / steps,
              input_wait_share=wait / elapsed,
              train_flops_per_token=stepper.flops_per_token, params=stepper.params,
              achieved_tflops=stepper.flops_per_token * tokens / elapsed / 1e12)


def compare(reference_cfg, specs: list[str], steps: int, warmup: int, rounds: int) -> dict:
  """Each config against the reference, interleaved: every round runs `steps`
  steps of the reference, then of the config, for each config in turn. A round's
  ratio is config/reference, in tokens/s and in model FLOP/s (tokens/s times
  train FLOPs per token: the ratio that compares configs of unequal FLOPs)."""
  import numpy as np

  from moejax.config.files import load_config
  ref = Stepper(reference_cfg, warmup)
  others = {spec: Stepper(load_config(spec), warmup) for spec in specs}
  per = {spec: dict(tokens=[], flops=[]) for spec in specs}
  ref_times = []
  for _ in range(rounds):
    for spec, stepper in others.items():
      t_ref, _ = ref.run(steps)
      t, _ = stepper.run(steps)
      ref_times.append(t_ref)
      tok = (stepper.tokens_per_step / t) / (ref.tokens_per_step / t_ref)
      per[spec]["tokens"].append(tok)
      per[spec]["flops"].append(tok * stepper.flops_per_token / ref.flops_per_token)
    print("round done: " + ", ".join(f"{s.split(':')[-1]} {per[s]['flops'][-1]:.2f}"
                                      for s in specs), flush=True)
  ref_tps = ref.tokens_per_step * steps / float(np.median(ref_times))
  rows = []
  for spec, stepper in others.items():
    row = dict(config=spec, flops_per_token=stepper.flops_per_token, params=stepper.params)
    for key in ("tokens", "flops"):
      row.update(common.median_range(per[spec][key], f"{key}_ratio"))
    rows.append(row)
  return dict(reference=reference_cfg.name, reference_tokens_per_s=ref_tps,
              reference_flops_per_token=ref.flops_per_token, rounds=rounds,
              steps_per_round=steps, rows=rows)


def matmul_tflops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
  """Achieved TFLOP/s of an [n, n] x [n, n] matmul on every device at once."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  n_dev = jax.device_count()
  mesh = jax.make_mesh((n_dev,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = NamedSharding(mesh, P("d"))
  a = jax.device_put(jnp.ones((n_dev * size, size), dtype), sh)
  b = jax.device_put(jnp.ones((size, size), dtype), NamedSharding(mesh, P()))
  f = jax.jit(lambda a, b: a @ b, out_shardings=sh)
  jax.block_until_ready(f(a, b))
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a, b)
  jax.block_until_ready(out)
  return 2 * n_dev * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


cpu_model = common.cpu_model  # kept importable from here


# The goal for --compare: every MoE-family preset's model FLOP/s at least this
# fraction of dense_tiny's (equal-FLOP throughput).
COMPARE_GOAL = 0.9


def main_compare() -> None:
  r = compare(FLAGS.config, FLAGS.compare, FLAGS.steps, FLAGS.warmup, FLAGS.rounds)
  r.update(common.environment("devices", "platform", "cpu", "cores", "jax", "flax", "python",
                              "date", "command"))
  lines = [
      f"# train_step: MoE-family presets vs {r['reference']} (interleaved)", "",
      *common.header_lines(r),
      f"- {r['rounds']} rounds; in each, {r['steps_per_round']} steps of {r['reference']} "
      f"then {r['steps_per_round']} of the preset, for each preset in turn",
      f"- {r['reference']}: {r['reference_tokens_per_s']:,.0f} tokens/s (median round), "
      f"{r['reference_flops_per_token']:,} train FLOPs/token",
      "- x tokens/s: the preset's tokens/s over the reference's in the same round; "
      "x FLOP/s: the same times FLOPs/token over the reference's (equal-FLOP "
      f"throughput; goal >= {COMPARE_GOAL}); median over rounds (min-max)", "",
      "| preset | params | train FLOPs/token | x tokens/s | x FLOP/s | goal |",
      "|---|---|---|---|---|---|"]
  for q in r["rows"]:
    ok = "meets" if q["flops_ratio"] >= COMPARE_GOAL else "misses"
    lines.append(
        f"| {q['config']} | {q['params']:,} | {q['flops_per_token']:,} | "
        f"{q['tokens_ratio']:.2f} ({q['tokens_ratio_min']:.2f}-{q['tokens_ratio_max']:.2f}) | "
        f"{q['flops_ratio']:.2f} ({q['flops_ratio_min']:.2f}-{q['flops_ratio_max']:.2f}) | "
        f"{ok} |")
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", r, sort_keys=True)


def main(argv):
  del argv
  import jax
  if FLAGS.compare:
    main_compare()
    return
  cfg = FLAGS.config
  r = measure(cfg, FLAGS.steps, FLAGS.warmup)
  n = jax.device_count()
  if FLAGS.peak_tflops > 0:
    r["mfu"] = r["achieved_tflops"] / (n * FLAGS.peak_tflops)
  r["matmul_tflops"] = matmul_tflops(cfg.model.compute_dtype)
  r["matmul_ratio"] = r["achieved_tflops"] / r["matmul_tflops"]
  r.update(config=cfg.name, steps=FLAGS.steps, peak_tflops_per_device=FLAGS.peak_tflops)
  r.update(common.environment("devices", "platform", "cpu", "cores", "jax", "flax", "python",
                              "command"))
  lines = [
      f"# train_step benchmark: {cfg.name}",
      "",
      f"- device: {r['devices']} ({r['platform']}, {r['cores']} host cores, {r['cpu']})",
      common.versions_line(r),
      f"- command: `{r['command']}`",
      "",
      "| metric | value |",
      "|---|---|",
      f"| tokens/s | {r['tokens_per_s']:,.0f} |",
      f"| step time | {r['step_time_s'] * 1e3:.1f} ms |",
      f"| input wait share (goal < 5%) | {100 * r['input_wait_share']:.2f}% |",
      f"| train FLOPs/token | {r['train_flops_per_token']:,} |",
      f"| achieved | {r['achieved_tflops'] * 1e3:.2f} GFLOP/s |",
      f"| dense matmul, same run ({cfg.model.compute_dtype}) | "
      f"{r['matmul_tflops'] * 1e3:.2f} GFLOP/s |",
      f"| model FLOP/s / matmul FLOP/s | {100 * r['matmul_ratio']:.1f}% |",
  ]
  if "mfu" in r:
    lines.append(f"| MFU (peak {FLAGS.peak_tflops} TFLOP/s per device) | "
                 f"{100 * r['mfu']:.1f}% |")
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", r, sort_keys=True)


if __name__ == "__main__":
  app.run(main)
