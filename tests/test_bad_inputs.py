"""Bad command lines through run.py's real entry point: each exits 2 with one
line saying what to change, no traceback, and leaves no workdir behind. The
processes run side by side (each stops before any training)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# (arguments, a phrase the one line must contain)
CASES = [
    (["--config=configs/nope.py"], "no such config file"),
    (["--config=configs/moe.py:mixtral_huge"], "e.g. --config=configs/moe.py:mixtral_tiny"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.train.steps=1.5"], "--config.train.steps=1.5"),
    (["--config.model.tie_embeddings=maybe"], "--config.model.tie_embeddings=maybe"),
    (["--config.moe.top_k=2.5"], "--config.moe.top_k=2.5"),
    (["--config.train.stepz=3"], "stepz"),
    (["--nosuchflag"], "Unknown command line flag 'nosuchflag'"),
    (["--scale=huge"], "--scale=huge"),
    (["configs/dense.py:tiny"], "unexpected argument 'configs/dense.py:tiny'"),
    (["--config.seed=-1"], "--config.seed=-1 must be an integer"),
    (["--config.train.global_batch=0"], "global_batch"),
    (["--config.model.num_kv_heads=3"], "num_kv_heads"),
    (["--config.data.tokenizer=words"], "tokenizer"),
    (["--config.data.name=files"], "needs --config.data.files"),
    (["--config.data.name=files", "--config.data.files=/nonexistent/*.txt"], "matches no file"),
    (["--experiment=nope"], "Unknown experiment 'nope'"),
    (["--sweep_index=1"], "--sweep_index and --set apply to an experiment"),
    (["--workdir=gs://bucket/run"], "bucket URL"),
    (["--profile_steps=5:2"], "--profile_steps=5:2 must be A:B with 1 <= A < B"),
    (["--num_processes=2", "--process_id=0"], "--num_processes=2 needs the coordinator"),
    (["--jax_distributed=on"], "--jax_distributed=on found no cluster to join"),
    (["--config.debug.peak_tflops=-1"], "peak_tflops"),
]


def test_every_bad_command_line_is_one_sentence_and_leaves_nothing(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  procs = []
  for i, (args, _) in enumerate(CASES):
    workdir = tmp_path / f"w{i}"
    extra = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={workdir}"]
    procs.append((workdir, subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "run.py"), *args, *extra], cwd=str(tmp_path),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  failures = []
  for (args, phrase), (workdir, proc) in zip(CASES, procs):
    _, err = proc.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.startswith("config error:")]
    if (proc.returncode != 2 or len(lines) != 1 or phrase not in lines[0]
        or "Traceback" in err or workdir.exists()):
      failures.append(f"{args}: exit {proc.returncode}, {err.strip()[-400:]!r}")
  assert not failures, "\n".join(failures)
