"""MoHGE presets and their homogeneous baseline, `configs/mohge.py:<preset>`.

  python run.py --config=configs/mohge.py:tiny
  python run.py --config=configs/mohge.py:baseline_tiny
  python run.py --config=configs/mohge.py:tiny --config.mohge.gate=renormalized

The paper compares MoHGE with a homogeneous MoE of as many experts, each 1024
wide, where MoHGE's widths run 384..1280 (mean 832 = 0.81 x 1024): about 20%
fewer routed parameters. Tiny sizes keep that ratio (widths / 16 around a
mean of 52 against 64):
  baseline_tiny  core MoE (sublayer "moe"): 16 experts of width 64, top-4, two
                 shared experts (128 wide), softmax over the selected, intra-
                 expert load-balance loss 5e-3. Active FFN = dense.py:tiny's.
  tiny           MoHGE: 4 groups x 4 experts, widths 28/44/60/76 (mean 52 =
                 0.81 x 64), top-2 groups, top-4 experts, shared 128
  matched_tiny   MoHGE with widths 40/56/72/88 (mean 64): the baseline's total
                 and (under uniform routing) active parameters
  small          8 groups x 8, widths 192..640 (the 3B widths / 2), top-4 groups,
                 top-6, shared 2 x 512, on dense.py:small's trunk (one GPU)
  baseline_small 64 experts of width 512, top-6, two shared
"""

from moejax.config.base import parse_preset
from configs.dense import get_config as dense_config

PRESETS = ("tiny", "matched_tiny", "baseline_tiny", "small", "baseline_small")


def get_config(arg: str | None = None):
  preset = parse_preset(arg, dict.fromkeys(PRESETS), default="tiny")
  size = preset.rsplit("_", 1)[-1]
  c = dense_config(size)
  c.name = f"mohge_{preset}"
  h, e = c.mohge, c.moe
  if preset.startswith("baseline"):
    c.model.sublayer = "moe"
    e.score_fn, e.renormalize = "softmax", True
    e.load_balance_coef, e.z_loss_coef = 5e-3, 0.0
    e.num_shared_experts = 2
    if size == "tiny":
      e.num_experts, e.top_k, e.expert_ffn_dim = 16, 4, 64
    else:
      e.num_experts, e.top_k, e.expert_ffn_dim = 64, 6, 512
    return c
  c.model.sublayer = "mohge"
  if size == "tiny":
    h.group_widths = (40, 56, 72, 88) if preset == "matched_tiny" else (28, 44, 60, 76)
    h.experts_per_group, h.top_groups, h.top_k, h.shared_ffn_dim = 4, 2, 4, 128
  else:
    h.group_widths = (192, 256, 320, 384, 448, 512, 576, 640)
    h.experts_per_group, h.top_groups, h.top_k, h.shared_ffn_dim = 8, 4, 6, 1024
    h.intra_aux_coef = 5e-3
  return c
