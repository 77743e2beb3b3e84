"""Shared test utilities: tiny configs and subprocess runs of run.py."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A very small dense model on the synthetic dataset (fast on CPU), as
# --config.* overrides; tiny_config() applies the same values in-process.
TINY_FLAGS = {
    "name": "test_tiny", "model.d_model": 32, "model.num_layers": 2,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 8,
    "model.ffn_dim": 64, "data.name": "synthetic", "data.tokenizer": "byte",
    "data.seq_len": 16, "train.global_batch": 8, "train.steps": 12,
    "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 1000,
    "train.eval_batches": 2, "train.final_eval_batches": 2, "checkpoint.every": 4,
    "debug.tensorboard": False,
}


def tiny_config(**overrides):
  """base_config() with TINY_FLAGS and then `overrides` ("group.field": value)."""
  from moejax.config.base import base_config
  c = base_config()
  for key, value in {**TINY_FLAGS, **overrides}.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def config_flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_py(args: list[str], *, devices: int = 1, timeout: int = 300,
           env: dict | None = None, **popen_kw):
  """Runs `python run.py ARGS` with `devices` fake CPU devices."""
  return _run([os.path.join(ROOT, "run.py"), *args], devices=devices, timeout=timeout,
              env=env, **popen_kw)


def run_module(module: str, args: list[str], *, devices: int = 1, timeout: int = 300,
               env: dict | None = None, **popen_kw):
  """Runs `python -m MODULE ARGS` (e.g. moejax.evaluate) with `devices` fake CPU devices."""
  return _run(["-m", module, *args], devices=devices, timeout=timeout, env=env, **popen_kw)


def _run(argv: list[str], *, devices: int, timeout: int, env: dict | None, **popen_kw):
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env["PYTHONUNBUFFERED"] = "1"
  full_env.update(env or {})
  cmd = [sys.executable, *argv]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=full_env, cwd=ROOT, **popen_kw)


def read_metrics(workdir: str) -> list[dict]:
  """The run's metrics.jsonl records; the file must exist."""
  from moejax.metrics import read_metrics as read  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):  # tests that poll a starting run catch OSError
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
  return read(workdir)


def losses_by_step(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
