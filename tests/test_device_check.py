"""scripts/device_check.sh --dry_run: the parts of the device check run here at
toy sizes (Pallas in interpret mode) and pass, the parts' time limits fit the
8 minutes, and the training part's steps fit on paper. Run the slow test (all
parts) before a session with a device."""

import json
import os
import subprocess

import pytest

from benchmarks import device_check
from tests.helpers import ROOT


def _dry_run(tmp_path, parts=None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--dry_run",
         f"--out_dir={tmp_path}"] + ([f"--parts={','.join(parts)}"] if parts else [])
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (result,) = tmp_path.glob("device_check_*_dry_run.json")
  r = json.loads(result.read_text())
  assert r["budget_problems"] == []
  # A dry run never replaces committed results or the auto table.
  assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results",
                                         "device_check_cpu_cpu_dry_run.md"))
  return r


def _check_train_part(r):
  trained = r["parts"]["train"]["lines"]
  assert [l["sublayer"] for l in trained] == [n for n, _, _ in device_check.TRAIN_PRESETS]
  per_run = device_check.LIMITS_S["train"] / len(trained)
  assert all(l["estimated_seconds_on_h100"] < per_run for l in trained), trained
  assert sum(device_check.LIMITS_S.values()) <= device_check.TOTAL_LIMIT_S


def test_the_device_check_dry_run_passes_its_layer_and_train_parts(tmp_path):
  """The default run's share: the Pallas parts (interpret mode, about a minute)
  are in the slow test below, and the kernels' values in their own tests."""
  r = _dry_run(tmp_path, ["layer_bench", "train"])
  assert {p: v["status"] for p, v in r["parts"].items()} == {"layer_bench": "ok", "train": "ok"}
  _check_train_part(r)


@pytest.mark.slow
def test_the_device_check_dry_run_passes_every_part(tmp_path):
  r = _dry_run(tmp_path)
  assert {p: v["status"] for p, v in r["parts"].items()} == {
      "kernels": "ok", "kernel_bench": "ok", "layer_bench": "ok", "train": "ok"}
  kernels = {l["kernel"].split(":")[0] for l in r["parts"]["kernels"]["lines"]}
  assert kernels >= {"grouped_matmul", "moe_ffn", "atomic_experts", "product_topk",
                     "l3_lookup"}
  assert all(l["ok"] for l in r["parts"]["kernels"]["lines"])
  _check_train_part(r)


def test_the_fastest_backend_is_read_from_the_layer_benchmark(tmp_path):
  rows = [dict(backend=b, experts=e, top_k=k, seconds=s) for b, e, k, s in [
      ("sorted", 8, 2, 1.0), ("pallas", 8, 2, 2.0),
      ("sorted", 64, 8, 3.0), ("pallas", 64, 8, 1.5), ("ragged_dot", 64, 8, 9.0)]]
  path = tmp_path / "moe_layer_gpu.json"
  path.write_text(json.dumps(dict(rows=rows)))
  winner = device_check.fastest_backend(str(path))
  assert winner["backend"] == "pallas" and winner["case"] == [64, 8]
