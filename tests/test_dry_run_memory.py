"""--dry_run's compiled memory is XLA's analysis of the real train step: its
arguments are exactly the sharded state plus one batch (counted here by hand),
the state is donated, and the temporaries grow with the batch (activations)."""

import jax

from moejax import dry_run
from tests.helpers import tiny_config


def test_compiled_memory_counts_the_state_the_batch_and_the_activations(capsys):
  cfg = tiny_config()
  report = dry_run.report(cfg)
  mem = report["compiled_memory"]
  state = report["params_bytes_per_device"] + report["opt_bytes_per_device"] + 2 * 4
  ways = jax.device_count()  # the default mesh puts every device on the batch
  batch = 5 * cfg.train.global_batch * cfg.data.seq_len * 4 // ways  # 5 int32/f32 arrays
  assert mem["arguments"] == state + batch
  assert mem["aliased"] == state  # the train step donates the state it replaces
  assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] - state
  assert "compiled step" in capsys.readouterr().out

  bigger = tiny_config(**{"train.global_batch": 8 * cfg.train.global_batch})
  assert dry_run.report(bigger)["compiled_memory"]["temporaries"] > mem["temporaries"]
