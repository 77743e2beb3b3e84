"""Which kernel variant runs where, and interpret mode.

Every kernel here has up to three bodies behind one entry point:
  "tpu"   Mosaic TPU: BlockSpecs whose index maps read scalar-prefetched metadata
  "gpu"   Triton-dialect Pallas: whole-array refs, dynamic slices, masked stores
  (and the pure-JAX reference beside it, which every test compares against)
On a CPU there is no compiler for either, so a kernel runs in Pallas interpret
mode (the kernel body traced as ordinary JAX ops over the grid): slow, but the
same program, which is how CI checks values and gradients without an
accelerator. `variant` picks the body; interpret defaults to True off-device.
"""

import jax

VARIANTS = ("tpu", "gpu")


def default_platform() -> str:
  return jax.default_backend()


def default_variant(platform: str | None = None) -> str:
  """The kernel body for a platform: Mosaic on TPU, Triton-dialect elsewhere.

  On CPU either body runs in interpret mode; the GPU body is the default there
  because it is the one CI cannot otherwise exercise (it has no scalar-prefetch
  grid spec to lean on)."""
  return "tpu" if (platform or default_platform()) == "tpu" else "gpu"


def resolve(variant: str | None, interpret: bool | None) -> tuple[str, bool]:
  """(variant, interpret) with defaults filled in and names checked."""
  variant = variant or default_variant()
  if variant not in VARIANTS:
    raise ValueError(f"Unknown kernel variant {variant!r}; choose one of {VARIANTS}.")
  if interpret is None:
    interpret = default_platform() != variant  # compiled only on its own platform
  return variant, interpret


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def next_power_of_two(value: int) -> int:
  """The smallest power of two >= value (1 for value <= 1): Triton block widths."""
  return 1 << max(0, int(value) - 1).bit_length()


def is_power_of_two(value: int) -> bool:
  return value > 0 and not value & (value - 1)


def check_tiles(rows: int, k: int, n: int, tiling: tuple[int, int, int]) -> None:
  """A grouped-matmul body takes rows % tm == 0, tk | K and tn | N (callers pad)."""
  tm, tk, tn = tiling
  if rows % tm or k % tk or n % tn:
    raise ValueError(f"Tiling {tiling} must divide (rows, K, N) = {(rows, k, n)}; "
                     "pad the rows to a multiple of tm and pick tk | K, tn | N.")


def fit_tile(dim: int, preferred: int) -> int:
  """The largest power of two <= preferred that divides dim, or dim itself.

  Tiles along K and N must divide the dimension (no masked partial tiles along
  a contraction, the bug class of AI-Hypercomputer/maxtext#1183); a whole
  dimension is always a legal block."""
  size = 1
  while size * 2 <= min(preferred, dim):
    size *= 2
  while size > 1 and dim % size:
    size //= 2
  return size if size >= 8 or size == dim else dim
