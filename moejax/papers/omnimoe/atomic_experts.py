"""The atomic-expert paths behind one name (`atomic.path`).

  gather, expert_sorted   the XLA paths (pallas_kernels/atomic_experts_reference.py,
                          where their equations and trade-offs are written out)
  pallas                  the fused kernel (pallas_kernels/atomic_experts.py)
"""

from pallas_kernels.atomic_experts_reference import (ACTIVATIONS, atomic_expert_sorted,
                                                     atomic_gather)

__all__ = ["ACTIVATIONS", "PATHS", "atomic_expert_sorted", "atomic_ffn", "atomic_gather",
           "atomic_pallas"]


def atomic_pallas(x, expert_idx, gates, up, down, *, activation: str = "silu", out_dtype=None):
  """Same contract, as one Pallas kernel per direction (imported on first use, so
  the XLA paths need no Pallas)."""
  # pylint: disable-next=import-outside-toplevel
  from pallas_kernels.atomic_experts import atomic_pallas as kernel
  return kernel(x, expert_idx, gates, up, down, activation=activation, out_dtype=out_dtype)


PATHS = {"gather": atomic_gather, "expert_sorted": atomic_expert_sorted, "pallas": atomic_pallas}


def atomic_ffn(path: str, x, expert_idx, gates, up, down, *, activation: str = "silu",
               out_dtype=None):
  if path not in PATHS:
    raise ValueError(f"Unknown atomic expert path {path!r}; choose one of {sorted(PATHS)}.")
  return PATHS[path](x, expert_idx, gates, up, down, activation=activation,
                     out_dtype=out_dtype)
