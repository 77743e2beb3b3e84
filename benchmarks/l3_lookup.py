"""L3 lookup layer: its cost against a dense SwiGLU, and host-resident tables at evaluation.

Part 1, layer. Forward+backward (jit(value_and_grad) of mean(y^2), gradients
w.r.t. x and all parameters) of one L3 layer (moejax/papers/l3/layer.py) with
path=padded and path=sorted, against a dense SwiGLU with the same active
parameters per token as l3_budget (moejax/papers/l3/budget.py) counts them (the max_rows_per_token
rows a token may read, W_up, W_mix, norms): width w = round(active / (3 d)).
Token ids are the first eval batch of the embedded corpus (sentencepiece 2048),
rows are allocated by LZW over its training tokens, as in configs/l3.py:lzw_tiny.
Shapes (--layer_shapes):
  tiny   d 128, rows 8,192, max_rows 32, emb = up = 128, 32 x 128 tokens
  large  d 512, rows 65,536, max_rows 64, emb = up = 512, 8 x 512 tokens
Memory is XLA's plan of the compiled call (temp; peak = argument + output +
temp - alias). Variants are timed interleaved, median of --repeats rounds.

Part 2, host tables. The configs/l3.py:lzw_tiny model (untrained, W_mix random
so the read reaches the logits) evaluates batches of the eval stream at the
shapes of --host_shapes, once with its tables on device and once with
moejax/papers/l3/host.py: per batch the distinct ids' rows are gathered on the host,
padded to a power-of-two bucket and put on the device. Reported per shape
(mean over --host_batches batches, each the median of --repeats rounds): rows
and bytes shipped, the fraction of the table, host gather and transfer ms, and
the forward time against the device-resident forward of the same batch. On a
CPU backend the "transfer" is a host-to-host copy, not PCIe.

  python benchmarks/l3_lookup.py --out=benchmarks/results/l3_lookup_cpu.md
  python benchmarks/l3_lookup.py --quick          # smoke run
"""

import os
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_bool("quick", False, "Smoke run: tiny layer shape, two host shapes, one repeat.")
flags.DEFINE_list("layer_shapes", ["tiny", "large"], "Part 1 shapes (see the docstring).")
flags.DEFINE_list("paths", ["padded", "sorted"], "L3 lookup paths of part 1.")
flags.DEFINE_list("host_shapes", ["1x1", "1x128", "8x128", "32x128"],
                  "Part 2 batch shapes, BATCHxSEQ (SEQ <= 128).")
flags.DEFINE_integer("host_batches", 8, "Distinct eval batches per part 2 shape.")
flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds (median).")
flags.DEFINE_float("slow_limit_s", 10.0,
                   "A part 1 variant slower than this per call is timed once.")
flags.DEFINE_bool("skip_layer", False, "Skip part 1.")
flags.DEFINE_bool("skip_host", False, "Skip part 2.")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS

SHAPES = {
    "tiny": dict(d=128, rows=8192, max_rows=32, emb=128, batch=32, seq=128),
    "large": dict(d=512, rows=65536, max_rows=64, emb=512, batch=8, seq=512),
}


def _apply_quick():
  if FLAGS.quick:
    FLAGS.layer_shapes = ["tiny"]
    FLAGS.host_shapes = ["1x1", "8x128"]
    FLAGS.host_batches = 2
    FLAGS.repeats = 1


def _preset():
  """configs/l3.py:lzw_tiny, with its data prepared (built once if missing)."""
  from configs.l3 import get_config
  from moejax import data as data_lib
  cfg = get_config("lzw_tiny")
  data_lib.prepare(cfg.data)
  return cfg, data_lib.vocab_size(cfg.data)


def _eval_inputs(cfg, batch, seq, count=1):
  """The first `count` eval batches' inputs, [batch, seq] int32 each."""
  from moejax import data as data_lib
  it = data_lib.make_eval_iterator(cfg.data, seq_len=seq, global_batch=batch)
  return [b["inputs"] for b in it.iter_eval(count)]


