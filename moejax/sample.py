"""Sample text from a trained run.

  python3 -m moejax.sample --workdir=runs/dense_tiny --prompt="def main(" \
      --max_new_tokens=200 --temperature=0.8 --top_k=40 --num_samples=3

Restores the latest checkpoint (or --step) with the run's own config and
tokenizer on one device, in evaluation mode (dropless routing, BatchNorm
running statistics), prefixes the prompt with BOS as in training, and draws
tokens with a KV cache (moejax/generate.py). A sample ends early if it draws
BOS, which separates documents in training. Prints each sample; --output
writes them with the options as JSON. Nothing in the workdir changes.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS


def sample(workdir: str, prompt: str, *, step=None, max_new_tokens=200, temperature=0.8,
           top_k=0, top_p=1.0, seed=0, num_samples=1, say=print) -> dict:
  """Draws `num_samples` continuations of `prompt` -> dict(samples=[str], ...)."""
  from moejax.errors import ConfigError
  from moejax.generate import Generator, check_sampling_options
  from moejax.saved_run import SavedRun

  run = SavedRun.load(workdir, step=step, one_device=True, say=say)
  tokenizer = run.data.tokenizer
  check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens, num_samples=num_samples,
                         vocab_size=tokenizer.vocab_size)
  prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  context = int(run.cfg.model.max_seq_len)
  if len(prompt_ids) >= context:
    raise ConfigError(f"The prompt is {len(prompt_ids)} tokens (BOS included), but the "
                      f"model's context is model.max_seq_len = {context}; shorten it.")
  if len(prompt_ids) + max_new_tokens > context:
    raise ConfigError(
        f"The prompt ({len(prompt_ids)} tokens) plus --max_new_tokens={max_new_tokens} "
        f"exceeds the model's context of {context} tokens; use --max_new_tokens="
        f"{context - len(prompt_ids)} or less.")
  trained = int(run.cfg.data.seq_len)
  if len(prompt_ids) + max_new_tokens > trained:
    say(f"note: the model was trained on sequences of {trained} tokens; positions past "
        "that were never seen in training.")
  with run.use_mesh():
    gen = Generator(run.graphdef, run.params, run.model_state,
                    max_len=len(prompt_ids) + max_new_tokens)
    start = time.time()
    tokens = gen.generate(prompt_ids, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          num_samples=num_samples)
    seconds = time.time() - start
  samples = []
  for row in tokens.tolist():
    if tokenizer.bos_id in row:
      row = row[:row.index(tokenizer.bos_id)]
    samples.append(tokenizer.decode(row))
  return dict(workdir=run.workdir, step=run.step, prompt=prompt, samples=samples,
              options=dict(max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, num_samples=num_samples),
              seconds=round(seconds, 3),
              tokens_per_s=round(num_samples * max_new_tokens / max(seconds, 1e-9), 1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moejax.errors import ConfigError
  from moejax.metrics import write_json
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    result = sample(FLAGS.workdir, FLAGS.prompt, step=FLAGS.step,
                    max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                    num_samples=FLAGS.num_samples,
                    say=lambda m: print(m, file=sys.stderr, flush=True))
  except ConfigError as e:
    print(f"sample error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  for i, text in enumerate(result["samples"]):
    print(f"--- sample {i} (step {result['step']}) ---")
    print(result["prompt"] + text)
  print(f"({result['options']['num_samples']} x {result['options']['max_new_tokens']} "
        f"tokens in {result['seconds']:.2f} s, {result['tokens_per_s']:,.1f} tokens/s "
        "including compilation)", file=sys.stderr)
  if FLAGS.output:
    write_json(FLAGS.output, result)


def define_flags():
  """The command line; defined only when run as a program, so that importing
  this module next to another command's module does not clash."""
  flags.DEFINE_string("workdir", None, "The training run's directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("prompt", "", "Text to continue (BOS is put before it).")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to draw per sample.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens reaching this "
                     "probability mass (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("num_samples", 1, "Samples drawn at once (one batch).")
  flags.DEFINE_string("output", "", "Also write the samples and options to this JSON file.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
