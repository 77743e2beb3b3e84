"""Config validation: every check runs before anything is built or trained.

Each failure raises `ConfigError` with one sentence that names the field and
says what to change; run.py prints it and exits with status 2. Checks that need
devices (mesh shape) take the device count as an argument so they can be
tested without devices.
"""

from __future__ import annotations

import json
import math

import ml_collections

from moejax import data as data_lib
from moejax import sharding
from moejax.errors import ConfigError
from moejax.model import sublayers

_DTYPES = ("float32", "bfloat16", "float16")

# Fields that fix the shapes of the saved state or the meaning of the saved data
# position. Resuming with any of them changed is refused.
RESUME_FIXED_FIELDS = (
    "model", "data.name", "data.tokenizer", "data.vocab_size", "data.seq_len",
    "data.train_split", "data.text_key", "train.global_batch", "seed",
    # sublayer fields that fix parameter or state shapes
    "moe.num_experts", "moe.expert_ffn_dim", "moe.num_shared_experts",
    "moe.first_dense_layers", "moe.bias_update_rate",
    "atomic.num_experts", "atomic.shared_ffn_dim", "atomic.peer_heads",
    "atomic.peer_query_dim", "atomic.peer_query_batchnorm",
    "mohge.group_widths", "mohge.experts_per_group", "mohge.shared_ffn_dim",
    "loop.prefix_layers", "loop.block_layers", "loop.iterations", "loop.iter_adaln",
    "loop.adaln_dim", "loop.adaln_pe_dim", "loop.adaln_gate",
    "l3.after_layers", "l3.rows", "l3.max_rows_per_token", "l3.allocation",
    "l3.allocation_tokens", "l3.emb_dim", "l3.up_dim", "l3.tie_kv", "l3.scale_scores",
)
# What identifies the data itself (recorded by moejax.data.dataset_info): the
# same config can point at different data (another data_dir, another Python's
# standard library, a retrained tokenizer).
RESUME_FIXED_DATA = ("fingerprint", "tokenizer_fingerprint", "train_tokens")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive(group: str, node, *fields: str) -> None:
  for field in fields:
    _require(getattr(node, field) > 0,
             f"--config.{group}.{field} must be positive, got {getattr(node, field)}.")


