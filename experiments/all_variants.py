"""Every FFN sublayer at equal active params per token, on the same data and tokens.

Arms (each within 1% of dense's active params, asserted before training):
  dense, switch (top-1 of 8, capacity 1.25), mixtral (top-2 of 8), deepseek
  (64 fine-grained, top-6 + 2 shared), omnimoe (1,024 atomic experts), peer,
  mohge (widths 40..88: the matched preset, since the 20%-smaller one has 6%
  fewer active params), l3 (LZW, one layer).
LoopMoE is not here: its claim is at equal *total* params and FLOPs against a
deeper vanilla MoE (experiments/loopmoe.py), not at a dense model's budget.
Rows with the same config as another experiment's (dense, deepseek, omnimoe,
peer, l3) reuse that run instead of training it again (experiments/sweep.py).
"""

from experiments import common, omnimoe
from experiments.registry import Claim, Experiment, Match

SPECS = {"dense": "configs/dense.py:{size}", "switch": "configs/moe.py:switch_{size}",
         "mixtral": "configs/moe.py:mixtral_{size}", "deepseek": "configs/moe.py:deepseek_{size}",
         "omnimoe": "configs/omnimoe.py:{size}", "peer": "configs/omnimoe.py:peer_{size}",
         "mohge": "configs/mohge.py:matched_{size}", "l3": "configs/l3.py:lzw_{size}"}
# MoHGE at small: configs/mohge.py:small is the paper's 3B proportions (far more
# active width than dense small's 1,536), so this table narrows it: shared 368 +
# top-6 of widths with mean 192 (1,520, leaving room for the router).
MOHGE_SMALL = {"mohge.group_widths": (80, 112, 144, 176, 208, 240, 272, 304),
               "mohge.shared_ffn_dim": 368}


def arms(scale: str) -> dict:
  out = {a: dict(config=spec.format(size=scale)) for a, spec in SPECS.items()}
  out["deepseek"]["moe.expert_ffn_dim"] = omnimoe.DEEPSEEK_WIDTH[scale]
  if scale == "small":
    out["mohge"] = dict(config="configs/mohge.py:small", **MOHGE_SMALL)
  return out


def sweep(scale: str) -> list[dict]:
  return common.rows(scale, arms(scale))


EXPERIMENT = Experiment(
    name="all_variants",
    title="every sublayer at equal active params",
    paper="docs/papers/harness.md §d",
    sweep=sweep,
    scales=("tiny", "small"),
    columns=("eval/loss", "eval/bits_per_byte", "budget/params", "budget/active_params",
             "budget/forward_flops_per_token", "aux/load_entropy", "perf/tokens_per_s",
             "wall_time_s"),
    claims=tuple(
        Claim(f"{arm} beats dense at equal active params (each paper's baseline claim)",
              "eval/loss", arm, "less", than_arm="dense")
        for arm in ("switch", "mixtral", "deepseek", "omnimoe", "peer", "mohge", "l3")),
    matches=(Match("dense", tuple(a for a in SPECS if a != "dense"), ("active_params",), 0.01),),
)
