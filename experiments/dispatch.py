"""Speed of each dispatch backend of the top-k MoE layer, as ratios to dense.

Not trained: each row times forward+backward (jit(value_and_grad)) of one MoE
sublayer with that backend and of a dense SwiGLU of equal active FLOPs, both
in one process, interleaved (experiments/measure.py); seeds are repeats.
Shape: 4,096 tokens, d 512, 8 experts top-2 (width 512) against dense width
1,024 at tiny; 8,192 tokens, d 1,024, 64 experts top-8 at small (one GPU).
"pallas" runs only on a GPU or TPU (on CPU it would time the interpreter).
"""

from experiments import common
from experiments.registry import Claim, Experiment

BACKENDS = ("sorted", "ragged_dot", "capacity", "pallas")
SHAPES = {"tiny": dict(tokens=4096, d=512, experts=8, top_k=2, width=512),
          "small": dict(tokens=8192, d=1024, experts=64, top_k=8, width=256)}


def sweep(scale: str) -> list[dict]:
  backends = [b for b in BACKENDS if scale != "tiny" or b != "pallas"]
  return [dict(arm=b, seed=s, task="measure", config="configs/moe.py:mixtral_tiny")
          for b in backends for s in common.SEEDS[scale]]


def measure_backend(row: dict, cfg, workdir: str, scale: str, settings: dict) -> dict:
  del workdir, settings  # cfg already carries them
  from experiments import measure  # pylint: disable=import-outside-toplevel
  shape = SHAPES[scale]
  moe = cfg.copy_and_resolve_references()
  moe.model.d_model = shape["d"]
  moe.moe.num_experts, moe.moe.top_k = shape["experts"], shape["top_k"]
  moe.moe.expert_ffn_dim, moe.moe.backend = shape["width"], row["arm"]
  dense = moe.copy_and_resolve_references()
  dense.model.sublayer, dense.model.ffn_dim = "dense", shape["width"] * shape["top_k"]
  times = measure.interleaved_ms({"moe": moe, "dense": dense}, tokens=shape["tokens"],
                                 seed=row["seed"], backward=True)
  return {"time/layer_ms": times["moe"], "time/dense_ms": times["dense"],
          "time/ratio_to_dense": times["moe"] / times["dense"]}


EXPERIMENT = Experiment(
    name="dispatch",
    title="dispatch backends: MoE layer forward+backward time / dense of equal active FLOPs",
    paper="docs/papers/prior_work.md §2.1, §3.1 (megablox, MegaBlocks)",
    sweep=sweep,
    scales=("tiny", "small"),
    columns=("time/layer_ms", "time/dense_ms", "time/ratio_to_dense"),
    claims=(
        Claim("a dropless sorted dispatch costs at most 2x a dense layer of equal active "
              "FLOPs (MegaBlocks reports near-dense throughput on GPUs)",
              "time/ratio_to_dense", "sorted", "less", than_value=2.0),
    ),
    measure=measure_backend,
)
