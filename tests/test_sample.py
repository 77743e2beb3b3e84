"""moejax.sample on a trained checkpoint: greedy output equals a naive loop that
recomputes the whole sequence per token, seeds reproduce, and every bad option
gets one sentence."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.generate import full_forward_logits
from moejax.sample import sample
from tests.helpers import run_module

QUIET = dict(say=lambda _: None)


def test_greedy_sample_equals_a_naive_recompute_loop(trained_tiny_run):
  from moejax.saved_run import SavedRun
  workdir, _ = trained_tiny_run
  out = sample(workdir, "ab", max_new_tokens=12, temperature=0.0, **QUIET)
  run = SavedRun.load(workdir, one_device=True, **QUIET)
  tok = run.data.tokenizer
  ids = [tok.bos_id] + tok.encode("ab")
  # A fixed-length buffer, so the forward pass compiles once; causality makes the
  # logits at position t independent of the zeros after it.
  buffer = np.zeros((1, len(ids) + 12), np.int32)
  buffer[0, :len(ids)] = ids
  with run.use_mesh():
    for t in range(len(ids), len(ids) + 12):
      logits = full_forward_logits(run.graphdef, run.params, run.model_state,
                                   jnp.asarray(buffer))
      buffer[0, t] = int(jnp.argmax(logits[0, t - 1]))
  new = list(buffer[0, 3:])
  if tok.bos_id in new:
    new = new[:new.index(tok.bos_id)]
  assert out["samples"] == [tok.decode(new)]
  assert out["step"] == 8


def test_seeds_reproduce_and_differ(trained_tiny_run):
  workdir, _ = trained_tiny_run
  kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, num_samples=2, **QUIET)
  a = sample(workdir, "x", seed=1, **kw)["samples"]
  assert a == sample(workdir, "x", seed=1, **kw)["samples"]
  assert a != sample(workdir, "x", seed=2, **kw)["samples"]
  assert len(a) == 2 and a[0] != a[1]


@pytest.mark.parametrize("options,message", [
    (dict(temperature=-1.0), "--temperature=-1.0 must be >= 0"),
    (dict(top_k=300), r"--top_k=300 must lie in \[0, 264\]"),
    (dict(top_p=0.0), r"--top_p=0.0 must lie in \(0, 1\]"),
    (dict(num_samples=0), "--num_samples=0 must be at least 1"),
    (dict(max_new_tokens=0), "--max_new_tokens=0 must be at least 1"),
    (dict(max_new_tokens=1021), "exceeds the model's context of 1024 tokens; use "
                                "--max_new_tokens=1020 or less"),
])
def test_out_of_range_options_get_one_sentence(trained_tiny_run, options, message):
  workdir, _ = trained_tiny_run
  with pytest.raises(ConfigError, match=message):
    sample(workdir, "abc", **{"max_new_tokens": 4, **options}, **QUIET)


def test_a_prompt_longer_than_the_context_is_refused(trained_tiny_run):
  workdir, _ = trained_tiny_run
  with pytest.raises(ConfigError, match="the model's context is model.max_seq_len = 1024"):
    sample(workdir, "z" * 1100, max_new_tokens=4, **QUIET)


def test_command_line_prints_and_writes_samples(trained_tiny_run, tmp_path):
  workdir, _ = trained_tiny_run
  out = tmp_path / "samples.json"
  r = run_module("moejax.sample", [f"--workdir={workdir}", "--prompt=hi",
                                   "--max_new_tokens=8", "--num_samples=2",
                                   f"--output={out}"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--- sample 0 (step 8) ---" in r.stdout and "--- sample 1" in r.stdout
  saved = json.loads(out.read_text())
  assert len(saved["samples"]) == 2 and saved["options"]["max_new_tokens"] == 8
  r = run_module("moejax.sample", [f"--workdir={workdir}", "--top_p=2"])
  assert r.returncode == 2 and "Traceback" not in r.stderr
  lines = [l for l in r.stderr.splitlines() if l.startswith("sample error:")]
  assert len(lines) == 1 and "--top_p=2.0 must lie in (0, 1]" in lines[0]
