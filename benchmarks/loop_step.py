"""LoopMoE train step: the looped model (scan over iterations, with and without
rematerialisation) against the Vanilla MoE it is balanced against.

For each arm: XLA's memory plan of the jitted train step (temp bytes are the
activations kept for the backward pass) and the median step time over
--steps steps after compilation, all in one run so the ratios compare.

  python benchmarks/loop_step.py --out=benchmarks/results/loop_step_cpu.md

Arms: configs/loopmoe.py:vanilla_<size>, loopmoe_<size>, and loopmoe_<size>
with loop.remat=True. Batches are random token ids (the data pipeline is not
what is measured).
"""

import os
import statistics
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_string("size", "tiny", "Preset size of configs/loopmoe.py.")
flags.DEFINE_integer("steps", 5, "Timed steps per arm (median).")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def measure(cfg, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moejax import budget as budget_lib
  from moejax import data as data_lib
  from moejax import sharding
  from moejax.optim import make_optimizer
  from moejax.train import BATCH_KEYS, StateSpec, make_train_step

  vocab = data_lib.vocab_size(cfg.data)
  mesh = sharding.make_mesh(cfg.mesh)
  b, s = cfg.train.global_batch, cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (b, s + 1))
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               segment_ids=np.ones((b, s), np.int32),
               positions=np.broadcast_to(np.arange(s), (b, s)).astype(np.int32),
               weights=np.ones((b, s), np.float32))
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    spec = StateSpec(cfg, vocab, mesh, make_optimizer(cfg.train))
    state = spec.init()
    batch = {k: jax.device_put(jnp.asarray(batch[k]), sharding.batch_sharding(mesh))
             for k in BATCH_KEYS}
    step_fn = make_train_step(spec, cfg)
    compiled = step_fn.lower(state, batch).compile()
    memory = common.memory_bytes(compiled)
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  budget = budget_lib.model_budget(cfg, vocab)
  return dict(step_s=statistics.median(times), memory=memory, params=budget["params"],
              train_flops_per_token=budget["train_flops_per_token"],
              effective_layers=budget["effective_layers"],
              unique_layers=cfg.model.num_layers)


def main(argv):
  del argv
  from configs.loopmoe import get_config
  arms = [("vanilla", get_config(f"vanilla_{FLAGS.size}")),
          ("loopmoe (scan)", get_config(f"loopmoe_{FLAGS.size}"))]
  remat = get_config(f"loopmoe_{FLAGS.size}")
  remat.loop.remat = True
  arms.append(("loopmoe (scan, remat)", remat))
  results = {name: measure(cfg, FLAGS.steps) for name, cfg in arms}
  env = common.environment("devices", "platform", "cpu", "cores", "jax", "flax", "python",
                           "date", "command")
  ref = results["vanilla"]
  lines = [f"# LoopMoE train step vs the matched Vanilla MoE ({FLAGS.size})", "",
           *common.header_lines(env), "",
           "| arm | unique / applied layers | params | train FLOPs/token | step ms | "
           "x vanilla | temp MiB | x vanilla | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(
        f"| {name} | {r['unique_layers']} / {r['effective_layers']} | {r['params']:,} | "
        f"{r['train_flops_per_token']:,} | {1e3 * r['step_s']:.0f} | "
        f"{r['step_s'] / ref['step_s']:.2f} | {common.mib(r['memory']['temp'])} | "
        f"{r['memory']['temp'] / ref['memory']['temp']:.2f} | "
        f"{common.mib(r['memory']['peak'])} |")
  lines += ["", "Temp memory is XLA's plan for the whole train step (activations kept "
            "for the backward pass, plus workspace); step time is the median of "
            f"{FLAGS.steps} steps after compilation, on a CPU shared with other jobs."]
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", dict(env, arms=results))


if __name__ == "__main__":
  app.run(main)
