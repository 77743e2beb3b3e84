"""Run outputs: metrics.jsonl, TensorBoard events and JSON files in the workdir.

Only process 0 writes. metrics.jsonl holds one JSON object per logged step. A
run that resumes from step S drops what a killed predecessor logged after S
(lines in metrics.jsonl; TensorBoard events via purge_step); a run that starts
from scratch drops everything, so the outputs read as one uninterrupted run.
"""

import json
import os
import shutil
import time

import jax
import numpy as np
from absl import logging


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


def write_json(path: str, obj) -> None:
  """Writes `obj` as JSON atomically (tmp file then rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_plain)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str):
  """The JSON object in `path`, or None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's records in order ([] if there is none); a line cut short by a
  crash is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        out.append(record)
  return out


class MetricWriter:
  """jsonl always; TensorBoard when tensorboardX is installed and enabled."""

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    tb_dir = os.path.join(workdir, "tensorboard")
    if self.active:
      self.truncate_after(resume_step or 0)
      if resume_step is None and os.path.isdir(tb_dir):
        shutil.rmtree(tb_dir)  # events of a run that never checkpointed
    if self.active and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # no TensorFlow needed
        self._tb = SummaryWriter(
            tb_dir, purge_step=None if resume_step is None else resume_step + 1)
      except ImportError:
        logging.info("tensorboardX not installed; writing metrics.jsonl only.")

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (they belong to a run that was killed)."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          keep.append(line)
      except json.JSONDecodeError:
        pass  # a line cut by a kill
    with open(self.path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(self.path + ".tmp", self.path)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _plain(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k in ("step", "time"):
          continue
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
          self._add_bars(k, v, int(step))  # e.g. per-expert load

  def _add_bars(self, tag: str, values: list, step: int) -> None:
    """A vector as a TensorBoard histogram with one bucket per index."""
    v = np.asarray(values, np.float64)
    idx = np.arange(len(v), dtype=np.float64)
    self._tb.add_histogram_raw(
        tag, min=0.0, max=float(len(v) - 1), num=float(v.sum()),
        sum=float((idx * v).sum()), sum_squares=float((idx * idx * v).sum()),
        bucket_limits=(idx + 0.5).tolist(), bucket_counts=v.tolist(), global_step=step)

  def write_text(self, tag: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(tag, text, 0)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
