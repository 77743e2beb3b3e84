"""Two CPU processes with jax.distributed train, checkpoint, and match one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import registry
from tests.helpers import ROOT, TINY_FLAGS, config_flags, losses_by_step, run_py

FLAGS = config_flags({**TINY_FLAGS, "train.steps": 6, "checkpoint.every": 3})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("mesh", [
    {"mesh.data": -1},  # each process holds half of the batch rows
    # tensor spans processes: both hold all rows (slow: the same path as above but
    # for which rows each process reads)
    pytest.param({"mesh.data": 1, "mesh.tensor": -1}, marks=pytest.mark.slow),
])
def test_two_processes_train_checkpoint_and_equal_one_process(tmp_path, mesh):
  flags = FLAGS + config_flags(mesh)
  multi_dir, single_dir = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), *flags, f"--workdir={multi_dir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es)" in outs[0][0]
  assert ("mesh {'data': 4" if "mesh.tensor" not in mesh else "'tensor': 4}") in outs[0][0]
  assert sorted(os.listdir(os.path.join(multi_dir, "checkpoints"))) == ["3", "6"]
  with open(os.path.join(multi_dir, "final.json")) as f:
    assert json.load(f)["status"] == "completed"

  # Same global batch on one process with 4 devices: same losses.
  single = run_py([*flags, f"--workdir={single_dir}"], devices=4)
  assert single.returncode == 0, single.stderr[-3000:]
  a, b = losses_by_step(multi_dir), losses_by_step(single_dir)
  assert sorted(a) == list(range(1, 7))
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, atol=1e-5)


def test_distributed_plan_from_flags_and_environment():
  import pytest

  from moejax.distributed import plan
  from moejax.errors import ConfigError
  assert plan("auto", env={}) is None
  assert plan("off", coordinator_address="h:1", num_processes=2, process_id=0, env={}) is None
  assert plan("auto", coordinator_address="h:1", num_processes=2, process_id=1, env={}) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert plan("auto", env=env) == {"coordinator_address": "h:2", "num_processes": 4,
                                   "process_id": 3}
  assert plan("auto", env={"SLURM_NTASKS": "8"}) == {}  # JAX's Slurm detection
  assert plan("auto", env={"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
  assert plan("auto", env={"TPU_WORKER_HOSTNAMES": "a"}) is None  # single-host TPU
  assert plan("on", env={}) == {}
  with pytest.raises(ConfigError, match="--num_processes and --process_id"):
    plan("auto", coordinator_address="h:1", env={})
  # Several processes without a coordinator would silently train as one.
  with pytest.raises(ConfigError, match="--num_processes=2 needs the coordinator"):
    plan("auto", num_processes=2, process_id=0, env={})


@pytest.mark.slow
def test_two_processes_run_one_sweep_row_like_one_process(tmp_path):
  """A TPU-slice job array runs `--experiment --sweep_index` on every host: here two
  CPU processes under jax.distributed run one row and match a one-process run."""
  settings = {"data.name": "synthetic", "data.tokenizer": "byte", "data.seq_len": 16,
              "train.global_batch": 8, "train.steps": 6, "train.warmup_steps": 1,
              "train.log_every": 1,
              "train.eval_every": 1000, "train.eval_batches": 1,
              "train.final_eval_batches": 1, "checkpoint.every": 3}
  sets = [f"--set={k}={v}" for k, v in settings.items()]
  # The MoHGE arm's first seed, found by name so that adding seeds or arms cannot
  # silently turn this into a dense row.
  rows = registry.get("mohge").rows("tiny")
  index = next(i for i, r in enumerate(rows) if registry.row_name(r) == "mohge_s0")
  args = ["--experiment=mohge", f"--sweep_index={index}", "--scale=tiny", *sets]
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  multi_root, single_root = str(tmp_path / "multi"), str(tmp_path / "single")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), *args, f"--workdir={multi_root}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  row_dir = os.path.join(multi_root, "mohge", "tiny", "mohge_s0")
  with open(os.path.join(row_dir, "row.json")) as f:
    assert json.load(f)["status"] == "completed"
  single = run_py([*args, f"--workdir={single_root}"], devices=4)
  assert single.returncode == 0, single.stderr[-3000:]
  a = losses_by_step(row_dir)
  b = losses_by_step(os.path.join(single_root, "mohge", "tiny", "mohge_s0"))
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-5,
                             atol=1e-5)
