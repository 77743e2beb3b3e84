"""MoHGE: does routed expert compute follow the widths actually chosen?

MoHGE (moejax/papers/mohge/mohge.py) keeps G groups of n SwiGLU experts, every expert
of group g W_g wide. `MoHGE._routed` runs them with the `sorted` backend in one
sorted layout shared by all groups (each group's block loop visits only its own
experts' blocks), or with `ragged_dot` once per group with only that group's
pairs. The claim: the cost follows the widths the router picked, not the
widest group.

Routing is forced by calling the layer's own `MoHGE._routed(tokens, expert_idx,
weights)` with a hand-made expert_idx (group-major ids g * n + j) and
uniform weights 1/k; the router and route_groups are not run, everything after
them is the layer's code. Forward+backward = jit(value_and_grad(mean(y^2)))
w.r.t. the expert weights of every group and the tokens. Cases:

  group g      every (token, slot) pair goes to group g (experts spread evenly
               inside it): (a) g = smallest width, (b) g = largest, and the ones
               between
  uniform      (c) token t uses groups t mod G, t+1 mod G, ... (top_groups of
               them, k / top_groups slots each): every group gets T k / G pairs
  no pairs     every id is "no expert": the dispatch overhead (sort, gathers
               over T k rows, buffers) with no matmul

Both backends compile one executable each (shapes are static: every group's
buffers are sized for all T k pairs), called with each case's routing.

Analytic FLOPs: a SwiGLU pair of width W costs 6 d W forward, 18 d W forward +
backward (each of the three matmuls is done once forward, twice backward), so
a case costs 18 d T k mean(W). Reported: time per case; the large/small time
ratio next to the FLOPs ratio W_max / W_min; and the same ratio after
subtracting the no-pairs time (the width-independent overhead).

Shapes: --shapes lists d:W_0/W_1/...:backend/backend entries. The default runs
the issue's layer (d=256, widths 64..256) on `sorted` and `ragged_dot`, and a
4x wider one (d=512, widths 256..1024) on `sorted` only, where the matmuls
outweigh the fixed dispatch cost. XLA:CPU's ragged_dot is a dense loop over all
experts whatever the routing, so it is only run where it is cheap enough.

  python benchmarks/mohge_widths.py --out=benchmarks/results/mohge_widths_cpu.md
  python benchmarks/mohge_widths.py --quick
"""

import os
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_bool("quick", False, "Smoke run: T=512, d=64, one repeat.")
flags.DEFINE_string("preset", "tiny", "configs/mohge.py preset the layer starts from.")
flags.DEFINE_integer("tokens", 4096, "Tokens per call (T).")
flags.DEFINE_list("shapes", ["256:64/128/192/256:sorted/ragged_dot",
                             "512:256/512/768/1024:sorted"],
                  "d:widths:backends entries; widths and backends separated by '/'.")
flags.DEFINE_integer("experts_per_group", 4, "n experts per group.")
flags.DEFINE_integer("top_groups", 2, "Groups per token (uniform case).")
flags.DEFINE_integer("top_k", 4, "Experts per token.")
flags.DEFINE_integer("block_size", 0, "sorted backend block size (0 = the layer's auto).")
flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds (median).")
flags.DEFINE_float("slow_limit_s", 15.0,
                   "A variant slower than this per call is timed once, not repeatedly.")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def _apply_quick():
  if FLAGS.quick:
    FLAGS.tokens, FLAGS.repeats = 512, 1
    FLAGS.shapes = ["64:16/32/48/64:sorted/ragged_dot"]


def parse_shape(spec):
  d, widths, backends = spec.split(":")
  return int(d), tuple(int(w) for w in widths.split("/")), tuple(backends.split("/"))


def build_layer(d_model, widths, backend):
  from flax import nnx

  from configs.mohge import get_config
  from moejax.model import sublayers

  cfg = get_config(FLAGS.preset)
  cfg.model.d_model = d_model
  h = cfg.mohge
  h.group_widths = tuple(widths)
  h.experts_per_group, h.top_groups, h.top_k = (FLAGS.experts_per_group, FLAGS.top_groups,
                                                FLAGS.top_k)
  h.backend, h.block_size = backend, FLAGS.block_size
  layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
  assert type(layer).__name__ == "MoHGE", type(layer)
  return layer


