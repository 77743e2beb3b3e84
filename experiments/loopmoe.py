"""LoopMoE (docs/papers/loopmoe.md): a looped MoE block against a vanilla MoE of equal budget.

Arms, at identical total params, forward FLOPs/token and attention:FFN active
ratio (each within 1% of vanilla, asserted before training):
  vanilla         8-layer top-2 MoE (configs/loopmoe.py:vanilla_tiny)
  loopbase        1 prefix + 2 layers looped 3 times + 1 suffix, no IterAdaLN,
                  experts resized by moejax/papers/loopmoe/balance.py
  loopmoe         the same with IterAdaLN (the paper's model)
  loopmoe_nogate  IterAdaLN without its output gate (1 + alpha): an ablation of
                  the part of IterAdaLN that scales the sublayer output

Claims checked: LoopMoE beats vanilla; IterAdaLN helps (LoopMoE beats Loop
Base); consecutive-iteration cosine similarity rises with the iteration
(cos(h_R, h_R-1) > cos(h_2, h_1), the diagnostic docs/papers/loopmoe.md §d asks for).
"""

from experiments import common, paper_sizes
from experiments.registry import Claim, Experiment, Match

SPECS = {"vanilla": "configs/loopmoe.py:vanilla_{size}",
         "loopbase": "configs/loopmoe.py:loopbase_{size}",
         "loopmoe": "configs/loopmoe.py:loopmoe_{size}",
         "loopmoe_nogate": "configs/loopmoe.py:loopmoe_{size}"}


def arms(scale: str) -> dict:
  # The experiment asserts the budget match itself, for every arm.
  extra = {a: {"budget_match.reference": ""} for a in SPECS}
  extra["loopmoe_nogate"]["loop.adaln_gate"] = False
  return common.preset_arms(SPECS, scale, paper_sizes.LOOPMOE, extra=extra)


def sweep(scale: str) -> list[dict]:
  return common.rows(scale, arms(scale))


def derived(records: list, config: dict) -> dict:
  """The cosine diagnostic at the end of training: last minus first iteration."""
  del config
  first = common.last(records, "aux/loop/cos_first")
  last = common.last(records, "aux/loop/cos_last")
  if first is None or last is None:
    return {}
  return {"loop/cos_first": first, "loop/cos_last": last, "loop/cos_rise": last - first}


EXPERIMENT = Experiment(
    name="loopmoe",
    title="Vanilla MoE vs Loop Base vs LoopMoE at identical params, FLOPs and attention:FFN",
    paper="docs/papers/loopmoe.md",
    sweep=sweep,
    columns=("eval/loss", "eval/bits_per_byte", "budget/params",
             "budget/forward_flops_per_token", "budget/attn_ffn_active_ratio",
             "loop/cos_first", "loop/cos_last", "aux/load_entropy", "wall_time_s"),
    claims=(
        Claim("LoopMoE beats the matched vanilla MoE (3B: 8 of 9 tasks, > 1 point) [§d]",
              "eval/loss", "loopmoe", "less", than_arm="vanilla"),
        Claim("IterAdaLN helps: Loop Base + IterAdaLN beats Loop Base [§d ablation]",
              "eval/loss", "loopmoe", "less", than_arm="loopbase"),
        Claim("consecutive-iteration cosine similarity rises with the iteration [§d]",
              "loop/cos_rise", "loopmoe", "greater", than_value=0.0),
    ),
    matches=(Match("vanilla", ("loopbase", "loopmoe", "loopmoe_nogate"),
                   ("params", "forward_flops_per_token", "attn_ffn_active_ratio"), 0.01),),
    targets=paper_sizes.LOOPMOE_TARGETS,
    derived=derived,
)
