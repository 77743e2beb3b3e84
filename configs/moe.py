"""Top-k MoE presets: `configs/moe.py:<family>_<size>`.

  python run.py --config=configs/moe.py:mixtral_tiny
  python run.py --config=configs/moe.py:deepseek_tiny --config.moe.backend=ragged_dot

families (each tiny preset has the active FFN parameters of configs/dense.py:tiny,
3 * 128 * 384 per layer, so MoE vs dense compares at equal active params):
  switch    top-1 of 8 experts (width 384), softmax router without renormalisation,
            capacity factor 1.25 with dropped tokens reported (Switch Transformer)
  mixtral   top-2 of 8 experts (width 192), softmax over the selected two, dropless
  deepseek  64 fine-grained experts (width 48), top-6 plus 2 shared experts;
            sigmoid router with renormalisation and aux-loss-free bias balancing
            (DeepSeek-V3), a small global load-balance loss; first block dense
sizes: tiny (embedded corpus, CPU, minutes) and small (dense.py:small's trunk, one GPU).
"""

from moejax.config.base import parse_preset
from configs.dense import get_config as dense_config

FAMILIES = ("switch", "mixtral", "deepseek")
SIZES = ("tiny", "small")
PRESETS = tuple(f"{f}_{s}" for f in FAMILIES for s in SIZES)


def get_config(arg: str | None = None):
  preset = parse_preset(arg, dict.fromkeys(PRESETS), default="mixtral_tiny")
  family, size = preset.split("_")
  c = dense_config(size)
  c.name = f"moe_{preset}"
  c.model.sublayer = "moe"
  dense_width = c.model.ffn_dim  # active FFN width to match
  e = c.moe
  if family == "switch":
    e.num_experts, e.top_k, e.expert_ffn_dim = 8, 1, dense_width
    e.renormalize = False
    e.backend, e.capacity_factor = "capacity", 1.25
  elif family == "mixtral":
    e.num_experts, e.top_k, e.expert_ffn_dim = 8, 2, dense_width // 2
  elif family == "deepseek":
    e.num_experts, e.top_k, e.num_shared_experts = 64, 6, 2
    e.expert_ffn_dim = dense_width // 8
    e.score_fn, e.renormalize = "sigmoid", True
    e.bias_update_rate = 1e-3
    e.load_balance_coef = 1e-4
    e.first_dense_layers = 1
  return c
