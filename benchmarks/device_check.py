"""One prepared check of a GPU or TPU machine: kernels, benchmarks, short trainings.

  bash scripts/device_check.sh                 # on the device machine: at most 8 minutes
  bash scripts/device_check.sh --dry_run       # on CPU: every part runs small, budgets on paper
  bash scripts/device_check.sh --fetch_wheels  # here: the wheels the device machine lacks

Parts, each a child process with its own time limit, so one slow part cannot
lose the others (a part cut off keeps the lines it had written):
  kernels       every Pallas kernel compiled for the device against its XLA
                reference, float32 and bfloat16, ragged groups with empty ones
                (benchmarks/device_kernels.py)
  kernel_bench  benchmarks/kernels.py: grouped matmul vs dense, ragged_dot and
                tokamax (if importable), and the MoE layer per backend
  layer_bench   benchmarks/moe_layer.py per dispatch backend, forward+backward;
                the fastest at the largest case becomes `auto`'s entry for this
                platform (benchmarks/results/auto_backend.json)
  train         each sublayer at `small` scale, bfloat16 compute, synthetic data,
                a short run: tokens/s, TFLOP/s per device and MFU
Results: benchmarks/results/device_check_<device>.{md,json}, with the device,
versions and command. In the dry run the parts run on CPU at toy sizes (Pallas
in interpret mode), each part's time limit is checked against the 8 minutes,
and the training part's step counts against the device's peak at an assumed
30% MFU plus compilation; results go to --out_dir (a temporary folder in tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

flags.DEFINE_bool("dry_run", False, "Run every part small on this machine (CPU) and check "
                  "the time budgets on paper.")
flags.DEFINE_list("parts", ["kernels", "kernel_bench", "layer_bench", "train"], "Parts to run.")
flags.DEFINE_string("out_dir", os.path.join(_ROOT, "benchmarks", "results"),
                    "Where the results go.")
flags.DEFINE_string("part", "", "Internal: run one part in this process.")
flags.DEFINE_string("lines", "", "Internal: the JSON-lines file a part appends to.")
FLAGS = flags.FLAGS

TOTAL_LIMIT_S = 480
# Seconds each part may take on the device (they sum to TOTAL_LIMIT_S at most).
LIMITS_S = {"kernels": 90, "kernel_bench": 120, "layer_bench": 70, "train": 190}
# Sublayers trained by the `train` part: name, preset, overrides of its own. The
# data is the synthetic stream (byte vocabulary, 264 ids), so L3's table gets at
# most 64 rows per id instead of the preset's 32768 rows for a 32k vocabulary.
TRAIN_PRESETS = (("dense", "configs/dense.py:small", ()),
                 ("moe", "configs/moe.py:mixtral_small", ()),
                 ("omnimoe", "configs/omnimoe.py:small", ()),
                 ("mohge", "configs/mohge.py:small", ()),
                 ("loopmoe", "configs/loopmoe.py:loopmoe_small", ()),
                 ("l3", "configs/l3.py:uniform_small", ("--config.l3.rows=16384",)))
TRAIN_STEPS = 30
ASSUMED_MFU = 0.3
COMPILE_ALLOWANCE_S = 15


def _append(path: str, line: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(line) + "\n")


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


# --- the parts (each runs in its own child process) ---------------------------
def part_kernels(lines: str, dry_run: bool) -> None:
  from benchmarks import device_kernels
  for line in device_kernels.run(small=dry_run, say=lambda s: print(s, flush=True)):
    _append(lines, line)


def _bench(lines: str, script: str, args: list[str], out: str) -> None:
  cmd = [sys.executable, os.path.join(_ROOT, "benchmarks", script), *args, f"--out={out}"]
  proc = subprocess.run(cmd, cwd=_ROOT, text=True, capture_output=True)
  print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
  _append(lines, dict(command=" ".join(cmd[1:]), returncode=proc.returncode, results=out,
                      error=proc.stderr.strip().splitlines()[-1][:300]
                      if proc.returncode else None))


def part_kernel_bench(lines: str, dry_run: bool, out_dir: str, device: str) -> None:
  args = (["--quick", "--backends=pallas"] if dry_run else ["--shapes=mixtral,small", "--repeats=3"])
  _bench(lines, "kernels.py", args, os.path.join(out_dir, f"kernels_{device}.md"))


def part_layer_bench(lines: str, dry_run: bool, out_dir: str, device: str) -> None:
  backends = "sorted,capacity,ragged_dot" + ("" if dry_run else ",pallas")
  args = (["--backends=sorted,ragged_dot", "--tokens=128", "--d_model=32",
           "--dense_ffn=64", "--cases=8:2", "--repeats=1"] if dry_run
          else [f"--backends={backends}", "--tokens=4096", "--cases=8:8,64:8,256:8",
                "--repeats=3"])
  out = os.path.join(out_dir, f"moe_layer_{device}.md")
  _bench(lines, "moe_layer.py", args, out)
  winner = fastest_backend(out[:-3] + ".json")
  if winner is not None:
    _append(lines, dict(auto_backend=winner))


def fastest_backend(results_json: str) -> dict | None:
  """The backend with the least forward+backward time at the largest (tokens, E, k) case."""
  if not os.path.exists(results_json):
    return None
  with open(results_json) as f:
    rows = json.load(f)["rows"]
  if not rows:
    return None
  case = lambda r: (r.get("tokens", 0), r["experts"], r["top_k"])
  largest = max(case(r) for r in rows)
  best = min((r for r in rows if case(r) == largest), key=lambda r: r["seconds"])
  return dict(backend=best["backend"], case=list(largest[1:]), seconds=best["seconds"],
              evidence=os.path.relpath(results_json, _ROOT))


def train_overrides(dry_run: bool) -> list[str]:
  steps = 2 if dry_run else TRAIN_STEPS
  return ["--config.data.name=synthetic", "--config.data.tokenizer=byte",
          "--config.model.compute_dtype=bfloat16", f"--config.train.steps={steps}",
          "--config.train.warmup_steps=1", f"--config.train.log_every={max(1, steps // 3)}",
          "--config.train.eval_every=100000", "--config.train.eval_batches=1",
          "--config.train.final_eval_batches=1", "--config.checkpoint.every=100000",
          "--config.debug.tensorboard=False"]


def part_train(lines: str, dry_run: bool, workdir: str) -> None:
  import jax
  from moejax import budget as budget_lib, dry_run as dry_run_lib, mfu
  from moejax.config.files import load_config
  from moejax.data import BYTE_VOCAB_SIZE
  peak = None if dry_run else mfu.peak_tflops(jax.devices()[0], 0.0)[0]
  for name, preset, own in TRAIN_PRESETS:
    if dry_run:
      # Here: the configs validate and build; the step count fits on paper.
      cfg = load_config(preset)
      for arg in (*train_overrides(False), *own):
        _set(cfg, arg)
      report = dry_run_lib.report(cfg, compile_step=False)
      flops = (budget_lib.model_budget(cfg, BYTE_VOCAB_SIZE)["train_flops_per_token"]
               * cfg.train.global_batch * cfg.data.seq_len * TRAIN_STEPS)
      device_peak = dict(mfu.PEAK_TFLOPS)["H100"]
      estimate = COMPILE_ALLOWANCE_S + flops / (device_peak * 1e12 * ASSUMED_MFU)
      _append(lines, dict(sublayer=name, preset=preset, params=report["num_params"],
                          estimated_seconds_on_h100=round(estimate, 1)))
      continue
    run_dir = os.path.join(workdir, name)
    cmd = [sys.executable, os.path.join(_ROOT, "run.py"), f"--config={preset}",
           *train_overrides(False), *own, f"--workdir={run_dir}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=_ROOT, text=True, capture_output=True)
    line = dict(sublayer=name, preset=preset, returncode=proc.returncode,
                wall_s=round(time.time() - t0, 1), peak_tflops=peak)
    final = os.path.join(run_dir, "final.json")
    if proc.returncode == 0 and os.path.exists(final):
      with open(final) as f:
        got = json.load(f)
      line.update(tflops_per_device=got.get("tflops_per_device"), mfu=got.get("mfu"),
                  params=got.get("params"), train_loss=got.get("train_loss"))
      metrics = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
      rates = [m["perf/tokens_per_s"] for m in metrics if "perf/tokens_per_s" in m]
      line["tokens_per_s"] = rates[-1] if rates else None
    else:
      line["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    print(line, flush=True)
    _append(lines, line)


def _set(cfg, arg: str) -> None:
  """Applies one --config.a.b=value override to a ConfigDict (typed like the field)."""
  path, value = arg[len("--config."):].split("=", 1)
  *groups, leaf = path.split(".")
  node = cfg
  for g in groups:
    node = node[g]
  old = node[leaf]
  node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)


# --- the parent ---------------------------------------------------------------
def check_budgets() -> list[str]:
  """Why the time limits do not fit on paper (empty when they do)."""
  total = sum(LIMITS_S[p] for p in FLAGS.parts)
  return [f"the parts' limits sum to {total} s, over {TOTAL_LIMIT_S} s"] if (
      total > TOTAL_LIMIT_S) else []


def device_label() -> str:
  import jax
  d = jax.devices()[0]
  kind = "".join(c if c.isalnum() else "_" for c in d.device_kind.lower()).strip("_")
  return f"{d.platform}_{kind}"


def main(argv):
  del argv
  if FLAGS.part:
    return run_part(FLAGS.part)
  import jax
  from benchmarks import common
  label = device_label() + ("_dry_run" if FLAGS.dry_run else "")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  results = dict(common.environment("platform", "device", "jax", "flax", "python", "command"),
                 label=label, dry_run=FLAGS.dry_run, parts={}, budget_problems=[])
  results["budget_problems"] = check_budgets()
  scratch = tempfile.mkdtemp(prefix="device_check_")
  for part in FLAGS.parts:
    lines = os.path.join(scratch, f"{part}.jsonl")
    limit = LIMITS_S[part] * (4 if FLAGS.dry_run else 1)  # CPU: interpret mode, 2 cores
    cmd = [sys.executable, "-m", "benchmarks.device_check", f"--part={part}",
           f"--lines={lines}", f"--out_dir={FLAGS.out_dir}",
           f"--dry_run={FLAGS.dry_run}"]
    print(f"== {part} (limit {limit} s)", flush=True)
    t0 = time.time()
    try:
      proc = subprocess.run(cmd, cwd=_ROOT, timeout=limit)
      status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
      status = f"cut off at its {limit} s limit"
    got = _read(lines)
    failed = [l for l in got if l.get("ok") is False or l.get("returncode") not in (None, 0)]
    if status == "ok" and failed:
      status = f"{len(failed)} failed"
    results["parts"][part] = dict(status=status, seconds=round(time.time() - t0, 1),
                                  lines=got)
    print(f"== {part}: {status} in {time.time() - t0:.0f} s", flush=True)
    winner = next((l["auto_backend"] for l in got if "auto_backend" in l), None)
    if winner is not None and not FLAGS.dry_run:
      record_auto_backend(jax.default_backend(), winner)
  path = os.path.join(FLAGS.out_dir, f"device_check_{label}")
  common.write_results(path + ".md", render(results), results)
  print(f"wrote {path}.md and .json")
  bad = results["budget_problems"] or [p for p, r in results["parts"].items()
                                       if r["status"] != "ok"]
  return 1 if bad else 0


def run_part(part: str) -> None:
  label = device_label()
  if part == "kernels":
    part_kernels(FLAGS.lines, FLAGS.dry_run)
  elif part == "kernel_bench":
    part_kernel_bench(FLAGS.lines, FLAGS.dry_run, _bench_dir(), label)
  elif part == "layer_bench":
    part_layer_bench(FLAGS.lines, FLAGS.dry_run, _bench_dir(), label)
  elif part == "train":
    part_train(FLAGS.lines, FLAGS.dry_run, tempfile.mkdtemp(prefix="device_check_runs_"))
  else:
    raise app.UsageError(f"Unknown part {part!r}; choose among {list(LIMITS_S)}.")


def _bench_dir() -> str:
  """Benchmark tables of a dry run are scratch: they never replace committed ones."""
  return tempfile.mkdtemp(prefix="device_check_bench_") if FLAGS.dry_run else FLAGS.out_dir


def record_auto_backend(platform: str, winner: dict) -> None:
  path = os.path.join(_ROOT, "benchmarks", "results", "auto_backend.json")
  table = json.load(open(path)) if os.path.exists(path) else {}
  table[platform] = winner
  with open(path, "w") as f:
    json.dump(table, f, indent=2, sort_keys=True)


def render(r: dict) -> str:
  out = [f"# Device check: {r['label']}", "",
         f"- device: {r['device']} ({r['platform']}); jax {r['jax']}, flax {r['flax']}, "
         f"python {r['python']}", f"- command: `{r['command']}`",
         f"- dry run: {r['dry_run']}; budget problems: {r['budget_problems'] or 'none'}", ""]
  for part, p in r["parts"].items():
    out += [f"## {part}: {p['status']} ({p['seconds']} s)", ""]
    for line in p["lines"]:
      out.append("- " + ", ".join(f"{k}={v}" for k, v in line.items()))
    out.append("")
  return "\n".join(out)


if __name__ == "__main__":
  app.run(main)
