"""The `atomic` config group (OmniMoE and PEER): defaults, validation, resume-fixed fields."""

import math

import ml_collections

from moejax.config.checks import positive, require
from moejax.papers.omnimoe.atomic_experts import PATHS
from moejax.papers.omnimoe.product_router import GRID_TOPK

SUBLAYERS = ("omnimoe", "peer")
# A resume may change the compute path (equal results); every other field of the
# group fixes the run.
RESUME_FREE = ("atomic.path",)


def defaults() -> ml_collections.ConfigDict:
  # atomic experts (model.sublayer = "omnimoe" or "peer")
  # see moejax/papers/omnimoe/omnimoe.py and peer.py
  g = ml_collections.ConfigDict()
  g.num_experts = 1024  # N single-neuron experts; a perfect square (sqrt(N) grid)
  g.top_k = 16  # experts per token (per head for PEER)
  g.shared_ffn_dim = 352  # width of the always-on SwiGLU beside them (0 = none)
  g.router = "product"  # "product": per-axis candidates, O(sqrt(N) + k^2);
                        # "full": scan all N cells (the reference)
  g.path = "gather"  # "gather" (token-centric) or "expert_sorted" (expert-centric)
  g.bn_momentum = 0.1  # router BatchNorm running statistics (PyTorch convention)
  g.bn_eps = 1e-5
  g.expert_init_std = 0.02  # expert tables N(0, std); the OmniMoE code uses 1.0
  g.peer_heads = 1  # PEER: query heads, each choosing top_k experts
  g.peer_query_dim = 128  # PEER: query width per head (0 = d_model); even
  g.peer_query_batchnorm = True  # PEER: BatchNorm on the query
  return g


def validate(cfg, axes: dict) -> None:
  """Checks cfg.atomic for the "omnimoe" and "peer" sublayers."""
  if cfg.model.sublayer not in SUBLAYERS:
    return
  a = cfg.atomic
  positive("atomic", a, "num_experts", "top_k", "bn_eps", "expert_init_std", "peer_heads")
  side = math.isqrt(a.num_experts)
  require(side * side == a.num_experts,
          f"--config.atomic.num_experts={a.num_experts} must be a perfect square (the "
          f"router is a sqrt(N) x sqrt(N) grid); try {side * side} or {(side + 1) ** 2}.")
  require(a.top_k <= a.num_experts,
          f"--config.atomic.top_k={a.top_k} exceeds --config.atomic.num_experts="
          f"{a.num_experts}; choose top_k <= num_experts.")
  require(a.router in GRID_TOPK,
          f"--config.atomic.router={a.router!r} is not one of {sorted(GRID_TOPK)}.")
  require(a.path in PATHS,
          f"--config.atomic.path={a.path!r} is not one of {sorted(PATHS)}.")
  require(a.shared_ffn_dim >= 0,
          f"--config.atomic.shared_ffn_dim must be >= 0, got {a.shared_ffn_dim}.")
  require(0.0 < a.bn_momentum <= 1.0,
          f"--config.atomic.bn_momentum={a.bn_momentum} must lie in (0, 1].")
  qdim = a.peer_query_dim or cfg.model.d_model
  require(cfg.model.sublayer != "peer" or (qdim > 0 and qdim % 2 == 0),
          f"The PEER query width (--config.atomic.peer_query_dim={a.peer_query_dim}, 0 = "
          f"model.d_model) is {qdim}; it must be positive and even (it is split into two "
          "sub-queries).")
  ep = axes["expert"]
  require(a.num_experts % ep == 0,
          f"--config.atomic.num_experts={a.num_experts} is not divisible by the expert "
          f"mesh axis ({ep}); change --config.mesh.expert.")
