"""L3 (Large Lookup Layers) presets: `configs/l3.py:<arm>_<size>`.

  python run.py --config=configs/l3.py:lzw_tiny
  python run.py --config=configs/l3.py:uniform_tiny
  python run.py --config=configs/l3.py:lzw_tiny --config.l3.path=sorted

arms (docs/papers/l3.md: L3 should beat dense at equal active parameters, and
LZW allocation should beat uniform allocation by a wide margin):
  dense      configs/dense.py at the same size (the reference)
  lzw        one L3 layer after decoder layer 2 (the middle), rows allocated by
             the LZW pass over the training tokens
  uniform    the same layer, every token id owning rows / vocab rows
  frequency  the same layer, rows proportional to unigram frequency (a control)
Every L3 arm narrows the decoder's SwiGLU so that its active parameters (with
the L3 layer's projections and the max_rows_per_token rows a token can read)
match the dense arm within 1%, asserted before training (budget_match).
sizes:
  tiny   d 128, 4 layers, vocab 2048; 8,192 rows x (128 + 128) per table
         (2.1M table params beside 1.05M dense: ~3x total/active), cap 32 rows,
         SwiGLU 384 -> 344. CPU, minutes.
  small  d 512, 8 layers, vocab 8192; L3 after layers 3 and 6 with 32,768 rows x
         (512 + 512) each, cap 64, SwiGLU 1536 -> 1400. One GPU.
"""

from moejax.config.base import parse_preset
from configs.dense import get_config as dense_config

ARMS = ("dense", "lzw", "uniform", "frequency")
SIZES = ("tiny", "small")
PRESETS = tuple(f"{a}_{s}" for a in ARMS for s in SIZES)


def get_config(arg: str | None = None):
  preset = parse_preset(arg, dict.fromkeys(PRESETS), default="lzw_tiny")
  arm, size = preset.split("_")
  c = dense_config(size)
  c.name = f"l3_{preset}"
  if arm == "dense":
    return c
  l3 = c.l3
  l3.allocation = arm
  if size == "tiny":
    l3.after_layers = (2,)
    l3.rows, l3.max_rows_per_token = 8192, 32
    l3.emb_dim = l3.up_dim = 128
    c.model.ffn_dim = 344
  else:
    l3.after_layers = (3, 6)
    l3.rows, l3.max_rows_per_token = 32768, 64
    l3.emb_dim = l3.up_dim = 512
    c.model.ffn_dim = 1400
  c.budget_match.reference = f"configs/l3.py:dense_{size}"
  c.budget_match.quantities = ("active_params",)
  return c