def _validate_model(m) -> None:
  _require(m.sublayer in sublayers.names(),
           f"Unknown --config.model.sublayer={m.sublayer!r}; choose one of "
           f"{sublayers.names()}.")
  _positive("model", m, "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "ffn_dim", "max_seq_len", "rope_theta", "norm_eps", "init_std")
  _require(m.num_heads % m.num_kv_heads == 0,
           f"--config.model.num_heads={m.num_heads} must be a multiple of "
           f"--config.model.num_kv_heads={m.num_kv_heads} (grouped-query attention).")
  _require(m.head_dim % 2 == 0,
           f"--config.model.head_dim={m.head_dim} must be even for rotary embeddings.")
  for field in ("compute_dtype", "param_dtype"):
    _require(getattr(m, field) in _DTYPES,
             f"--config.model.{field}={getattr(m, field)!r} is not one of {_DTYPES}.")


def _validate_train(t) -> None:
  _positive("train", t, "steps", "learning_rate", "global_batch", "log_every",
            "eval_every", "grad_clip", "eps")
  _require(0 <= t.warmup_steps <= t.steps,
           f"--config.train.warmup_steps={t.warmup_steps} must lie in "
           f"[0, train.steps={t.steps}].")
  _require(0.0 <= t.min_lr_ratio <= 1.0,
           f"--config.train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1].")
  _require(t.weight_decay >= 0,
           f"--config.train.weight_decay must be >= 0, got {t.weight_decay}.")
  for field in ("b1", "b2"):
    _require(0.0 <= getattr(t, field) < 1.0,
             f"--config.train.{field}={getattr(t, field)} must lie in [0, 1).")
  for field in ("eval_batches", "final_eval_batches"):
    _require(getattr(t, field) >= 0,
             f"--config.train.{field} must be >= 0 (0 = the whole split), got "
             f"{getattr(t, field)}.")


def _validate_moe(cfg, axes: dict) -> None:
  """Checks cfg.moe when the model uses the "moe" sublayer."""
  from moejax import dispatch  # pylint: disable=import-outside-toplevel
  e = cfg.moe
  _positive("moe", e, "num_experts", "top_k", "expert_ffn_dim")
  _require(e.top_k <= e.num_experts,
           f"--config.moe.top_k={e.top_k} exceeds --config.moe.num_experts="
           f"{e.num_experts}; choose top_k <= num_experts.")
  _require(e.score_fn in ("softmax", "sigmoid"),
           f"--config.moe.score_fn={e.score_fn!r} is not 'softmax' or 'sigmoid'.")
  _require(e.backend in dispatch.BACKENDS,
           f"Unknown --config.moe.backend={e.backend!r}; choose one of "
           f"{dispatch.BACKENDS.names()}.")
  _require(e.num_shared_experts >= 0,
           f"--config.moe.num_shared_experts must be >= 0, got {e.num_shared_experts}.")
  for field in ("load_balance_coef", "z_loss_coef", "bias_update_rate", "block_size",
                "ep_capacity_factor"):
    _require(getattr(e, field) >= 0,
             f"--config.moe.{field} must be >= 0, got {getattr(e, field)}.")
  _require(e.routed_scaling_factor > 0,
           f"--config.moe.routed_scaling_factor must be positive, got "
           f"{e.routed_scaling_factor}.")
  _require(e.backend != "capacity" or e.capacity_factor > 0,
           f"--config.moe.capacity_factor must be positive for the capacity backend, "
           f"got {e.capacity_factor}.")
  _require(0 <= e.first_dense_layers <= cfg.model.num_layers,
           f"--config.moe.first_dense_layers={e.first_dense_layers} must lie in "
           f"[0, model.num_layers={cfg.model.num_layers}].")
  tp = _width_split(axes)
  _require(e.expert_ffn_dim % tp == 0,
           f"--config.moe.expert_ffn_dim={e.expert_ffn_dim} is not divisible by the tensor "
           f"mesh axis ({tp}), which splits each expert's width; change one of them.")
  ep = axes["expert"]
  _require(e.num_experts % ep == 0,
           f"--config.moe.num_experts={e.num_experts} is not divisible by the expert "
           f"mesh axis ({ep}); use a multiple of {ep} experts or change "
           "--config.mesh.expert.")
  _require(ep == 1 or e.backend in dispatch.DROPLESS,
           f"--config.moe.backend={e.backend!r} runs without expert parallelism; with "
           f"--config.mesh.expert={ep} use one of {sorted(dispatch.DROPLESS)} (and "
           "--config.moe.ep_capacity_factor to cap the exchange).")


def _width_split(axes: dict) -> int:
  """Ways an expert's hidden width is split: by `tensor`, inside the expert-parallel
  shard_map only (without EP a width that does not divide is just replicated)."""
  return axes["tensor"] if axes["expert"] > 1 else 1


def _validate_atomic(cfg, axes: dict) -> None:
  """Checks cfg.atomic for the "omnimoe" and "peer" sublayers."""
  a = cfg.atomic
  _positive("atomic", a, "num_experts", "top_k", "bn_eps", "expert_init_std", "peer_heads")
  side = math.isqrt(a.num_experts)
  _require(side * side == a.num_experts,
           f"--config.atomic.num_experts={a.num_experts} must be a perfect square (the "
           f"router is a sqrt(N) x sqrt(N) grid); try {side * side} or {(side + 1) ** 2}.")
  _require(a.top_k <= a.num_experts,
           f"--config.atomic.top_k={a.top_k} exceeds --config.atomic.num_experts="
           f"{a.num_experts}; choose top_k <= num_experts.")
  _require(a.router in ("product", "full", "pallas"),
           f"--config.atomic.router={a.router!r} is not 'product' or 'full' or 'pallas'.")
  _require(a.path in ("gather", "expert_sorted", "pallas"),
           f"--config.atomic.path={a.path!r} is not 'gather' or 'expert_sorted' or 'pallas'.")
  _require(a.shared_ffn_dim >= 0,
           f"--config.atomic.shared_ffn_dim must be >= 0, got {a.shared_ffn_dim}.")
  _require(0.0 < a.bn_momentum <= 1.0,
           f"--config.atomic.bn_momentum={a.bn_momentum} must lie in (0, 1].")
  qdim = a.peer_query_dim or cfg.model.d_model
  _require(cfg.model.sublayer != "peer" or (qdim > 0 and qdim % 2 == 0),
           f"The PEER query width (--config.atomic.peer_query_dim={a.peer_query_dim}, 0 = "
           f"model.d_model) is {qdim}; it must be positive and even (it is split into two "
           "sub-queries).")
  ep = axes["expert"]
  _require(a.num_experts % ep == 0,
           f"--config.atomic.num_experts={a.num_experts} is not divisible by the expert "
           f"mesh axis ({ep}); change --config.mesh.expert.")


def _validate_mohge(cfg, axes: dict) -> None:
  """Checks cfg.mohge for the "mohge" sublayer."""
  from moejax import dispatch  # pylint: disable=import-outside-toplevel
  h = cfg.mohge
  widths = tuple(h.group_widths)
  _require(len(widths) >= 1 and all(isinstance(w, int) and w > 0 for w in widths),
           f"--config.mohge.group_widths={widths} must be a tuple of positive integers, "
           "one per group.")
  _require(all(a < b for a, b in zip(widths, widths[1:])),
           f"--config.mohge.group_widths={widths} must increase strictly from group to "
           "group (the size weights of the group loss and the decoupled placement "
           "assume it).")
  _positive("mohge", h, "experts_per_group", "top_groups", "top_k")
  _require(h.top_groups <= len(widths),
           f"--config.mohge.top_groups={h.top_groups} exceeds the {len(widths)} groups "
           "in --config.mohge.group_widths.")
  _require(h.top_k <= h.top_groups * h.experts_per_group,
           f"--config.mohge.top_k={h.top_k} exceeds the experts of the chosen groups "
           f"(top_groups x experts_per_group = {h.top_groups * h.experts_per_group}).")
  _require(h.gate in ("megatron", "renormalized"),
           f"--config.mohge.gate={h.gate!r} is not 'megatron' or 'renormalized'.")
  _require(h.backend in dispatch.DROPLESS,
           f"--config.mohge.backend={h.backend!r} must be a dropless backend: one of "
           f"{sorted(dispatch.DROPLESS)}.")
  for field in ("group_aux_coef", "intra_aux_coef", "group_aux_width_interval",
                "block_size", "shared_ffn_dim"):
    _require(getattr(h, field) >= 0,
             f"--config.mohge.{field} must be >= 0, got {getattr(h, field)}.")
  _require(0.0 <= h.group_aux_start_fraction <= 1.0,
           f"--config.mohge.group_aux_start_fraction={h.group_aux_start_fraction} must "
           "lie in [0, 1].")
  tp = _width_split(axes)
  _require(all(w % tp == 0 for w in widths),
           f"--config.mohge.group_widths={widths} must all be divisible by the tensor "
           f"mesh axis ({tp}), which splits each expert's width; change the widths or "
           "--config.mesh.tensor.")
  ep = axes["expert"]
  _require(h.experts_per_group % ep == 0,
           f"--config.mohge.experts_per_group={h.experts_per_group} is not divisible by "
           f"the expert mesh axis ({ep}): each shard must hold the same share of every "
           "width; change --config.mesh.expert.")


def _validate_loop(cfg) -> None:
  """Checks cfg.loop (the looped block of LoopMoE)."""
  lp, layers = cfg.loop, cfg.model.num_layers
  for field in ("prefix_layers", "block_layers"):
    _require(getattr(lp, field) >= 0,
             f"--config.loop.{field} must be >= 0, got {getattr(lp, field)}.")
  _require(lp.iterations >= 1,
           f"--config.loop.iterations must be at least 1, got {lp.iterations}.")
  if lp.block_layers == 0:
    _require(lp.iterations == 1,
             f"--config.loop.iterations={lp.iterations} needs a looped block: set "
             "--config.loop.block_layers to the number of layers to repeat.")
    return
  _require(lp.prefix_layers + lp.block_layers <= layers,
           f"--config.loop.prefix_layers={lp.prefix_layers} plus loop.block_layers="
           f"{lp.block_layers} exceed model.num_layers={layers} (the unique layers); lower "
           "them or raise num_layers.")
  _positive("loop", lp, "adaln_dim", "adaln_pe_dim")
  _require(lp.adaln_pe_dim % 2 == 0,
           f"--config.loop.adaln_pe_dim={lp.adaln_pe_dim} must be even (sine and cosine "
           "halves).")


_L3_ALLOCATIONS = ("lzw", "uniform", "frequency")


def _validate_l3(cfg, axes: dict) -> None:
  """Checks cfg.l3 when L3 layers are inserted."""
  l3, layers = cfg.l3, cfg.model.num_layers
  after = tuple(l3.after_layers)
  if not after:
    return
  _require(all(isinstance(p, int) and 1 <= p <= layers for p in after),
           f"--config.l3.after_layers={after} must list decoder layers between 1 and "
           f"model.num_layers={layers} (an L3 layer goes after that many unique layers).")
  _require(len(set(after)) == len(after) and list(after) == sorted(after),
           f"--config.l3.after_layers={after} must increase strictly.")
  lp = cfg.loop
  if lp.block_layers > 0:
    inside = [p for p in after if lp.prefix_layers < p < lp.prefix_layers + lp.block_layers]
    _require(not inside,
             f"--config.l3.after_layers={after} puts an L3 layer inside the looped block "
             f"(layers {lp.prefix_layers + 1}..{lp.prefix_layers + lp.block_layers}); place "
             "it before or after the loop.")
  vocab = data_lib.vocab_size(cfg.data)
  _positive("l3", l3, "rows", "max_rows_per_token", "allocation_tokens", "up_dim",
            "init_std")
  _require(vocab <= l3.rows <= vocab * l3.max_rows_per_token,
           f"--config.l3.rows={l3.rows} must lie between the vocabulary size ({vocab}: "
           f"every token id owns at least one row) and vocab x l3.max_rows_per_token "
           f"({vocab * l3.max_rows_per_token}).")
  _require(l3.tie_kv or l3.emb_dim > 0,
           f"--config.l3.emb_dim must be positive, got {l3.emb_dim}.")
  _require(not l3.tie_kv or l3.emb_dim == cfg.model.d_model,
           f"--config.l3.tie_kv uses the keys as values, so --config.l3.emb_dim must equal "
           f"model.d_model={cfg.model.d_model}, got {l3.emb_dim}.")
  _require(l3.allocation in _L3_ALLOCATIONS,
           f"--config.l3.allocation={l3.allocation!r} is not one of {_L3_ALLOCATIONS}.")
  _require(l3.path in ("pallas", "padded", "sorted"),
           f"--config.l3.path={l3.path!r} is not 'pallas', 'padded' or 'sorted'.")
  ep = axes["expert"]
  _require(not l3.host_eval or ep == 1,
           f"--config.l3.host_eval keeps whole tables on one host device, but the expert "
           f"mesh axis ({ep}) splits them by rows; set --config.mesh.expert=1 or turn "
           "host_eval off.")
  _require(l3.rows % ep == 0,
           f"--config.l3.rows={l3.rows} is not divisible by the expert mesh axis ({ep}), "
           f"which splits the L3 tables by rows; use a multiple of {ep}.")


_SUBLAYER_VALIDATORS = {"moe": _validate_moe, "omnimoe": _validate_atomic,
                        "peer": _validate_atomic, "mohge": _validate_mohge}


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int,
             num_processes: int = 1, check_data: bool = True) -> tuple[int, ...]:
  """Checks `cfg` for `num_devices` devices; returns the resolved mesh shape."""
  _validate_model(cfg.model)
  _validate_train(cfg.train)
  _require(cfg.data.seq_len > 0,
           f"--config.data.seq_len must be positive, got {cfg.data.seq_len}.")
  _require(cfg.data.seq_len <= cfg.model.max_seq_len,
           f"--config.data.seq_len={cfg.data.seq_len} is longer than the model "
           f"supports (model.max_seq_len={cfg.model.max_seq_len}); lower seq_len or "
           "raise --config.model.max_seq_len.")
  mesh_shape = sharding.resolve_mesh_shape(cfg.mesh, num_devices)
  axes = dict(zip(sharding.MESH_AXES, mesh_shape))
  batch_ways = math.prod(axes[a] for a in sharding.BATCH_AXES)
  _require(cfg.train.global_batch % batch_ways == 0,
           f"--config.train.global_batch={cfg.train.global_batch} is not divisible "
           f"by the data-parallel mesh axes (data x fsdp x expert = {batch_ways}); "
           f"use a multiple of {batch_ways}.")
  _require(cfg.train.global_batch % num_processes == 0,
           f"--config.train.global_batch={cfg.train.global_batch} is not divisible "
           f"by the {num_processes} processes; use a multiple of {num_processes}.")
  validator = _SUBLAYER_VALIDATORS.get(cfg.model.sublayer)
  if validator is not None:
    validator(cfg, axes)
  _validate_loop(cfg)
  _validate_l3(cfg, axes)
  _require(cfg.checkpoint.keep >= 1,
           f"--config.checkpoint.keep must be at least 1, got {cfg.checkpoint.keep}.")
  _require(cfg.checkpoint.every > 0,
           f"--config.checkpoint.every must be positive, got {cfg.checkpoint.every}.")
  if check_data:
    data_lib.check_ready(cfg.data)
  return mesh_shape


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(cfg.to_json())