def forced_routing(case, tokens, num_groups, per_group, top_groups, top_k):
  """expert_idx [T, k] int32 (group-major ids; G * n = no expert) for a case name:
  'group:<g>', 'uniform' or 'none'."""
  import numpy as np
  t = np.arange(tokens)[:, None]
  j = np.arange(top_k)[None, :]
  if case == "none":
    return np.full((tokens, top_k), num_groups * per_group, np.int32)
  if case == "uniform":
    slots = -(-top_k // top_groups)        # slots per chosen group
    group = (t + j // slots) % num_groups  # top_groups consecutive groups per token
    expert = (t // num_groups + j) % per_group
    return (group * per_group + expert).astype(np.int32)
  g = int(case.split(":")[1])
  return (g * per_group + (t + j) % per_group).astype(np.int32)


def run() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  per, tokens, k = FLAGS.experts_per_group, FLAGS.tokens, FLAGS.top_k
  weights = jnp.full((tokens, k), 1.0 / k, jnp.float32)
  variants, compiled, memory, times, once, routed = [], {}, {}, {}, set(), {}
  shapes = [parse_shape(s) for s in FLAGS.shapes]
  for d, widths, backends in shapes:
    num_groups = len(widths)
    cases = [f"group:{g}" for g in np.argsort(widths, kind="stable")] + ["uniform", "none"]
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens, d))
    idxs = {}
    for case in cases:
      idx_np = forced_routing(case, tokens, num_groups, per, FLAGS.top_groups, k)
      idxs[case] = jnp.asarray(idx_np)
      counts = np.bincount((idx_np // per).reshape(-1), minlength=num_groups + 1)[:num_groups]
      routed[(d, widths, case)] = dict(
          group_pairs=counts.tolist(), pairs=int(counts.sum()),
          mean_width=float(np.dot(counts, widths) / max(counts.sum(), 1)))
    for backend in backends:
      layer = build_layer(d, widths, backend)
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

      # idx is an argument, not a constant (XLA would fold the sort and block
      # layout into the executable), so one executable per backend serves every
      # case: the cases differ only in the routing they are called with.
      def loss(params, tokens_, idx_, graphdef=graphdef, rest=rest):
        layer_ = nnx.merge(graphdef, params, rest)
        y = layer_._routed(tokens_, idx_, weights)  # pylint: disable=protected-access
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

      t0 = time.perf_counter()
      exe = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
          params, x, idxs[cases[0]]).compile()
      mem = common.memory_bytes(exe)
      print(f"compiled d={d} {widths} {backend} in {time.perf_counter() - t0:.1f}s, "
            f"temp {common.mib(mem['temp'])} MiB", flush=True)
      for case in cases:
        v = (d, widths, backend, case)
        memory[v] = mem
        t0 = time.perf_counter()
        jax.block_until_ready(exe(params, x, idxs[case]))
        first = time.perf_counter() - t0
        compiled[v] = (exe, (params, x, idxs[case]))
        times[v] = [first] if first > FLAGS.slow_limit_s else []
        if first > FLAGS.slow_limit_s:
          once.add(v)
        variants.append(v)
        print(f"  {case}: first call {first:.3f}s", flush=True)
  for _ in range(FLAGS.repeats):
    for v in variants:
      if v in once:
        continue
      exe, args = compiled[v]
      t0 = time.perf_counter()
      jax.block_until_ready(exe(*args))
      times[v].append(time.perf_counter() - t0)
  med = {v: float(np.median(t)) for v, t in times.items()}
  rows, summary = [], []
  for v in variants:
    d, widths, backend, case = v
    info = routed[(d, widths, case)]
    flops = 18 * d * tokens * k * info["mean_width"] if info["pairs"] else 0.0
    rows.append(dict(d_model=d, widths=list(widths), backend=backend, case=case,
                     seconds=med[v], timed_once=v in once, mean_width=info["mean_width"],
                     group_pairs=info["group_pairs"], fwd_bwd_flops=flops,
                     gflops_per_s=flops / med[v] / 1e9, temp_bytes=memory[v]["temp"],
                     peak_bytes=memory[v]["peak"]))
  for d, widths, backends in shapes:
    small, large = int(np.argmin(widths)), int(np.argmax(widths))
    uniform_w = routed[(d, widths, "uniform")]["mean_width"]
    for backend in backends:
      t = {v[3]: med[v] for v in variants if v[:3] == (d, widths, backend)}
      s, l, n0 = t[f"group:{small}"], t[f"group:{large}"], t["none"]
      summary.append(dict(
          d_model=d, widths=list(widths), backend=backend,
          small_seconds=s, large_seconds=l, floor_seconds=n0, uniform_seconds=t["uniform"],
          time_ratio_large_small=l / s,
          flops_ratio_large_small=widths[large] / widths[small],
          net_time_ratio_large_small=(l - n0) / (s - n0) if s > n0 else None,
          uniform_over_large=t["uniform"] / l,
          uniform_flops_over_large=uniform_w / widths[large],
          floor_share_of_small=n0 / s))
  return dict(rows=rows, summary=summary)


def _case_label(case, widths):
  if case.startswith("group:"):
    g = int(case.split(":")[1])
    return f"all pairs to group {g} (W={widths[g]})"
  return {"uniform": "uniform over groups", "none": "no pairs (overhead floor)"}[case]


def main(argv):
  del argv
  _apply_quick()
  r = run()
  r.update(tokens=FLAGS.tokens, shapes=FLAGS.shapes, experts_per_group=FLAGS.experts_per_group,
           top_groups=FLAGS.top_groups, top_k=FLAGS.top_k, block_size=FLAGS.block_size,
           repeats=FLAGS.repeats, preset=FLAGS.preset, quick=FLAGS.quick,
           routing_forced_by="MoHGE._routed called with a hand-made expert_idx")
  r["environment"] = env = common.environment()
  lines = ["# MoHGE: routed expert compute follows the chosen widths", ""]
  lines += common.header_lines(env)
  lines += [
      f"- layer: configs/mohge.py:{FLAGS.preset} with d and widths per table row, "
      f"{FLAGS.experts_per_group} experts per group, top_groups={FLAGS.top_groups}, "
      f"top_k={FLAGS.top_k}; T={FLAGS.tokens}, float32",
      "- timed: jit(value_and_grad(mean(y^2))) of `MoHGE._routed` (sorted: one shared "
      "layout; ragged_dot: one call per group) w.r.t. all expert weights and the tokens, with a "
      "hand-made expert_idx (router not run; one executable per backend, called with each "
      f"case's routing); median of {FLAGS.repeats} interleaved rounds",
      "- analytic FLOPs (fwd+bwd) = 18 d T k mean(W) (6 d W per pair forward)",
      "- floor = the no-pairs case: sort, block layout, row gathers and the block "
      "kernel's buffers (sized for all T k rows), no matmul", "",
      "| d | backend | case | mean W | pairs per group | ms | GFLOP fwd+bwd | GFLOP/s | "
      "temp MiB |",
      "|---|---|---|---|---|---|---|---|---|"]
  for q in r["rows"]:
    note = " (timed once)" if q["timed_once"] else ""
    lines.append(
        f"| {q['d_model']} | {q['backend']} | {_case_label(q['case'], q['widths'])} | "
        f"{q['mean_width']:.0f} | {'/'.join(str(c) for c in q['group_pairs'])} | "
        f"{q['seconds'] * 1e3:.1f}{note} | {q['fwd_bwd_flops'] / 1e9:.2f} | "
        f"{q['gflops_per_s']:.1f} | {common.mib(q['temp_bytes'])} |")
  lines += ["", "| d | widths | backend | time large/small | FLOPs large/small (W_max/W_min) | "
            "(large - floor)/(small - floor) | uniform/large time | uniform/large FLOPs | "
            "floor / small |",
            "|---|---|---|---|---|---|---|---|---|"]
  for s in r["summary"]:
    net = "-" if s["net_time_ratio_large_small"] is None else \
        f"{s['net_time_ratio_large_small']:.2f}"
    lines.append(f"| {s['d_model']} | {'/'.join(map(str, s['widths']))} | {s['backend']} | "
                 f"**{s['time_ratio_large_small']:.2f}** | {s['flops_ratio_large_small']:.2f} | "
                 f"{net} | {s['uniform_over_large']:.2f} | "
                 f"{s['uniform_flops_over_large']:.2f} | {s['floor_share_of_small']:.2f} |")
  lines += ["", "If compute followed the widest group, every routed case would cost the same "
            "(time ratios 1.0); if it followed FLOPs exactly, time large/small would equal "
            "W_max/W_min."]
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", r)


if __name__ == "__main__":
  app.run(main)
