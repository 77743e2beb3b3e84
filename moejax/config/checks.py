"""The checks validators are made of: each failure is one ConfigError sentence that
names the field and says what to change."""

from moejax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def positive(group: str, node, *fields: str) -> None:
  for field in fields:
    require(getattr(node, field) > 0,
            f"--config.{group}.{field} must be positive, got {getattr(node, field)}.")


def one_of(group: str, node, field: str, allowed) -> None:
  """The field's value is one of `allowed` (a tuple, or a mapping's keys)."""
  allowed = tuple(allowed)
  value = getattr(node, field)
  require(value in allowed,
          f"--config.{group}.{field}={value!r} is not one of {list(allowed)}.")


def width_split(axes: dict) -> int:
  """Ways an expert's hidden width is split: by `tensor`, inside the expert-parallel
  shard_map only (without EP a width that does not divide is just replicated)."""
  return axes["tensor"] if axes["expert"] > 1 else 1