def _randomize_w_mix(params, seed=0):
  """W_mix starts at zero; a random one keeps every path of the layer live."""
  import numpy as np
  from flax import nnx
  rng = np.random.default_rng(seed)
  pairs = [(k, v.replace((0.02 * rng.normal(size=v.shape)).astype(v.dtype))
            if k[-1] == "w_mix" else v) for k, v in params.flat_state()]
  return nnx.State.from_flat_path(pairs)


# ----------------------------------------------------------------------------- part 1


def _dense_width(cfg) -> int:
  """SwiGLU width with the L3 layer's active parameters: 3 d w = active."""
  from moejax.papers.l3.budget import l3_budget
  active = l3_budget(cfg)["active_params"]
  return max(1, round(active / (3 * cfg.model.d_model)))


def _layer_step(kind, cfg, counts, x, ids):
  """(fn, args) of one forward+backward variant: kind is an L3 path or "dense"."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moejax.model import sublayers
  from moejax.papers.l3.layer import L3Layer

  cfg = cfg.copy_and_resolve_references()
  if kind == "dense":
    cfg.model.sublayer, cfg.model.ffn_dim = "dense", _dense_width(cfg)
    layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
  else:
    cfg.l3.path = kind
    layer = L3Layer(cfg, 2, counts, nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  params = _randomize_w_mix(params)

  def loss(params, rest, x, ids):
    y, _ = nnx.merge(graphdef, params, rest)(x, token_ids=ids, train=True)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  return jax.value_and_grad(loss, argnums=(0, 2)), (params, rest, x, ids)


def run_layer() -> dict:
  import jax
  import numpy as np

  from moejax.papers.l3 import allocation as l3_allocation

  base, vocab = _preset()
  out = []
  for name in FLAGS.layer_shapes:
    s = SHAPES[name]
    cfg = base.copy_and_resolve_references()
    cfg.model.d_model = s["d"]
    l3 = cfg.l3
    l3.rows, l3.max_rows_per_token, l3.emb_dim, l3.up_dim = (
        s["rows"], s["max_rows"], s["emb"], s["emb"])
    counts = l3_allocation.load_or_build(cfg.data, l3, vocab)
    ids = _eval_inputs(cfg, s["batch"], s["seq"])[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (s["batch"], s["seq"], s["d"]))
    kinds = list(FLAGS.paths) + ["dense"]
    compiled, memory, times, once = {}, {}, {}, set()
    for kind in kinds:
      fn, args = _layer_step(kind, cfg, counts, x, ids)
      exe = jax.jit(fn).lower(*args).compile()
      memory[kind] = common.memory_bytes(exe)
      first = common.time_once(exe, args)
      compiled[kind] = (exe, args)
      times[kind] = [first] if first > FLAGS.slow_limit_s else []
      if first > FLAGS.slow_limit_s:
        once.add(kind)
      print(f"layer {name} {kind}: first call {first:.2f}s, temp "
            f"{common.mib(memory[kind]['temp'])} MiB", flush=True)
    for _ in range(FLAGS.repeats):
      for kind in kinds:
        if kind not in once:
          times[kind].append(common.time_once(*compiled[kind]))
    med = {k: float(np.median(t)) for k, t in times.items()}
    read = counts[np.asarray(ids).reshape(-1)]
    out.append(dict(
        shape=name, **s, tokens=s["batch"] * s["seq"], dense_width=_dense_width(cfg),
        mean_rows_read=float(read.mean()), distinct_ids=int(np.unique(ids).size),
        variants=[dict(kind=k, seconds=med[k], ratio_vs_dense=med[k] / med["dense"],
                       timed_once=k in once, **{f"{m}_bytes": memory[k][m] for m in
                                                 ("argument", "output", "temp", "peak")})
                  for k in kinds]))
  return dict(shapes=out)


# ----------------------------------------------------------------------------- part 2


def run_host() -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from moejax.papers.l3 import allocation as l3_allocation
  from moejax.papers.l3.host import HostTables, make_forward
  from moejax.model.transformer import Transformer

  cfg, vocab = _preset()
  counts = l3_allocation.load_or_build(cfg.data, cfg.l3, vocab)
  model = Transformer(cfg, vocab, nnx.Rngs(params=cfg.seed), inputs={"l3": counts})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = _randomize_w_mix(params)
  forward = make_forward(graphdef)
  host = HostTables.from_state(params, rest)
  table_bytes = sum(t.nbytes for l in host.layers for t in l.tables.values())
  shapes = [tuple(int(v) for v in s.split("x")) for s in FLAGS.host_shapes]
  full = _eval_inputs(cfg, max(b for b, _ in shapes), 128, FLAGS.host_batches)
  out = []
  for b, s in shapes:
    if (b, s) == (1, 1):  # decoding: consecutive tokens of one sequence
      batches = [full[0][:1, i:i + 1] for i in range(FLAGS.host_batches)]
    else:
      batches = [x[:b, :s] for x in full]
    for tokens in batches:  # compile every shape and bucket before timing
      jax.block_until_ready(forward(params, rest, tokens))
      jax.block_until_ready(forward(*host.batch_state(tokens), tokens))
    dev = [[] for _ in batches]
    hst = [dict(gather=[], transfer=[], forward=[]) for _ in batches]
    ship = [None] * len(batches)
    for _ in range(FLAGS.repeats):
      for i, tokens in enumerate(batches):
        dev[i].append(common.time_once(forward, (params, rest, tokens)))
        state = host.batch_state(tokens)
        ship[i] = host.last
        hst[i]["gather"].append(ship[i].gather_s)
        hst[i]["transfer"].append(ship[i].transfer_s)
        hst[i]["forward"].append(common.time_once(forward, (*state, tokens)))
        del state
    med = lambda xs: float(np.median(xs))
    dev_s = float(np.mean([med(t) for t in dev]))
    g, t, f = (float(np.mean([med(h[k]) for h in hst])) for k in ("gather", "transfer",
                                                                  "forward"))
    out.append(dict(
        batch=b, seq=s, batches=len(batches),
        distinct_ids=float(np.mean([x.distinct_ids for x in ship])),
        rows=float(np.mean([x.rows for x in ship])),
        bucket_rows=float(np.mean([x.bucket_rows for x in ship])),
        buckets=sorted({x.bucket_rows for x in ship}),
        table_rows=host.table_rows,
        fraction=float(np.mean([x.fraction for x in ship])),
        bytes=float(np.mean([x.bytes for x in ship])),
        gather_seconds=g, transfer_seconds=t, host_forward_seconds=f,
        device_forward_seconds=dev_s, forward_ratio=f / dev_s,
        total_ratio=(g + t + f) / dev_s))
    print(f"host {b}x{s}: {out[-1]['bucket_rows']:.0f} rows shipped "
          f"({out[-1]['fraction']:.1%}), gather {g * 1e3:.2f} ms, transfer "
          f"{t * 1e3:.2f} ms, forward {f * 1e3:.2f} ms vs device {dev_s * 1e3:.2f} ms",
          flush=True)
  return dict(rows=out, table_rows=host.table_rows, table_bytes=table_bytes,
              layers=len(host.layers), min_bucket=host.min_rows, vocab=vocab,
              l3=dict(rows=cfg.l3.rows, max_rows=cfg.l3.max_rows_per_token,
                      after_layers=list(cfg.l3.after_layers), d_model=cfg.model.d_model))


# ----------------------------------------------------------------------------- report


def _kib(b):
  return f"{b / 1024:,.1f}"


def _layer_md(r) -> list[str]:
  lines = [
      "## 1. L3 layer forward+backward vs a dense SwiGLU of the same active parameters", "",
      "jit(value_and_grad(mean(y^2))) w.r.t. x and all parameters, float32; median of "
      "--repeats interleaved rounds. Dense width w = round(active / (3 d)), active = "
      "l3_budget's active params (max_rows rows of K and V, W_up, W_mix, norms). "
      "Token ids: the first eval batch of the corpus; rows: LZW allocation. 'rows read' "
      "is the mean count of the batch's ids (the padded path computes max_rows for every "
      "token). Memory: XLA's plan (peak = argument + output + temp - alias).", "",
      "| shape | tokens | d | rows | max_rows | rows read (mean) | variant | ms | x dense | "
      "temp MiB | peak MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in r["shapes"]:
    for v in s["variants"]:
      kind = f"dense w={s['dense_width']}" if v["kind"] == "dense" else v["kind"]
      note = " (timed once)" if v["timed_once"] else ""
      lines.append(
          f"| {s['shape']} | {s['batch']}x{s['seq']} | {s['d']} | {s['rows']:,} | "
          f"{s['max_rows']} | {s['mean_rows_read']:.1f} | {kind} | {common.ms(v['seconds'])}{note} "
          f"| {v['ratio_vs_dense']:.1f} | {common.mib(v['temp_bytes'])} | "
          f"{common.mib(v['peak_bytes'])} |")
  return lines


def _host_md(r) -> list[str]:
  l3 = r["l3"]
  lines = [
      "## 2. Evaluation with the L3 tables in host memory (moejax/papers/l3/host.py)", "",
      f"configs/l3.py:lzw_tiny model (d {l3['d_model']}, vocab {r['vocab']}, L3 after "
      f"layers {tuple(l3['after_layers'])}: {r['layers']} table(s) of {l3['rows']:,} rows, "
      f"max_rows {l3['max_rows']}; {r['table_bytes'] / 2**20:.1f} MiB of keys + values in "
      f"all). Eval-stream batches (1x1: consecutive tokens of one sequence, as in "
      f"decoding); smallest bucket {r['min_bucket']} rows. Per shape: mean over the "
      "batches of each batch's median over --repeats rounds. 'device fwd' is the "
      "forward with the full tables on device; 'host fwd' the same jitted forward on the "
      "compact tables; 'total' = (gather + transfer + host fwd) / device fwd. "
      "On CPU the transfer is a host-to-host copy, not PCIe.", "",
      "| batch | distinct ids | rows needed | rows shipped (bucket) | of table | KiB shipped | "
      "gather ms | transfer ms | device fwd ms | host fwd ms | host fwd / device | total / "
      "device |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for q in r["rows"]:
    lines.append(
        f"| {q['batch']}x{q['seq']} | {q['distinct_ids']:.0f} | {q['rows']:,.0f} | "
        f"{q['bucket_rows']:,.0f} | {q['fraction']:.1%} | {_kib(q['bytes'])} | "
        f"{common.ms(q['gather_seconds'])} | {common.ms(q['transfer_seconds'])} | "
        f"{common.ms(q['device_forward_seconds'])} | {common.ms(q['host_forward_seconds'])} | "
        f"{q['forward_ratio']:.2f} | {q['total_ratio']:.2f} |")
  lines += ["", "- buckets seen (rows, summed over layers): " + "; ".join(
      f"{q['batch']}x{q['seq']}: {', '.join(str(b) for b in q['buckets'])}"
      for q in r["rows"]),
            f"- L3 table bytes on device: {r['table_bytes'] / 2**10:,.0f} KiB resident "
            "with device tables; with host tables only the batch's compact tables "
            "('KiB shipped', freed after the batch)",
            "- rows shipped is the mean bucket size over the batches (a bucket is a power "
            "of two, at least the next one above max_rows, at most the whole table)"]
  return lines


def main(argv):
  del argv
  _apply_quick()
  r = dict(config=dict(quick=FLAGS.quick, layer_shapes=FLAGS.layer_shapes,
                       paths=FLAGS.paths, host_shapes=FLAGS.host_shapes,
                       host_batches=FLAGS.host_batches, repeats=FLAGS.repeats,
                       slow_limit_s=FLAGS.slow_limit_s))
  start = time.time()
  if not FLAGS.skip_layer:
    r["layer"] = run_layer()
  if not FLAGS.skip_host:
    r["host"] = run_host()
  r["wall_seconds"] = time.time() - start
  r["environment"] = common.environment()
  lines = ["# L3 lookup: layer cost vs dense, and host-resident tables at evaluation", ""]
  lines += common.header_lines(r["environment"])
  lines.append("- the CPU is shared with other jobs: compare ratios within this run, "
               "not absolute times across runs")
  if "layer" in r:
    lines += [""] + _layer_md(r["layer"])
  if "host" in r:
    lines += [""] + _host_md(r["host"])
  common.write_results(FLAGS.out, "\n".join(lines) + "\n", r)


if __name__ == "__main__":
  app.run(main)
