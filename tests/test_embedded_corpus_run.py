"""The default data path end to end: embedded corpus, sentencepiece, no TensorFlow."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

# A stand-in `tensorflow` package first on the path: importing it writes a marker
# file and then fails like a missing package, so any attempt is caught even on
# machines where TensorFlow is installed, or not.
FAKE_TF = """
import os
open(os.environ["TF_IMPORT_MARKER"], "a").write("imported\\n")
raise ImportError("tensorflow is blocked in this test")
"""

SCRIPT = """
import os, sys
from configs.dense import get_config
import moejax.data
from moejax.train import train_and_evaluate
cfg = get_config("tiny")
cfg.data.data_dir = sys.argv[1]
cfg.data.vocab_size = 512
cfg.train.steps = 6
cfg.train.warmup_steps = 2
cfg.train.log_every = 3
cfg.train.eval_every = 1000
cfg.train.final_eval_batches = 2
cfg.checkpoint.every = 3
cfg.debug.tensorboard = False
moejax.data.prepare(cfg.data)  # preparation may use TensorFlow; training may not
if os.path.exists(os.environ["TF_IMPORT_MARKER"]):
  os.remove(os.environ["TF_IMPORT_MARKER"])
final = train_and_evaluate(cfg, sys.argv[2])
assert not os.path.exists(os.environ["TF_IMPORT_MARKER"]), "training imported TensorFlow"
print("TF_FREE", final["eval/loss"], final["dataset"]["fingerprint"])
"""


def test_default_data_path_trains_without_tensorflow(tmp_path):
  fake = tmp_path / "fake_tf" / "tensorflow"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(FAKE_TF)
  marker = tmp_path / "tf_imported"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{fake.parent}{os.pathsep}{ROOT}",
             TF_IMPORT_MARKER=str(marker))
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tfds"),
                      str(tmp_path / "run")], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "TF_FREE" in r.stdout and not marker.exists()
  with open(tmp_path / "run" / "final.json") as f:
    final = json.load(f)
  info = final["dataset"]
  assert info["name"] == "stdlib_source" and len(info["fingerprint"]) == 64
  assert info["python_version"] == ".".join(map(str, sys.version_info[:3]))
  assert info["train_tokens"] > 1_000_000 and info["eval_tokens"] > 10_000
  assert 0 < final["eval/bits_per_byte"] < 16
