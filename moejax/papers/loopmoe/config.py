"""The `loop` config group (LoopMoE): defaults, validation, resume-fixed fields."""

import ml_collections

from moejax.config.checks import positive, require

# A resume may change remat (memory, not results); every other field fixes the run.
RESUME_FREE = ("loop.remat",)


def defaults() -> ml_collections.ConfigDict:
  # looped block (LoopMoE); see moejax/model/loop.py
  # Layers run as: prefix_layers unique blocks, then block_layers blocks applied
  # `iterations` times with shared weights, then the remaining
  # num_layers - prefix_layers - block_layers blocks. block_layers = 0: no loop.
  g = ml_collections.ConfigDict()
  g.prefix_layers = 0
  g.block_layers = 0
  g.iterations = 1  # R
  g.iter_adaln = True  # IterAdaLN at each pre-norm of the looped block ("Loop Base": off)
  g.adaln_dim = 4  # width a of the conditioning vector c = SiLU(MLP(PE(k)) + W_h h)
  g.adaln_pe_dim = 32  # width of the sinusoidal iteration encoding PE(k)
  g.adaln_gate = True  # also modulate the sublayer output: h + (1 + alpha) * F(...)
  g.remat = False  # recompute each iteration's activations in the backward pass
  return g


def validate(cfg, axes: dict) -> None:
  """Checks cfg.loop (the looped block of LoopMoE)."""
  del axes
  lp, layers = cfg.loop, cfg.model.num_layers
  for field in ("prefix_layers", "block_layers"):
    require(getattr(lp, field) >= 0,
            f"--config.loop.{field} must be >= 0, got {getattr(lp, field)}.")
  require(lp.iterations >= 1,
          f"--config.loop.iterations must be at least 1, got {lp.iterations}.")
  if lp.block_layers == 0:
    require(lp.iterations == 1,
            f"--config.loop.iterations={lp.iterations} needs a looped block: set "
            "--config.loop.block_layers to the number of layers to repeat.")
    return
  require(lp.prefix_layers + lp.block_layers <= layers,
          f"--config.loop.prefix_layers={lp.prefix_layers} plus loop.block_layers="
          f"{lp.block_layers} exceed model.num_layers={layers} (the unique layers); lower "
          "them or raise num_layers.")
  positive("loop", lp, "adaln_dim", "adaln_pe_dim")
  require(lp.adaln_pe_dim % 2 == 0,
          f"--config.loop.adaln_pe_dim={lp.adaln_pe_dim} must be even (sine and cosine "
          "halves).")


_L3_ALLOCATIONS = ("lzw", "uniform", "frequency")