def _lookup(tree: dict, dotted: str):
  node = tree
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return "<missing>"
    node = node[part]
  return node


def _differences(saved, current, prefix: str) -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for key in sorted(set(saved) | set(current)):
      out += _differences(saved.get(key, "<missing>"), current.get(key, "<missing>"),
                          f"{prefix}.{key}")
    return out
  return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def check_same_data(saved: dict, current: dict, workdir: str) -> None:
  """Refuses to resume when the data itself changed under the same config."""
  diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in RESUME_FIXED_DATA
           if k in saved and saved.get(k) != current.get(k)]
  if diffs:
    raise ConfigError(
        f"The checkpoint in {workdir} was trained on different data ({'; '.join(diffs)}); "
        "point data.data_dir at the original data, or use a new --workdir.")


def resume_warnings(saved: dict, current: dict) -> list[str]:
  """Allowed changes on resume whose effect a researcher should know about."""
  out = []
  steps = (_lookup(saved, "train.steps"), _lookup(current, "train.steps"))
  if current.get("model", {}).get("sublayer") == "mohge" and steps[0] != steps[1]:
    out.append(f"train.steps changed {steps[0]} -> {steps[1]}, so MoHGE's group loss "
               "switches on at a different step (mohge.group_aux_start_fraction of the "
               "new total).")
  return out


def check_resume_compatible(saved: dict, current: dict, workdir: str) -> None:
  """Refuses to resume a checkpoint written by an incompatible config."""
  diffs = []
  for field in RESUME_FIXED_FIELDS:
    if "." in field and field.split(".")[0] not in saved:
      continue  # a config group newer than the checkpoint: it had its defaults
    diffs += _differences(_lookup(saved, field), _lookup(current, field), field)
  if diffs:
    shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
    raise ConfigError(
        f"The checkpoint in {workdir} was written with a different config "
        f"({shown}); use a new --workdir, or rerun with the original values.")
