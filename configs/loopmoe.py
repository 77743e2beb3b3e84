"""LoopMoE presets: `configs/loopmoe.py:<arm>_<size>`, three arms at matched budgets.

  python run.py --config=configs/loopmoe.py:vanilla_tiny
  python run.py --config=configs/loopmoe.py:loopbase_tiny
  python run.py --config=configs/loopmoe.py:loopmoe_tiny
  python run.py --config=configs/loopmoe.py:loopmoe_tiny --dry_run   # the budget match

arms (docs/papers/loopmoe.md):
  vanilla   a top-2 MoE (configs/moe.py:mixtral_<size>) of the full depth
  loopbase  prefix + one block looped R times + suffix at the same effective
            depth, no IterAdaLN; experts resized by moejax/papers/loopmoe/balance.py so
            total params, FLOPs/token and the attention:FFN active ratio match
            vanilla within 1%
  loopmoe   the same plan with IterAdaLN, balanced again; at these sizes the
            search lands on the same experts as loopbase and IterAdaLN's
            per-token FLOPs (1.2% at tiny) fit inside the 1% FLOPs tolerance
            (FLOPs +0.73% against vanilla, -0.44% without IterAdaLN)
The looped arms set budget_match.reference to the vanilla arm, so training and
--dry_run stop if an override breaks the match.
sizes:
  tiny   d 128; vanilla 8 layers x 8 experts (width 192, top-2); loops: 1 prefix
         + 2 layers x 3 iterations + 1 suffix (4 unique layers), 17 experts of
         width 189. CPU, minutes.
  small  d 512; vanilla 12 layers x 8 experts (width 768, top-2), the one-GPU
         plan of docs/papers/loopmoe.md §f; loops: 3 + 3 x 2 + 3 (9 unique layers), 11 experts of
         width 764. (A 2 + 4 x 2 + 2 plan cannot match: one expert more or less
         moves the total by 7.5%.)
The balanced expert counts (17, 11) are prime: for expert parallelism
(--config.mesh.expert > 1) balance with moejax.papers.loopmoe.balance.balance_loop(...,
experts_multiple_of=EP) instead.
"""

from moejax.config.base import parse_preset
from configs.moe import get_config as moe_config
from moejax import data as data_lib
from moejax.papers.loopmoe.balance import balance_loop

ARMS = ("vanilla", "loopbase", "loopmoe")
SIZES = ("tiny", "small")
PRESETS = tuple(f"{a}_{s}" for a in ARMS for s in SIZES)
NAMES = {"vanilla": "loopmoe_vanilla", "loopbase": "loopmoe_base", "loopmoe": "loopmoe"}
# size -> (vanilla layers, (prefix layers, looped layers, iterations))
PLANS = {"tiny": (8, (1, 2, 3)), "small": (12, (3, 3, 2))}


def vanilla(size: str):
  c = moe_config(f"mixtral_{size}")
  c.model.num_layers = PLANS[size][0]
  return c


def get_config(arg: str | None = None):
  preset = parse_preset(arg, dict.fromkeys(PRESETS), default="loopmoe_tiny")
  arm, size = preset.split("_")
  c = vanilla(size)
  c.name = NAMES[arm] + f"_{size}"
  if arm == "vanilla":
    return c
  prefix, block, iterations = PLANS[size][1]
  looped, _ = balance_loop(c, prefix_layers=prefix, block_layers=block,
                           iterations=iterations, iter_adaln=arm == "loopmoe",
                           vocab_size=data_lib.vocab_size(c.data))
  looped.name = NAMES[arm] + f"_{size}"
  looped.budget_match.reference = f"configs/loopmoe.py:vanilla_{size}"
  return looped
