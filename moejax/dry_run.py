"""`run.py --dry_run`: validate a config and print its budget without training.

Per-device memory is given twice. The estimate counts parameters and optimizer
state under the configured mesh and sharding rules (from each array's shard
shape). The compiled figure is XLA's own: the train step compiled ahead of time
for abstract inputs (nothing is allocated) and its memory_analysis(), which adds
activations, gradients and temporaries as this machine's backend schedules
them (a CPU keeps far more temporaries alive than a GPU or TPU would), so it is
the number to read on the machine that will train.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import budget as budget_lib
from moejax.config import budget_match
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import sharding
from moejax.optim import make_optimizer


def _bytes_per_device(abstract, shardings) -> float:
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total


def report(cfg, *, compile_step: bool = True) -> dict:
  """Prints the budget; compile_step=False skips the compiled memory (seconds to
  minutes of compilation)."""
  from moejax.train import StateSpec, model_inputs  # heavy import only when needed

  config_lib.validate(cfg, num_devices=jax.device_count(),
                      num_processes=jax.process_count(), check_data=False)
  vocab = data_lib.vocab_size(cfg.data)
  match = budget_match.check_config(cfg, vocab)
  b = budget_lib.model_budget(cfg, vocab)
  mesh = sharding.make_mesh(cfg.mesh)
  inputs = model_inputs(cfg, None, vocab, shapes_only=True)
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    spec = StateSpec(cfg, vocab, mesh, make_optimizer(cfg.train), inputs=inputs)
  params_bytes = _bytes_per_device(spec.abstract["params"], spec.shardings["params"])
  opt_bytes = _bytes_per_device(spec.abstract["opt_state"], spec.shardings["opt_state"])
  fmt = budget_lib.format_count
  print(f"config          {cfg.name}")
  print(f"params          {b['params']:,} ({fmt(b['params'])}); model built: "
        f"{spec.num_params:,}")
  print(f"non-embedding   {b['non_embedding_params']:,}")
  print(f"active/token    {b['active_params']:,} ({fmt(b['active_params'])})")
  print(f"layers          {cfg.model.num_layers} unique, {b['effective_layers']} applied per "
        f"token; attention:FFN active ratio {b['attn_ffn_active_ratio']:.4f}")
  print(f"FLOPs/token     forward {fmt(b['forward_flops_per_token'])}, "
        f"train {fmt(b['train_flops_per_token'])}")
  for key, value in b["ffn_breakdown"].items():
    print(f"  {key:<30s}{fmt(value)} (summed over layers)")
  print(f"mesh            {dict(mesh.shape)} over {jax.device_count()} device(s)")
  print(f"memory/device   params {params_bytes / 2**20:.1f} MiB + optimizer "
        f"{opt_bytes / 2**20:.1f} MiB (activations not included)")
  compiled = _compiled_memory(spec, cfg, mesh) if compile_step else None
  if compiled is not None:
    print(f"compiled step   {_mib(compiled['total'])} MiB/device: arguments "
          f"{_mib(compiled['arguments'])} + outputs {_mib(compiled['outputs'])} + "
          f"temporaries {_mib(compiled['temporaries'])} - donated/aliased "
          f"{_mib(compiled['aliased'])} (XLA's memory_analysis on "
          f"{jax.devices()[0].platform}; activations included)")
  if match is not None:
    print(f"budget match    {cfg.budget_match.reference} (tolerance "
          f"{cfg.budget_match.tolerance:.1%})")
    print(budget_match.format_report(match))
  return dict(budget=b, params_bytes_per_device=params_bytes,
              opt_bytes_per_device=opt_bytes, num_params=spec.num_params,
              compiled_memory=compiled)


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f}"


def _compiled_memory(spec, cfg, mesh) -> dict | None:
  """XLA's memory analysis of the train step compiled for abstract inputs, in
  bytes per device; None where the backend gives none."""
  from moejax.train import BATCH_KEYS, make_train_step  # pylint: disable=import-outside-toplevel
  rows, seq = cfg.train.global_batch, cfg.data.seq_len
  dtypes = dict(weights=jnp.float32)
  batch = {k: jax.ShapeDtypeStruct((rows, seq), dtypes.get(k, jnp.int32),
                                   sharding=sharding.batch_sharding(mesh, 2))
           for k in BATCH_KEYS}
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    step = make_train_step(spec, cfg)
    compiled = step.lower(spec.abstract_with_shardings(), batch).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  out = dict(arguments=analysis.argument_size_in_bytes,
             outputs=analysis.output_size_in_bytes,
             temporaries=analysis.temp_size_in_bytes,
             aliased=analysis.alias_size_in_bytes,
             generated_code=analysis.generated_code_size_in_bytes)
  out["total"] = (out["arguments"] + out["outputs"] + out["temporaries"]
                  - out["aliased"])
  return out
