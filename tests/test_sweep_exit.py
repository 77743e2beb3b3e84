"""A sweep row that fails after its checkpointer opened (a NaN at step 3): run.py
prints the summary and exits 1 (the process does not hang on Orbax's threads),
and the same row, fixed, runs again on the next launch and exits 0."""

import pytest

from tests.helpers import run_py

FAST = ["--set=data.name=synthetic", "--set=data.tokenizer=byte", "--set=train.steps=6",
        "--set=train.warmup_steps=1", "--set=train.eval_every=1000",
        "--set=train.eval_batches=1", "--set=train.final_eval_batches=1",
        "--set=checkpoint.every=2"]


@pytest.mark.slow  # two sweeps through run.py; the in-process rerun is in test_experiments
def test_a_failed_row_exits_1_and_runs_again_once_fixed(tmp_path):
  args = ["--experiment=omnimoe", "--sweep_index=0", *FAST, f"--workdir={tmp_path}"]
  r = run_py([*args, "--set=debug.inject_nan_at_step=3"], timeout=600)
  assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
  assert "0 completed, 1 failed: dense_s0" in r.stdout
  r = run_py(args, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  assert "failed with another config; moved to" in r.stdout
  assert "1 completed, 0 failed" in r.stdout
