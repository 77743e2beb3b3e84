"""Atomic-expert presets: OmniMoE and its PEER baseline, `configs/omnimoe.py:<preset>`.

  python run.py --config=configs/omnimoe.py:tiny
  python run.py --config=configs/omnimoe.py:peer_tiny
  python run.py --config=configs/omnimoe.py:tiny --config.atomic.path=expert_sorted

Every preset has exactly the active FFN parameters of configs/dense.py at the
same size (tiny: 3 * 128 * 384 = 147,456 per layer), so it compares with
dense.py and moe.py presets at equal active parameters:
  tiny       N = 1024 atomic experts (32 x 32 grid), top-16, shared SwiGLU 352:
             3*128*352 + 2*16*128 (experts) + 2*32*128 (router) = 147,456
  peer_tiny  N = 1024, one head, top-16, query width 128, shared SwiGLU 320:
             3*128*320 + 2*16*128 + 128*128 (query) + 32*128 (sub-keys) = 147,456
  small      N = 16384 (128 x 128), top-64, shared 1408 (d = 512, one GPU)
  peer_small N = 16384, 4 heads x top-16, query 128, shared 1312
"""

from moejax.config.base import parse_preset
from configs.dense import get_config as dense_config

PRESETS = ("tiny", "small", "peer_tiny", "peer_small")


def get_config(arg: str | None = None):
  preset = parse_preset(arg, dict.fromkeys(PRESETS), default="tiny")
  size = preset.rsplit("_", 1)[-1]
  c = dense_config(size)
  c.name = f"omnimoe_{preset}"
  a = c.atomic
  if preset.startswith("peer"):
    c.model.sublayer = "peer"
    a.peer_query_dim = 128
    if size == "tiny":
      a.num_experts, a.top_k, a.peer_heads, a.shared_ffn_dim = 1024, 16, 1, 320
    else:
      a.num_experts, a.top_k, a.peer_heads, a.shared_ffn_dim = 16384, 16, 4, 1312
  else:
    c.model.sublayer = "omnimoe"
    if size == "tiny":
      a.num_experts, a.top_k, a.shared_ffn_dim = 1024, 16, 352
    else:
      a.num_experts, a.top_k, a.shared_ffn_dim = 16384, 64, 1408
  return c
