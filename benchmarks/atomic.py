"""Atomic (single-neuron) experts: router scaling in N, and layer cost vs dense.

Part 1, router. For N = n^2 experts (n = sqrt(N) = 32 .. 1024 by default),
T tokens and k experts per token, one jitted call computes the OmniMoE
selection from two [T, n] logit vectors:

    log_softmax(a), log_softmax(b), then top-k over the n x n grid of sums
      product    product_router.product_topk: per-axis top-min(n, k), then
                 top-k of the k'^2 candidate sums   O(n + k^2) per token
      full grid  product_router.full_grid_topk: all N sums, then top-k   O(N)
      log-softmax only: the O(n) floor both share (no selection)

The full grid would need T x N float32 at once (16 GiB at T=4096, N=2^20), so
it runs over chunks of tokens (lax.map) holding at most --full_chunk_elems grid
cells (256 MiB by default): the work per token is the same O(N) scan, only the
buffer is bounded. If its time per call, extrapolated linearly from the last N,
would exceed --full_max_seconds, that N is reported as not run.

Goal (issue): product router time at N=2^20 at most 4x that at N=2^12; the
full-grid time grows roughly linearly in N.

Part 2, layer. Forward+backward (jit(value_and_grad) of mean(y^2)) of
  layer    the OmniMoE sublayer (omnimoe.py: router matmuls, BatchNorm,
           log-softmax, product top-k, atomic experts), gradients w.r.t. x and all
           parameters (both routers, both expert tables; no shared SwiGLU unless
           --shared_ffn > 0)
  experts  atomic_experts.atomic_ffn alone on fixed random routing, gradients
           w.r.t. x and the two tables (the gates are constants)
for both expert paths ("gather", "expert_sorted"), against a dense SwiGLU of
equal active forward FLOPs per token:

  routed atomic experts: 4 k d     (k dot products u.x and k axpys of v, 2d each)
  product router:        4 n d     (two [d, n] matmuls)
  SwiGLU of width w:     6 d w     (three [d, w] matmuls)
  => w_layer = round(2 (k + n) / 3) + shared,   w_experts = round(2 k / 3)

Every variant of part 2 is timed interleaved (median of --repeats rounds).
Memory is XLA's plan for each compiled function (memory_analysis(): argument,
output and temporary bytes; peak = argument + output + temp - alias).

  python benchmarks/atomic.py --out=benchmarks/results/atomic_cpu.md
  python benchmarks/atomic.py --quick            # smoke run, seconds
"""

import math
import os
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_bool("quick", False, "Smoke run: small T, N, d and one repeat.")
flags.DEFINE_integer("tokens", 4096, "Tokens per call (both parts).")
flags.DEFINE_integer("router_top_k", 16, "k of the router sweep.")
flags.DEFINE_list("router_sides", ["32", "64", "128", "256", "512", "1024"],
                  "n = sqrt(N) values of the router sweep.")
flags.DEFINE_integer("router_repeats", 5, "Timed calls per router variant (median).")
flags.DEFINE_integer("full_chunk_elems", 2**26,
                     "Full grid: at most this many grid cells (tokens x N) at once.")
flags.DEFINE_float("full_max_seconds", 60.0,
                   "Skip the full grid at an N whose predicted time per call exceeds this.")
flags.DEFINE_integer("d_model", 512, "Model width (part 2).")
flags.DEFINE_list("layer_experts", ["4096", "65536"], "N values of part 2 (perfect squares).")
flags.DEFINE_list("layer_top_k", ["16", "64"], "k values of part 2.")
flags.DEFINE_list("paths", ["gather", "expert_sorted"], "Atomic expert paths.")
flags.DEFINE_list("levels", ["layer", "experts"], "What part 2 times (see the docstring).")
flags.DEFINE_integer("shared_ffn", 0, "Shared SwiGLU width inside the OmniMoE layer "
                     "(added to the dense baseline's width too).")
flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds of part 2 (median).")
flags.DEFINE_float("slow_limit_s", 10.0,
                   "A variant slower than this per call is timed once, not repeatedly.")
flags.DEFINE_bool("skip_router", False, "Skip part 1.")
flags.DEFINE_bool("skip_layer", False, "Skip part 2.")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def _apply_quick():
  if FLAGS.quick:
    FLAGS.tokens = 512
    FLAGS.router_sides = ["32", "64", "128"]
    FLAGS.router_repeats = 2
    FLAGS.d_model = 64
    FLAGS.layer_experts = ["1024"]
    FLAGS.layer_top_k = ["16"]
    FLAGS.repeats = 1


