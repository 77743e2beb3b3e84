"""The `mohge` config group: defaults, validation and the fields a resume may not change."""

import ml_collections

from moejax.config.checks import positive, require, width_split
from moejax.moe import dispatch
from moejax.papers.mohge.group_router import GATES

# A resume may change the dispatch (equal across backends); every other field of
# the group fixes the run.
RESUME_FREE = ("mohge.backend", "mohge.block_size")


def defaults() -> ml_collections.ConfigDict:
  # heterogeneous grouped experts (model.sublayer = "mohge")
  # see moejax/papers/mohge/mohge.py; defaults are the tiny preset's
  g = ml_collections.ConfigDict()
  g.group_widths = (28, 44, 60, 76)  # SwiGLU width of each group's experts
  g.experts_per_group = 4
  g.top_groups = 2  # K_g groups chosen per token
  g.top_k = 4  # experts chosen per token, inside the chosen groups
  g.shared_ffn_dim = 128  # always-on shared SwiGLU width (0 = none)
  g.gate = "megatron"  # "megatron": softmax over the k chosen (the released
                       # code path); "renormalized": r / sum of the k chosen
  g.group_aux_coef = 1e-5  # size-weighted group loss (alpha_g)
  g.group_aux_start_fraction = 0.5  # ... switched on after this much training
  g.group_aux_width_interval = 0  # its D; 0 = W_max - W_min + (W_1 - W_0)
  g.intra_aux_coef = 5e-3  # intra-group experts loss (alpha_e)
  g.backend = "sorted"  # a dropless backend: "sorted", "ragged_dot", "pallas", "auto"
  g.block_size = 0  # sorted backend rows per block; 0 = chosen from the load
  return g


def validate(cfg, axes: dict) -> None:
  """Checks cfg.mohge for the "mohge" sublayer."""
  if cfg.model.sublayer != "mohge":
    return
  h = cfg.mohge
  widths = tuple(h.group_widths)
  require(len(widths) >= 1 and all(isinstance(w, int) and w > 0 for w in widths),
          f"--config.mohge.group_widths={widths} must be a tuple of positive integers, "
          "one per group.")
  require(all(a < b for a, b in zip(widths, widths[1:])),
          f"--config.mohge.group_widths={widths} must increase strictly from group to "
          "group (the size weights of the group loss and the decoupled placement "
          "assume it).")
  positive("mohge", h, "experts_per_group", "top_groups", "top_k")
  require(h.top_groups <= len(widths),
          f"--config.mohge.top_groups={h.top_groups} exceeds the {len(widths)} groups "
          "in --config.mohge.group_widths.")
  require(h.top_k <= h.top_groups * h.experts_per_group,
          f"--config.mohge.top_k={h.top_k} exceeds the experts of the chosen groups "
          f"(top_groups x experts_per_group = {h.top_groups * h.experts_per_group}).")
  require(h.gate in GATES, f"--config.mohge.gate={h.gate!r} is not one of {list(GATES)}.")
  require(h.backend in dispatch.DROPLESS,
          f"--config.mohge.backend={h.backend!r} must be a dropless backend: one of "
          f"{sorted(dispatch.DROPLESS)}.")
  for field in ("group_aux_coef", "intra_aux_coef", "group_aux_width_interval",
                "block_size", "shared_ffn_dim"):
    require(getattr(h, field) >= 0,
            f"--config.mohge.{field} must be >= 0, got {getattr(h, field)}.")
  require(0.0 <= h.group_aux_start_fraction <= 1.0,
          f"--config.mohge.group_aux_start_fraction={h.group_aux_start_fraction} must "
          "lie in [0, 1].")
  tp = width_split(axes)
  require(all(w % tp == 0 for w in widths),
          f"--config.mohge.group_widths={widths} must all be divisible by the tensor "
          f"mesh axis ({tp}), which splits each expert's width; change the widths or "
          "--config.mesh.tensor.")
  ep = axes["expert"]
  require(h.experts_per_group % ep == 0,
          f"--config.mohge.experts_per_group={h.experts_per_group} is not divisible by "
          f"the expert mesh axis ({ep}): each shard must hold the same share of every "
          "width; change --config.mesh.expert.")


def resume_warnings(saved: dict, current: dict) -> list[str]:
  """The group loss starts at a fraction of train.steps: a changed total moves it."""
  if current.get("model", {}).get("sublayer") != "mohge":
    return []
  steps = (saved.get("train", {}).get("steps"), current.get("train", {}).get("steps"))
  if steps[0] == steps[1]:
    return []
  return [f"train.steps changed {steps[0]} -> {steps[1]}, so MoHGE's group loss "
          "switches on at a different step (mohge.group_aux_start_fraction of the "
          "new total)."]
