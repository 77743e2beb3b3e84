"""moejax.evaluate: a checkpoint scored on any split of any dataset, writing only
RUN/eval/*.json. References: the trainer's own final evaluation, a naive
per-document loop over the same windows, and bits per byte = loss / ln 2 for the
byte tokenizer."""

import hashlib
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.evaluate import evaluate_run
from tests.conftest import TRAINED_STEPS as STEPS
from tests.helpers import run_module


def _tree_digest(root) -> dict:
  """sha256 of every file under root, by relative path."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture
def trained(trained_tiny_run):
  return trained_tiny_run


def test_equals_the_trainers_final_evaluation_and_changes_nothing(trained):
  workdir, final = trained
  before = _tree_digest(workdir)
  on_mesh = evaluate_run(workdir, max_batches=2, say=lambda _: None)
  one = evaluate_run(workdir, max_batches=2, one_device=True, say=lambda _: None)
  for record in (on_mesh, one):
    assert record["step"] == STEPS and record["split"] == "validation"
    assert record["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert record["eval/bits_per_byte"] == pytest.approx(final["eval/bits_per_byte"],
                                                         rel=1e-5)
  assert on_mesh["devices"].startswith("8 x") and one["devices"].startswith("1 x")
  path = os.path.join(workdir, "eval", f"synthetic-validation-step{STEPS}.json")
  assert on_mesh["path"] == path
  with open(path) as f:
    assert json.load(f)["eval/loss"] == one["eval/loss"]
  after = _tree_digest(workdir)
  assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before


def _naive_loss(model, stream, seq_len, windows, bos):
  """Mean NLL over the listed windows of the stream, each document piece of a
  window run through the model alone (positions from 0), BOS targets skipped."""
  nll, count = 0.0, 0
  for w in windows:
    window = np.asarray(stream[w * seq_len: w * seq_len + seq_len + 1]).astype(np.int32)
    inputs, targets = window[:-1], window[1:]
    starts = [0] + [t for t in range(1, seq_len) if inputs[t] == bos] + [seq_len]
    for a, b in zip(starts[:-1], starts[1:]):
      logits, _ = model(jnp.asarray(inputs[None, a:b]), train=False)
      logp = np.asarray(logits[0], np.float64)
      logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logp.max(-1, keepdims=True)
      for t in range(b - a):
        if targets[a + t] != bos:
          nll -= logp[t, targets[a + t]]
          count += 1
  return nll / count


def test_an_earlier_step_matches_a_naive_per_document_loop(trained):
  from moejax.data import synthetic
  from moejax.saved_run import SavedRun
  workdir, _ = trained
  record = evaluate_run(workdir, step=4, batch_size=2, max_batches=3, one_device=True,
                        say=lambda _: None)
  assert record["step"] == 4 and record["batches"] == 3 and not record["whole_split"]
  run = SavedRun.load(workdir, step=4, one_device=True, say=lambda _: None)
  stream = synthetic.stream("eval")
  seq_len = run.cfg.data.seq_len
  # 3 batches of 2 = 6 windows spread evenly over the split's (len - 1) // seq_len
  last = (len(stream) - 1) // seq_len - 1
  windows = [round(i * last / 5) for i in range(6)]
  with run.use_mesh():
    want = _naive_loss(run.model(), stream, seq_len, windows, run.data.tokenizer.bos_id)
  assert record["eval/loss"] == pytest.approx(want, rel=1e-5)
  assert record["eval/perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_another_dataset_is_read_with_the_runs_tokenizer(trained):
  """A run trained on the synthetic stream, scored on the embedded corpus: byte
  tokens, so bits per byte is the loss in bits."""
  workdir, _ = trained
  record = evaluate_run(workdir, dataset="stdlib_source", max_batches=2,
                        say=lambda _: None)
  assert record["dataset"]["name"] == "stdlib_source"
  assert record["dataset"]["tokenizer_fingerprint"] == "bytes-v1"
  assert record["trained_on"] == "synthetic" and record["eval/tokens"] > 0
  assert record["eval/bits_per_byte"] == pytest.approx(record["eval/loss"] / math.log(2),
                                                       rel=1e-6)
  assert os.path.exists(os.path.join(workdir, "eval",
                                     f"stdlib_source-validation-step{STEPS}.json"))


def test_bad_requests_get_one_sentence(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    evaluate_run(str(tmp_path), say=lambda _: None)
  with pytest.raises(ConfigError, match=r"no checkpoint at step 5; it has steps \[4, 8\]"):
    evaluate_run(workdir, step=5, say=lambda _: None)
  with pytest.raises(ConfigError, match="does not exist"):
    evaluate_run(str(tmp_path / "nowhere"), say=lambda _: None)
  with pytest.raises(ConfigError, match="not divisible by the 8 batch shards"):
    evaluate_run(workdir, batch_size=4, say=lambda _: None)


def test_command_line_reports_errors_without_a_traceback(tmp_path):
  r = run_module("moejax.evaluate", [f"--workdir={tmp_path}"])
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("evaluate error:")]
  assert len(lines) == 1 and "holds no checkpoint" in lines[0]
  assert "Traceback" not in r.stderr
