"""Decoding speed: KV-cached generation against recomputing the whole prefix.

  python3 benchmarks/decode.py --out=benchmarks/results/decode_cpu.md

For each length N (64, 256, 1024 generated tokens after a 16-token prompt), in
one process and interleaved (cached, recompute, cached, recompute, ...):
  cached     moejax.generate.Generator: one prefill, then one jitted step per
             token that reads and extends the KV cache;
  recompute  no cache: at each step the jitted evaluation forward pass runs over
             a buffer of prompt + N positions (fixed shape, so it compiles
             once; positions after the current one are masked by causality and
             their logits ignored), and the next token is the argmax there.
Both decode greedily from the same randomly initialised model, so they must
produce the same tokens; the benchmark checks that. Times exclude compilation
(one warm-up of each per length) and are the median of --repeats.
"""

import os
import statistics
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

flags.DEFINE_string("config", "configs/dense.py:tiny", "Model preset (a path.py:preset spec).")
flags.DEFINE_list("lengths", ["64", "256", "1024"], "Generated tokens per measurement.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens (BOS included).")
flags.DEFINE_integer("batch", 1, "Sequences decoded at once.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of each arm per length (median).")
flags.DEFINE_string("out", "", "Write results here (.md, with a .json beside it).")
FLAGS = flags.FLAGS


def build(spec: str, max_len: int):
  from flax import nnx

  from moejax import data as data_lib
  from moejax.config.files import load_config
  from moejax.model.transformer import Transformer
  from moejax.train import model_inputs
  cfg = load_config(spec)
  cfg.model.max_seq_len = max(cfg.model.max_seq_len, max_len)
  vocab = data_lib.vocab_size(cfg.data)
  inputs = model_inputs(cfg, None, vocab, shapes_only=True, say=lambda _: None)
  model = Transformer(cfg, vocab, nnx.Rngs(params=0), inputs=inputs)
  return cfg, vocab, nnx.split(model, nnx.Param, ...)


def recompute_generate(forward, parts, prompt, new_tokens: int):
  """Greedy decoding without a cache: the whole buffer through the model per token."""
  import jax.numpy as jnp
  import numpy as np
  batch, prompt_len = prompt.shape
  buffer = np.zeros((batch, prompt_len + new_tokens), np.int32)
  buffer[:, :prompt_len] = prompt
  for t in range(prompt_len, prompt_len + new_tokens):
    logits = forward(*parts, jnp.asarray(buffer))
    buffer[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
  return buffer[:, prompt_len:]


def measure(spec: str, lengths, prompt_len: int, batch: int, repeats: int) -> tuple:
  import numpy as np

  from moejax.generate import Generator, full_forward_logits
  cfg, vocab, parts = build(spec, prompt_len + max(lengths))
  prompt = np.random.default_rng(0).integers(0, vocab, (batch, prompt_len)).astype(np.int32)
  rows = []
  for n in lengths:
    gen = Generator(*parts, max_len=prompt_len + n)

    def cached():
      return gen.generate(list(prompt[0]), max_new_tokens=n, temperature=0.0,
                          num_samples=batch)

    def recompute():
      return recompute_generate(full_forward_logits, parts, prompt, n)

    same = bool(np.array_equal(cached(), recompute()))  # warm-up and check
    times = {"cached": [], "recompute": []}
    for _ in range(repeats):
      for name, fn in (("cached", cached), ("recompute", recompute)):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    row = dict(new_tokens=n, same_tokens=same,
               **{f"{k}_s": statistics.median(v) for k, v in times.items()})
    row["cached_tokens_per_s"] = batch * n / row["cached_s"]
    row["recompute_tokens_per_s"] = batch * n / row["recompute_s"]
    row["speedup"] = row["recompute_s"] / row["cached_s"]
    rows.append(row)
    print(f"N={n}: cached {row['cached_tokens_per_s']:,.0f} tok/s, recompute "
          f"{row['recompute_tokens_per_s']:,.0f} tok/s ({row['speedup']:.1f}x), "
          f"same tokens {same}", flush=True)
  return cfg, rows


def main(argv):
  del argv
  lengths = [int(n) for n in FLAGS.lengths]
  cfg, rows = measure(FLAGS.config, lengths, FLAGS.prompt_len, FLAGS.batch, FLAGS.repeats)
  env = common.environment("devices", "platform", "cpu", "cores", "jax", "flax", "python",
                           "date", "command")
  m = cfg.model
  lines = [f"# Decoding: KV cache vs recomputing the prefix ({FLAGS.config})", "",
           *common.header_lines(env),
           f"- model: {m.num_layers} layers, d_model {m.d_model}, {m.sublayer} FFN; "
           f"prompt {FLAGS.prompt_len} tokens, batch {FLAGS.batch}, greedy", "",
           "| new tokens | cached tok/s | recompute tok/s | cached speedup | same tokens |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['new_tokens']} | {r['cached_tokens_per_s']:,.0f} | "
                 f"{r['recompute_tokens_per_s']:,.1f} | {r['speedup']:.1f}x | "
                 f"{'yes' if r['same_tokens'] else 'NO'} |")
  lines += ["", "Median of "
            f"{FLAGS.repeats} interleaved repeats after one warm-up each; tokens/s "
            "counts generated tokens over the whole generation (prefill included). "
            "Recompute runs the full evaluation forward pass over the fixed "
            "prompt + N buffer at every step."]
  common.write_results(FLAGS.out, "\n".join(lines) + "\n",
                       dict(env, config=FLAGS.config, prompt_len=FLAGS.prompt_len,
                            batch=FLAGS.batch, rows=rows))


if __name__ == "__main__":
  app.run(main)
