"""Bad command lines through run.py's real entry point: each exits 2 with one
line saying what to change, no traceback, and leaves no workdir behind. The
processes run eight at a time (each stops before any training). An argument
NAME=value in capitals sets an environment variable instead."""

import concurrent.futures
import os
import re
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
    (["--config=configs/nope", "--config.train.steps=3"], "no such config file"),
    (["--config=configs/moe.py:nope"], "Unknown preset 'nope'"),
    (["--config=configs/moe.py:mixtral_tiny", "--config.moe.dispatch=x"],
     "(--config.moe.dispatch=x)"),
    (["--config=configs/omnimoe.py:tiny", "--config.omnimoe.top_k=0"],
     "(--config.omnimoe.top_k=0)"),
    (["--config=configs/moe.py:mixtral_tiny", "--config.moe.top_k=99"], "exceeds"),
    (["--config=configs/moe.py:mixtral_tiny", "--config.moe.score_fn=nope"], "score_fn"),
    (["--config.data.train_split=nope"], "--config.data.train_split='nope'"),
    (["--config.data.eval_split=test"], "--config.data.eval_split='test'"),
    (["--config.data.files=/x/*.txt"], "add --config.data.name=files"),
    (["--config.data.name=files", "--config.data.files={tmp}/notes.txt",
      "--config.data.eval_fraction=1.5"], "eval_fraction=1.5"),
    (["--config.data.name=nosuchdataset"], "Unknown dataset"),
    (["--config.data.vocab_size=5"], "vocab_size=5 is too small"),
    (["--config.data.seq_len=0"], "seq_len"),
    (["--config.data.seq_len=4096"], "longer than the model supports"),
    (["--config.data.data_dir={tmp}/notes.txt"], "is a file"),
    (["--workdir={tmp}/notes.txt"], "is a file, not a directory"),
    (["--config.train.steps=0"], "steps must be positive"),
    (["--config.train.learning_rate=-1"], "learning_rate"),
    (["--config.train.warmup_steps=-1"], "warmup_steps=-1"),
    (["--config.train.grad_clip=-1"], "grad_clip"),
    (["--config.train.b2=1.0"], "b2=1.0"),
    (["--config.model.num_layers=0"], "num_layers"),
    (["--config.model.compute_dtype=float8"], "compute_dtype"),
    (["--config.model.sublayer=nope"], "sublayer"),
    (["--config.mesh.data=3"], "has 3 devices but"),
    (["--config.checkpoint.keep=0"], "checkpoint.keep"),
    (["--num_processes=-3"], "--num_processes=-3"),
    (["--process_id=3"], "--process_id=3 needs --num_processes"),
    (["--coordinator_address=localhost:1234"], "needs the number of processes"),
    (["JAX_PLATFORMS=cuda"], "could not start the platform 'cuda'"),
    (["--experiment=omnimoe", "--sweep_index=999"], "out of range"),
    (["--experiment=omnimoe", "--set=nonsense"], "--set takes group.field=value"),
    (["--experiment=omnimoe", "--set=train.stepz=3"], "stepz"),
    (["--experiment=omnimoe", "--config.train.steps=3"], "ignored by --experiment"),
]


def _run(tmp_path, i: int, args: list[str]):
  """Runs one case in its own directory: (workdir, exit code, stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  is_env = [bool(re.fullmatch(r"[A-Z_]+=.*", a)) for a in args]  # NAME=value
  env.update(a.split("=", 1) for a, e in zip(args, is_env) if e)
  args = [a.format(tmp=tmp_path) for a, e in zip(args, is_env) if not e]
  workdir = tmp_path / f"w{i}"
  extra = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={workdir}"]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args, *extra],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=600)
  return workdir, proc.returncode, proc.stderr


def _check(tmp_path, cases):
  (tmp_path / "notes.txt").write_text("one short document\n")
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda c: _run(tmp_path, c[0], c[1][0]), enumerate(cases)))
  failures = []
  for (args, phrase), (workdir, code, err) in zip(cases, results):
    lines = [l for l in err.splitlines() if l.startswith("config error:")]
    if (code != 2 or len(lines) != 1 or phrase not in lines[0]
        or "Traceback" in err or workdir.exists()):
      failures.append(f"{args}: exit {code}, {err.strip()[-400:]!r}")
  assert not failures, "\n".join(failures)


def test_an_eighth_of_the_bad_command_lines(tmp_path):
  """Every eighth case (the table is ordered by kind, so each kind is sampled);
  the whole table is the slow test below."""
  _check(tmp_path, CASES[::8])


@pytest.mark.slow
def test_every_bad_command_line_is_one_sentence_and_leaves_nothing(tmp_path):
  assert len(CASES) >= 40
  _check(tmp_path, CASES)
