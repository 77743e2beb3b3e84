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

config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "dense.py:tiny"),
                                "Config to benchmark.", lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
flags.DEFINE_float("peak_tflops", 0.0,
                   "Peak dense TFLOP/s of ONE device for MFU (e.g. 989 for H100 bf16); "
                   "0 skips MFU.")
flags.DEFINE_string("out", "", "Write the results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def measure(cfg, steps: int, warmup: int) -> dict:
  import jax

  from moejax import budget as budget_lib
  from moejax import config as config_lib
  from moejax import data as data_lib
  from moejax import sharding
  from moejax.optim import make_optimizer
  from moejax.train import StateSpec, make_train_step, to_global_batch

  config_lib.validate(cfg, num_devices=jax.device_count(),
                      num_processes=jax.process_count())
  data_lib.prepare(cfg.data)
  vocab = data_lib.load_tokenizer(cfg.data).vocab_size
  mesh = sharding.make_mesh(cfg.mesh)
  it = data_lib.make_train_iterator(
      cfg.data, seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch,
      seed=cfg.seed, rows=sharding.process_batch_rows(mesh, cfg.train.global_batch))
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    spec = StateSpec(cfg, vocab, mesh, make_optimizer(cfg.train))
    state = spec.init()
    step_fn = make_train_step(spec, cfg)
    for _ in range(warmup):
      state, metrics = step_fn(state, to_global_batch(next(it), mesh, cfg.train.global_batch))
    jax.block_until_ready(metrics)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
      t0 = time.perf_counter()
      batch = to_global_batch(next(it), mesh, cfg.train.global_batch)
      wait += time.perf_counter() - t0
      state, metrics = step_fn(state, batch)
    jax.block_until_ready((state["step"], metrics))
    elapsed = time.perf_counter() - start
  tokens = steps * cfg.train.global_batch * cfg.data.seq_len
  b = budget_lib.model_budget(cfg, vocab)
  return dict(tokens_per_s=tokens / elapsed, step_time_s=elapsed / steps,
              input_wait_share=wait / elapsed,
              train_flops_per_token=b["train_flops_per_token"], params=b["params"],
              achieved_tflops=b["train_flops_per_token"] * tokens / elapsed / 1e12)


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


def main(argv):
  del argv
  import jax
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
