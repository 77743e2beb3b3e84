"""What L3 needs from the trainer: its row allocation before the model is built,
and, with l3.host_eval, the final evaluation again with the tables in host memory."""

from __future__ import annotations

import jax
import ml_collections

from moejax import sharding
from moejax.papers.l3 import allocation as l3_allocation


def allocation_inputs(cfg, data, vocab_size: int, *, shapes_only: bool, say):
  """Rows per token id of every L3 table, or None without L3 layers. For shapes
  only (--dry_run) any allocation with the configured rows will do: uniform."""
  l3 = cfg.l3
  if not l3.after_layers:
    return None
  if shapes_only:
    return l3_allocation.uniform_allocation(vocab_size, l3.rows, l3.max_rows_per_token)
  counts = l3_allocation.load_or_build(cfg.data, l3, vocab_size, run_data=data)
  stats = l3_allocation.allocation_stats(counts, max_rows=l3.max_rows_per_token)
  say(f"L3 tables: {l3.rows:,} rows per layer after layers {tuple(l3.after_layers)}, "
      f"{l3.allocation} allocation (rows per token id: min {stats['min_rows']}, mean "
      f"{stats['mean_rows']:.1f}, max {stats['max_rows']})")
  return counts


def host_table_eval(cfg, run) -> dict:
  """With l3.host_eval: {"l3_host_eval": metrics and what each batch shipped}.

  run: the trainer's RunContext (spec, state, eval_iter, data, final, say)."""
  if not (cfg.l3.after_layers and cfg.l3.host_eval):
    return {}
  from moejax.papers.l3 import host as l3_host  # pylint: disable=import-outside-toplevel
  # One device holds the rest of the model; the model's sharding constraints
  # then refer to a one-device mesh.
  device = jax.devices()[0]
  one = sharding.make_mesh(ml_collections.ConfigDict(
      dict(data=1, fsdp=1, expert=1, tensor=1)), devices=[device])
  state = run.state
  with sharding.use_mesh(one, cfg.sharding.rules):
    host = l3_host.HostTables.from_state(jax.device_put(state["params"], device),
                                         jax.device_put(state["model_state"], device),
                                         device=device)
    metrics, shipped = l3_host.evaluate_with_host_tables(
        run.spec.graphdef, host,
        run.eval_iter.iter_eval(cfg.train.final_eval_batches or None),
        run.data.tokenizer.bytes_per_token)
  n = max(len(shipped), 1)
  result = dict(metrics, batches=len(shipped),
                mean_rows_shipped=sum(s.bucket_rows for s in shipped) / n,
                mean_fraction=sum(s.fraction for s in shipped) / n,
                mean_kib=sum(s.bytes for s in shipped) / n / 1024,
                mean_gather_ms=1e3 * sum(s.gather_s for s in shipped) / n,
                mean_transfer_ms=1e3 * sum(s.transfer_s for s in shipped) / n)
  run.say(f"L3 host-table evaluation: loss {result['eval/loss']:.4f} (device tables: "
          f"{run.final['eval/loss']:.4f}); per batch {result['mean_rows_shipped']:,.0f} rows "
          f"shipped = {result['mean_fraction']:.1%} of the tables, "
          f"{result['mean_kib']:,.0f} KiB")
  return {"l3_host_eval": result}
