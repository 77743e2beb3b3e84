"""scripts/device_check.sh --dry_run, as CI runs it: every part of the device
check runs here at toy sizes (Pallas in interpret mode) and passes, the parts'
time limits fit the 8 minutes, and the training part's steps fit on paper."""

import json
import os
import subprocess

from benchmarks import device_check
from tests.helpers import ROOT


def test_the_device_check_dry_run_passes_every_part(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"),
                         "--dry_run", f"--out_dir={tmp_path}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (result,) = tmp_path.glob("device_check_*_dry_run.json")
  r = json.loads(result.read_text())
  assert r["budget_problems"] == []
  assert {p: v["status"] for p, v in r["parts"].items()} == {
      "kernels": "ok", "kernel_bench": "ok", "layer_bench": "ok", "train": "ok"}
  kernels = {l["kernel"].split(":")[0] for l in r["parts"]["kernels"]["lines"]}
  assert kernels >= {"grouped_matmul", "moe_ffn", "atomic_experts", "product_topk",
                     "l3_lookup"}
  assert all(l["ok"] for l in r["parts"]["kernels"]["lines"])
  trained = r["parts"]["train"]["lines"]
  assert [l["sublayer"] for l in trained] == [n for n, _, _ in device_check.TRAIN_PRESETS]
  per_run = device_check.LIMITS_S["train"] / len(trained)
  assert all(l["estimated_seconds_on_h100"] < per_run for l in trained), trained
  assert sum(device_check.LIMITS_S.values()) <= device_check.TOTAL_LIMIT_S
  # A dry run never replaces committed results or the auto table.
  assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results",
                                         "device_check_cpu_cpu_dry_run.md"))


def test_the_fastest_backend_is_read_from_the_layer_benchmark(tmp_path):
  rows = [dict(backend=b, experts=e, top_k=k, seconds=s) for b, e, k, s in [
      ("sorted", 8, 2, 1.0), ("pallas", 8, 2, 2.0),
      ("sorted", 64, 8, 3.0), ("pallas", 64, 8, 1.5), ("ragged_dot", 64, 8, 9.0)]]
  path = tmp_path / "moe_layer_gpu.json"
  path.write_text(json.dumps(dict(rows=rows)))
  winner = device_check.fastest_backend(str(path))
  assert winner["backend"] == "pallas" and winner["case"] == [64, 8]
