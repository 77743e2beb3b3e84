"""What every benchmark records about its run, and how it writes its results.

  env = common.environment()             # device, versions, date, command
  env = common.environment("jax", "cpu") # only these fields, in this order
  common.write_results(FLAGS.out, text, data)   # print; .md at out, .json beside it

Benchmarks compare variants timed in one process; the environment fields say
where the numbers came from, so results from different machines are not mixed.
"""

import datetime
import json
import os
import platform
import sys

from moejax.timing import time_once  # noqa: F401  (benchmarks call common.time_once)


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def processor() -> str:
  """The short processor name (often just the architecture, e.g. x86_64)."""
  return platform.processor() or platform.machine()


def environment(*keys: str, **overrides) -> dict:
  """Where and how this run happened. All fields, or only `keys` (in that order);
  `overrides` replace field values (and are added if not among `keys`)."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  env = dict(
      platform=devices[0].platform,
      device=str(devices[0].device_kind),
      devices=f"{len(devices)} x {devices[0].device_kind}",
      cores=os.cpu_count(),
      cpu=cpu_model(),
      jax=jax.__version__,
      flax=flax.__version__,
      python=platform.python_version(),
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command="python " + " ".join(sys.argv),
  )
  if keys:
    env = {k: env[k] for k in keys}
  env.update(overrides)
  return env


def versions_line(env: dict) -> str:
  return f"- versions: jax {env['jax']}, flax {env['flax']}, Python {env['python']}"


def header_lines(env: dict) -> list[str]:
  """Markdown bullet lines: device, versions, date, command."""
  return [f"- device: {env['devices']} ({env['platform']}, {env['cores']} host cores, "
          f"{env['cpu']})",
          versions_line(env),
          f"- date: {env['date']}",
          f"- command: `{env['command']}`"]


def write_results(out: str, text: str, data: dict, *, sort_keys: bool = False) -> None:
  """Prints `text`; if `out` is set, writes it there and `data` as JSON beside it
  (same name, .json)."""
  print(text)
  if not out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(data, f, indent=2, sort_keys=sort_keys)


def memory_bytes(compiled) -> dict:
  """XLA's memory plan of a compiled function: argument, output, temp, alias and
  peak (= argument + output + temp - alias) bytes; None where not reported."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends do not implement it
    mem = None
  names = ("argument", "output", "temp", "alias")
  out = {n: (getattr(mem, f"{n}_size_in_bytes", None) if mem is not None else None)
         for n in names}
  out = {n: (int(v) if v is not None else None) for n, v in out.items()}
  if all(out[n] is not None for n in ("argument", "output", "temp")):
    out["peak"] = out["argument"] + out["output"] + out["temp"] - (out["alias"] or 0)
  else:
    out["peak"] = None
  return out


def median_range(values, name: str) -> dict:
  """{name: median, name_min: smallest, name_max: largest} of per-round values."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return {name: float(np.median(values)), f"{name}_min": float(min(values)),
          f"{name}_max": float(max(values))}


def ms(seconds) -> str:
  """Seconds as milliseconds for a table cell; '-' for None."""
  return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def mib(value) -> str:
  """Bytes as MiB for a table cell; '-' for None."""
  return "-" if value is None else f"{value / 2**20:.0f}"
