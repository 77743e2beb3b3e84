"""The `moe` config group: defaults, validation and the fields a resume may not change."""

import ml_collections

from moejax.config.checks import positive, require, width_split
from moejax.moe import dispatch
from moejax.moe.router import SCORE_FNS

# A resume may change these (the dispatch is equal across backends); every other
# field of the group fixes the run.
RESUME_FREE = ("moe.backend", "moe.block_size")


def defaults() -> ml_collections.ConfigDict:
  # MoE sublayer (model.sublayer = "moe"); see moejax/moe/layer.py
  g = ml_collections.ConfigDict()
  g.num_experts = 8
  g.top_k = 2
  g.expert_ffn_dim = 192  # SwiGLU width of one routed expert
  g.num_shared_experts = 0  # always-on experts (DeepSeekMoE), each expert_ffn_dim wide
  g.score_fn = "softmax"  # router scores: "softmax" or "sigmoid" (fp32)
  g.renormalize = True  # divide the k selected scores by their sum
  g.routed_scaling_factor = 1.0  # multiplies the routed output (DeepSeek-V3: 2.5)
  g.load_balance_coef = 0.01  # global-batch load-balance loss weight (0 = off)
  g.z_loss_coef = 1e-3  # router z-loss weight (0 = off)
  g.bias_update_rate = 0.0  # aux-loss-free balancing: bias += rate * sign(load error)
  g.backend = "sorted"  # dispatch: "sorted", "ragged_dot", "capacity", "pallas" or
                        # "auto" (fastest measured on the platform: dispatch/auto.py)
  g.block_size = 0  # rows per block of the sorted backend; 0 = chosen from the load
  g.capacity_factor = 1.25  # "capacity" backend: slots per expert = cf * T * k / E
  g.ep_capacity_factor = 0.0  # expert parallelism: rows sent to each expert shard,
                              # as a multiple of the balanced share; 0 = dropless
  g.first_dense_layers = 0  # the first N blocks keep a dense FFN (DeepSeekMoE)
  return g


def validate(cfg, axes: dict) -> None:
  """Checks cfg.moe when the model uses the "moe" sublayer."""
  if cfg.model.sublayer != "moe":
    return
  e = cfg.moe
  positive("moe", e, "num_experts", "top_k", "expert_ffn_dim")
  require(e.top_k <= e.num_experts,
          f"--config.moe.top_k={e.top_k} exceeds --config.moe.num_experts="
          f"{e.num_experts}; choose top_k <= num_experts.")
  require(e.score_fn in SCORE_FNS,
          f"--config.moe.score_fn={e.score_fn!r} is not one of {list(SCORE_FNS)}.")
  require(e.backend in dispatch.BACKENDS,
          f"Unknown --config.moe.backend={e.backend!r}; choose one of "
          f"{dispatch.BACKENDS.names()}.")
  require(e.num_shared_experts >= 0,
          f"--config.moe.num_shared_experts must be >= 0, got {e.num_shared_experts}.")
  for field in ("load_balance_coef", "z_loss_coef", "bias_update_rate", "block_size",
                "ep_capacity_factor"):
    require(getattr(e, field) >= 0,
            f"--config.moe.{field} must be >= 0, got {getattr(e, field)}.")
  require(e.routed_scaling_factor > 0,
          f"--config.moe.routed_scaling_factor must be positive, got "
          f"{e.routed_scaling_factor}.")
  require(e.backend != "capacity" or e.capacity_factor > 0,
          f"--config.moe.capacity_factor must be positive for the capacity backend, "
          f"got {e.capacity_factor}.")
  require(0 <= e.first_dense_layers <= cfg.model.num_layers,
          f"--config.moe.first_dense_layers={e.first_dense_layers} must lie in "
          f"[0, model.num_layers={cfg.model.num_layers}].")
  tp = width_split(axes)
  require(e.expert_ffn_dim % tp == 0,
          f"--config.moe.expert_ffn_dim={e.expert_ffn_dim} is not divisible by the tensor "
          f"mesh axis ({tp}), which splits each expert's width; change one of them.")
  ep = axes["expert"]
  require(e.num_experts % ep == 0,
          f"--config.moe.num_experts={e.num_experts} is not divisible by the expert "
          f"mesh axis ({ep}); use a multiple of {ep} experts or change "
          "--config.mesh.expert.")
  require(ep == 1 or e.backend in dispatch.DROPLESS,
          f"--config.moe.backend={e.backend!r} runs without expert parallelism; with "
          f"--config.mesh.expert={ep} use one of {sorted(dispatch.DROPLESS)} (and "
          "--config.moe.ep_capacity_factor to cap the exchange).")
