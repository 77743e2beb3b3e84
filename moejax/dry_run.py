"""`run.py --dry_run`: validate a config and print its budget without training.

Per-device memory counts parameters and optimizer state under the configured
mesh and sharding rules (from each array's shard shape). Activations are not
included: they depend on XLA's schedule and rematerialisation.
"""

import math

import jax
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


def report(cfg) -> dict:
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
  if match is not None:
    print(f"budget match    {cfg.budget_match.reference} (tolerance "
          f"{cfg.budget_match.tolerance:.1%})")
    print(budget_match.format_report(match))
  return dict(budget=b, params_bytes_per_device=params_bytes,
              opt_bytes_per_device=opt_bytes, num_params=spec.num_params)
