"""L3 (docs/papers/l3.md): large lookup layers against dense and an MoE of equal total params.

Arms:
  dense    configs/dense.py
  lzw      one L3 layer after decoder layer 2, rows allocated by LZW; the decoder's
           SwiGLU narrowed so active params match dense (within 1%, asserted)
  uniform  the same layer with every token id owning the same number of rows
  moe      a top-2 MoE with dense's active params and 9 experts, so its total
           params match the L3 model's (within 1%, asserted)

Claims checked: L3 (LZW) beats dense at equal active params; LZW allocation
beats uniform allocation (the paper: uniform loses almost all the gain); L3
beats an MoE of equal total params. The table also shows the L3 read's
softmax entropy (normalised by log rows) at the end of training.
"""

from experiments import common, paper_sizes
from experiments.registry import Claim, Experiment, Match

SPECS = {"dense": "configs/l3.py:dense_{size}", "lzw": "configs/l3.py:lzw_{size}",
         "uniform": "configs/l3.py:uniform_{size}", "moe": "configs/moe.py:mixtral_{size}"}
# Experts of the equal-total-params MoE (8 x width of dense / 2 is mixtral's).
MOE_EXPERTS = {"tiny": 9, "small": 9}


def arms(scale: str) -> dict:
  size = "small" if scale == "paper" else scale
  return common.preset_arms(SPECS, scale, paper_sizes.L3,
                            extra={"moe": {"moe.num_experts": MOE_EXPERTS[size]}})


def sweep(scale: str) -> list[dict]:
  return common.rows(scale, arms(scale))


EXPERIMENT = Experiment(
    name="l3",
    title="dense vs L3 (LZW) vs L3 (uniform) vs an MoE of equal total params",
    paper="docs/papers/l3.md",
    sweep=sweep,
    columns=("eval/loss", "eval/bits_per_byte", "budget/params", "budget/active_params",
             "aux/l3_entropy_norm/after_02", "wall_time_s"),
    claims=(
        Claim("L3 beats dense at equal active params (803M: Wiki2 PPL 20.23 vs 22.02) [§d]",
              "eval/loss", "lzw", "less", than_arm="dense"),
        Claim("LZW allocation beats uniform allocation, which loses almost all the gain [§d]",
              "eval/loss", "lzw", "less", than_arm="uniform"),
        Claim("L3 beats an MoE of equal total params [§d, iso-sparsity baseline]",
              "eval/loss", "lzw", "less", than_arm="moe"),
    ),
    matches=(Match("dense", ("lzw", "uniform", "moe"), ("active_params",), 0.01),
             Match("lzw", ("moe",), ("params",), 0.01)),
    targets=paper_sizes.L3_TARGETS,
)