def _compile(fn, *args):
  """(compiled executable, memory dict); the executable is called directly, so
  timing never includes compilation."""
  import jax
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, common.memory_bytes(compiled)


# ----------------------------------------------------------------------------- router


def _router_fns(k, chunk_elems):
  import jax
  import jax.numpy as jnp

  from moejax.papers.omnimoe.product_router import full_grid_topk, product_topk

  def logprobs(a, b):
    return jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)

  def product(a, b):
    return product_topk(*logprobs(a, b), k)

  def full(a, b):
    la, lb = logprobs(a, b)
    tokens, n = la.shape
    chunk = _token_chunk(tokens, n * n, chunk_elems)
    if chunk == tokens:
      return full_grid_topk(la, lb, k)
    s, i = jax.lax.map(lambda ab: full_grid_topk(ab[0], ab[1], k),
                       (la.reshape(-1, chunk, n), lb.reshape(-1, chunk, n)))
    return s.reshape(tokens, k), i.reshape(tokens, k)

  def softmax_only(a, b):
    la, lb = logprobs(a, b)
    return jnp.sum(la, axis=-1) + jnp.sum(lb, axis=-1)  # keeps both alive, O(n)

  return dict(product=product, full=full, log_softmax=softmax_only)


def _token_chunk(tokens, cells_per_token, chunk_elems):
  """Largest divisor of `tokens` with chunk * cells_per_token <= chunk_elems (>= 1)."""
  limit = max(1, chunk_elems // cells_per_token)
  return max(c for c in range(1, min(tokens, limit) + 1) if tokens % c == 0)


def run_router() -> dict:
  import jax
  import numpy as np

  k, tokens = FLAGS.router_top_k, FLAGS.tokens
  fns = _router_fns(k, FLAGS.full_chunk_elems)
  rows, last_full = [], None
  for side in (int(s) for s in FLAGS.router_sides):
    n_exp = side * side
    a = jax.random.normal(jax.random.PRNGKey(0), (tokens, side))
    b = jax.random.normal(jax.random.PRNGKey(1), (tokens, side))
    row = dict(experts=n_exp, side=side, log2_experts=int(round(math.log2(n_exp))),
               full_chunk_tokens=_token_chunk(tokens, n_exp, FLAGS.full_chunk_elems))
    for name, fn in fns.items():
      if name == "full" and last_full is not None:
        predicted = last_full[1] * n_exp / last_full[0]
        if predicted > FLAGS.full_max_seconds:
          row["full_seconds"] = None
          row["full_note"] = (f"not run (predicted ~{predicted:.0f} s per call from the "
                              f"last N, over --full_max_seconds={FLAGS.full_max_seconds:g})")
          print(f"router n={side} full: {row['full_note']}", flush=True)
          continue
      try:
        compiled, mem = _compile(fn, a, b)
        first = common.time_once(compiled, (a, b))
        reps = 1 if first > FLAGS.slow_limit_s else FLAGS.router_repeats
        times = [common.time_once(compiled, (a, b)) for _ in range(reps)]
      except Exception as e:  # pylint: disable=broad-except  # OOM and friends
        row[f"{name}_seconds"] = None
        row[f"{name}_note"] = f"not run ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        print(f"router n={side} {name}: {row[f'{name}_note']}", flush=True)
        continue
      row[f"{name}_seconds"] = float(np.median(times))
      row[f"{name}_timed"] = reps
      row[f"{name}_temp_bytes"] = mem["temp"]
      row[f"{name}_peak_bytes"] = mem["peak"]
      if name == "full":
        last_full = (n_exp, row["full_seconds"])
      print(f"router n={side} N={n_exp} {name}: {row[f'{name}_seconds'] * 1e3:.2f} ms "
            f"(temp {common.mib(mem['temp'])} MiB)", flush=True)
    rows.append(row)

  def ratio(col, hi, lo):
    r_hi = [r for r in rows if r["experts"] == hi]
    r_lo = [r for r in rows if r["experts"] == lo]
    if not r_hi or not r_lo or r_hi[0].get(col) is None or r_lo[0].get(col) is None:
      return None
    return r_hi[0][col] / r_lo[0][col]

  n_max = max(r["experts"] for r in rows)
  base = 2**12 if any(r["experts"] == 2**12 for r in rows) else min(r["experts"] for r in rows)
  summary = dict(base_experts=base, max_experts=n_max, tokens=tokens, top_k=k,
                 full_chunk_elems=FLAGS.full_chunk_elems)
  for col in ("product", "full", "log_softmax"):
    q = ratio(f"{col}_seconds", n_max, base)
    summary[f"{col}_ratio"] = q
    # log-log slope: 1 = linear in N, 0.5 = linear in n = sqrt(N), 0 = flat
    summary[f"{col}_slope"] = (math.log(q) / math.log(n_max / base)
                               if q and n_max != base else None)
  full_rows = [r for r in rows if r.get("full_seconds") is not None]
  if full_rows and len(full_rows) > 1:
    lo, hi = full_rows[0], full_rows[-1]
    summary["full_ratio_measured"] = dict(
        lo=lo["experts"], hi=hi["experts"], ratio=hi["full_seconds"] / lo["full_seconds"],
        slope=math.log(hi["full_seconds"] / lo["full_seconds"]) /
        math.log(hi["experts"] / lo["experts"]))
  return dict(rows=rows, summary=summary)


# ----------------------------------------------------------------------------- layer


def _dense_width(level, k, side, shared):
  routed = 2 * (k + side) / 3 if level == "layer" else 2 * k / 3
  return max(1, round(routed)) + (shared if level == "layer" else 0)


def _layer_step(level, path, n_exp, k, x):
  """(fn, args) of one forward+backward variant."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moejax.config.base import base_config
  from moejax.model import sublayers
  from moejax.papers.omnimoe.atomic_experts import atomic_ffn

  d = FLAGS.d_model
  if level == "experts":
    key = jax.random.PRNGKey(2)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    idx = jax.random.randint(k1, (x.shape[0] * x.shape[1], k), 0, n_exp, jnp.int32)
    gates = jax.random.uniform(k2, idx.shape, jnp.float32) / k
    up = 0.02 * jax.random.normal(k3, (n_exp, d))
    down = 0.02 * jax.random.normal(k4, (n_exp, d))

    # idx and gates are arguments, not constants: XLA would otherwise fold the
    # expert sort into the executable at compile time.
    def loss(tokens, up, down, idx, gates):
      y = atomic_ffn(path, tokens, idx, gates, up, down)
      return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return (jax.value_and_grad(loss, argnums=(0, 1, 2)),
            (x.reshape(-1, d), up, down, idx, gates))

  cfg = base_config()
  cfg.model.d_model = d
  if level == "dense":
    cfg.model.sublayer, cfg.model.ffn_dim = "dense", path  # path holds the width here
  else:
    cfg.model.sublayer = "omnimoe"
    a = cfg.atomic
    a.num_experts, a.top_k, a.path, a.router = n_exp, k, path, "product"
    a.shared_ffn_dim = FLAGS.shared_ffn
  layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  # The non-parameter state (BatchNorm running statistics) is an argument and is
  # copied into this trace before use, as the trainer does (train.py): the layer
  # updates it in train mode, and nnx mutates only variables of the current trace.
  # The updated state is returned, as in a train step.
  def loss(params, rest, x):
    rest = jax.tree.map(lambda v: v, rest)
    model = nnx.merge(graphdef, params, rest)
    y, aux = model(x, train=True)
    aux_loss = sum((v for name, v in aux.items() if name.startswith("loss/")), 0.0)
    return (jnp.mean(jnp.square(y.astype(jnp.float32))) + aux_loss,
            nnx.state(model, nnx.Not(nnx.Param)))

  return jax.value_and_grad(loss, argnums=(0, 2), has_aux=True), (params, rest, x)


def run_layer() -> dict:
  import jax
  import numpy as np

  d, tokens, shared = FLAGS.d_model, FLAGS.tokens, FLAGS.shared_ffn
  batch = 8 if tokens % 8 == 0 else 1
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens // batch, d))
  variants = []  # (level, path-or-width, N, k)
  widths = set()
  for n_exp in (int(v) for v in FLAGS.layer_experts):
    side = int(round(math.sqrt(n_exp)))
    assert side * side == n_exp, f"N={n_exp} is not a perfect square"
    for k in (int(v) for v in FLAGS.layer_top_k):
      for level in FLAGS.levels:
        for path in FLAGS.paths:
          variants.append((level, path, n_exp, k))
        widths.add(_dense_width(level, k, side, shared))
  variants += [("dense", w, 0, 0) for w in sorted(widths)]
  compiled, times, memory, once = {}, {}, {}, set()
  for v in variants:
    fn, args = _layer_step(*v, x)
    exe, memory[v] = _compile(fn, *args)
    first = common.time_once(exe, args)
    compiled[v] = (exe, args)
    times[v] = [first] if first > FLAGS.slow_limit_s else []
    if first > FLAGS.slow_limit_s:
      once.add(v)
    print(f"compiled {v}: first call {first:.2f}s, peak {common.mib(memory[v]['peak'])} MiB",
          flush=True)
  for _ in range(FLAGS.repeats):
    for v in variants:
      if v not in once:
        times[v].append(common.time_once(*compiled[v]))
  med = {v: float(np.median(t)) for v, t in times.items()}
  rows = []
  for v in variants:
    level, path, n_exp, k = v
    if level == "dense":
      continue
    side = int(round(math.sqrt(n_exp)))
    w = _dense_width(level, k, side, shared)
    dv = ("dense", w, 0, 0)
    routed_flops = 4 * k * d + (4 * side * d + 6 * d * shared if level == "layer" else 0)
    rows.append(dict(
        level=level, path=path, experts=n_exp, side=side, top_k=k,
        seconds=med[v], timed_once=v in once,
        dense_width=w, dense_seconds=med[dv], ratio_vs_dense=med[v] / med[dv],
        fwd_flops_per_token=routed_flops, dense_fwd_flops_per_token=6 * d * w,
        temp_bytes=memory[v]["temp"], peak_bytes=memory[v]["peak"],
        argument_bytes=memory[v]["argument"], output_bytes=memory[v]["output"],
        dense_temp_bytes=memory[dv]["temp"], dense_peak_bytes=memory[dv]["peak"]))
  dense = [dict(width=v[1], seconds=med[v], temp_bytes=memory[v]["temp"],
                peak_bytes=memory[v]["peak"], timed_once=v in once)
           for v in variants if v[0] == "dense"]
  return dict(rows=rows, dense=dense, batch=batch)


# ----------------------------------------------------------------------------- report


def _router_md(r) -> list[str]:
  s = r["summary"]
  lines = [
      "## 1. Router: log-softmax of two [T, n] logit vectors + top-k over the n x n grid", "",
      f"T={s['tokens']}, k={s['top_k']}, float32, jitted; median of --router_repeats calls "
      f"after a warm-up call (a call over --slow_limit_s is timed once). The full grid runs "
      f"over token chunks of at most {s['full_chunk_elems']:,} grid cells "
      f"({s['full_chunk_elems'] * 4 / 2**20:.0f} MiB float32) with lax.map; 'chunk' is the "
      "tokens per chunk. 'log-softmax only' is the O(n) part both share. "
      "Temp = XLA temporary buffer bytes of the compiled call.", "",
      "| N | n | product ms | full grid ms | log-softmax only ms | full chunk (tokens) | "
      "product temp MiB | full temp MiB |",
      "|---|---|---|---|---|---|---|---|"]
  for q in r["rows"]:
    full = common.ms(q.get("full_seconds")) if q.get("full_seconds") is not None else q.get(
        "full_note", "-")
    lines.append(
        f"| 2^{q['log2_experts']} | {q['side']} | {common.ms(q.get('product_seconds'))} | {full} | "
        f"{common.ms(q.get('log_softmax_seconds'))} | {q['full_chunk_tokens']} | "
        f"{common.mib(q.get('product_temp_bytes'))} | {common.mib(q.get('full_temp_bytes'))} |")
  base, top = s["base_experts"], s["max_experts"]
  lb, lt = int(round(math.log2(base))), int(round(math.log2(top)))

  def fmt(key):
    q, sl = s.get(f"{key}_ratio"), s.get(f"{key}_slope")
    return "not available" if q is None else f"{q:.2f}x (log-log slope {sl:.2f})"

  goal = s.get("product_ratio")
  verdict = "" if goal is None else (" - goal met" if goal <= 4.0 else " - goal NOT met")
  lines += [
      "",
      f"- product router, time at N=2^{lt} / at N=2^{lb}: **{fmt('product')}** "
      f"(goal: at most 4x){verdict}; N grows {top // base}x, n = sqrt(N) {int(math.sqrt(top // base))}x",
      f"- full grid, N=2^{lt} / N=2^{lb}: **{fmt('full')}** (linear in N would be "
      f"{top // base}x, slope 1)",
      f"- log-softmax only, N=2^{lt} / N=2^{lb}: {fmt('log_softmax')}"]
  m = s.get("full_ratio_measured")
  if m and m["hi"] != top:  # the full grid stopped short of the largest N
    lines.append(f"- full grid over the N it ran at, 2^{int(math.log2(m['hi']))} / "
                 f"2^{int(math.log2(m['lo']))}: {m['ratio']:.1f}x (slope {m['slope']:.2f})")
  lines.append("- slope = log(time ratio) / log(N ratio): 1 is linear in N, 0.5 linear in "
               "n = sqrt(N), 0 flat")
  return lines


def _layer_md(r, d, tokens, shared) -> list[str]:
  lines = [
      "## 2. Atomic experts forward+backward vs a dense SwiGLU of equal active FLOPs", "",
      f"T={tokens} (batch {r['batch']}), d={d}, float32; jit(value_and_grad(mean(y^2))); "
      f"median of --repeats interleaved rounds.",
      "- layer: the OmniMoE sublayer (router + BatchNorm + product top-k + atomic experts"
      + (f" + shared SwiGLU {shared}" if shared else ", no shared SwiGLU")
      + "), gradients w.r.t. x and all parameters; dense width "
      "w = round(2 (k + n) / 3)" + (f" + {shared}" if shared else "")
      + " (6 d w = 4 k d + 4 n d)",
      "- experts: atomic_ffn alone on fixed random routing, gradients w.r.t. x, U, V; "
      "dense width w = round(2 k / 3) (6 d w = 4 k d)",
      "- fwd FLOPs/token: analytic forward FLOPs per token of the routed variant; "
      "the dense one is 6 d w",
      "- peak = argument + output + temp - alias bytes of XLA's plan for the compiled "
      "forward+backward", "",
      "| level | N | k | path | ms | dense w | dense ms | x dense | fwd FLOPs/token "
      "(routed / dense) | temp MiB | peak MiB | dense peak MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for q in r["rows"]:
    note = " (timed once)" if q["timed_once"] else ""
    lines.append(
        f"| {q['level']} | 2^{int(round(math.log2(q['experts'])))} | {q['top_k']} | "
        f"{q['path']} | {common.ms(q['seconds'])}{note} | {q['dense_width']} | "
        f"{common.ms(q['dense_seconds'])} | {q['ratio_vs_dense']:.1f} | "
        f"{q['fwd_flops_per_token']:,} / {q['dense_fwd_flops_per_token']:,} | "
        f"{common.mib(q['temp_bytes'])} | {common.mib(q['peak_bytes'])} | "
        f"{common.mib(q['dense_peak_bytes'])} |")
  return lines


def main(argv):
  del argv
  _apply_quick()
  r = dict(config=dict(quick=FLAGS.quick, tokens=FLAGS.tokens, router_top_k=FLAGS.router_top_k,
                       router_sides=[int(s) for s in FLAGS.router_sides],
                       router_repeats=FLAGS.router_repeats,
                       full_chunk_elems=FLAGS.full_chunk_elems,
                       full_max_seconds=FLAGS.full_max_seconds, d_model=FLAGS.d_model,
                       layer_experts=[int(v) for v in FLAGS.layer_experts],
                       layer_top_k=[int(v) for v in FLAGS.layer_top_k], paths=FLAGS.paths,
                       levels=FLAGS.levels, shared_ffn=FLAGS.shared_ffn,
                       repeats=FLAGS.repeats, slow_limit_s=FLAGS.slow_limit_s))
  if not FLAGS.skip_router:
    r["router"] = run_router()
  if not FLAGS.skip_layer:
    r["layer"] = run_layer()
  r["environment"] = common.environment()
  lines = ["# Atomic experts: router scaling in N and layer cost vs dense", ""]
  lines += common.header_lines(r["environment"])
  if "router" in r:
    lines += [""] + _router_md(r["router"])
  if "layer" in r:
    lines += [""] + _layer_md(r["layer"], FLAGS.d_model, FLAGS.tokens, FLAGS.shared_ffn)
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", r)


if __name__ == "__main__":
  app.run(main)
