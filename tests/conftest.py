"""Test setup: 8 fake CPU devices, set before JAX starts. The repository root is on
sys.path through pytest's `pythonpath` setting (setup.cfg), so tests import
`tests.*`, `configs.*` and `experiments.*` as packages."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment is set)

TRAINED_STEPS = 8


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
  """(workdir, final.json) of a tiny dense run on the synthetic stream, with
  checkpoints at steps 4 and 8; shared by the evaluation and sampling tests,
  which must leave it unchanged."""
  from moejax.train import train_and_evaluate
  from tests.helpers import tiny_config
  workdir = tmp_path_factory.mktemp("trained_tiny_run")
  cfg = tiny_config(**{"train.steps": TRAINED_STEPS, "checkpoint.every": 4,
                       "checkpoint.keep": 5, "train.final_eval_batches": 2})
  final = train_and_evaluate(cfg, str(workdir))
  return str(workdir), final
