"""A trained run, loaded for use: its config, tokenizer and weights at one checkpoint.

    run = SavedRun.load("runs/dense_tiny")            # latest checkpoint
    run = SavedRun.load(workdir, step=200, one_device=True)
    model = run.model()                               # an nnx Transformer

The config is the one the checkpoint recorded (not config.json, which a later
command may have rewritten), laid over today's defaults so a field added since
keeps its default. The tokenizer is the run's own, and its fingerprint must
equal the recorded one: another tokenizer would silently score other token ids.
Loading reads the checkpoint and writes nothing into the workdir.

The mesh is the run's (its mesh config, on the devices here), or one device.
Extensions' model inputs come from the checkpoint, not the data: the restored
model state replaces the stand-ins (e.g. L3's row index).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from moejax import config as config_lib
from moejax import data as data_lib
from moejax import sharding
from moejax.checkpoint import Checkpointer
from moejax.errors import ConfigError
from moejax.optim import make_optimizer

ONE_DEVICE_MESH = dict(data=1, fsdp=1, expert=1, tensor=1)


def _as_config_value(value):
  """JSON lists back to the tuples the config fields hold."""
  if isinstance(value, list):
    return tuple(_as_config_value(v) for v in value)
  return value


def _overlay(target: ml_collections.ConfigDict, saved: dict, prefix: str = "") -> None:
  for key, value in saved.items():
    if key not in target:
      continue  # a field that no longer exists: nothing reads it
    if isinstance(value, dict) and isinstance(target[key], ml_collections.ConfigDict):
      _overlay(target[key], value, f"{prefix}{key}.")
    else:
      target[key] = _as_config_value(value)


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint recorded, over today's defaults."""
  cfg = config_lib.base_config()
  _overlay(cfg, saved)
  return cfg


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps saved in workdir, or a ConfigError if there are none."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} does not exist; pass the directory a "
                      "training run wrote (run.py --workdir=...).")
  steps = Checkpointer(directory, keep=1_000_000).all_steps() if os.path.isdir(
      directory) else []
  if not steps:
    raise ConfigError(f"{workdir} holds no checkpoint (no {directory}/<step>); train "
                      "there first with run.py --workdir=" + workdir + ".")
  return steps


@dataclasses.dataclass
class SavedRun:
  workdir: str
  step: int
  cfg: ml_collections.ConfigDict
  data: data_lib.RunData
  mesh: jax.sharding.Mesh
  spec: object  # the trainer's StateSpec: graph definition and shardings
  params: object
  model_state: object
  dataset: dict  # what identified the training data (RunData.info) at save time

  @classmethod
  def load(cls, workdir: str, *, step: int | None = None, one_device: bool = False,
           say=print) -> "SavedRun":
    from moejax.train import StateSpec, model_inputs  # the trainer builds the same state
    workdir = os.path.abspath(workdir)
    steps = checkpoint_steps(workdir)
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(f"{workdir} has no checkpoint at step {step}; it has steps "
                        f"{steps}.")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000,
                        async_save=False)
    meta = ckpt.read_meta(step)
    cfg = config_from_dict(meta["config"])
    if one_device:
      cfg.mesh = ml_collections.ConfigDict(ONE_DEVICE_MESH)
    devices = jax.devices()[:1] if one_device else None
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)

    data = data_lib.RunData.prepare(cfg.data)
    saved_fp = meta.get("dataset", {}).get("tokenizer_fingerprint")
    if saved_fp and not config_lib.same_tokenizer(saved_fp, data.info):
      raise ConfigError(
          f"The tokenizer found for {cfg.data.name!r} in {data.data_dir} is not the one "
          f"the run in {workdir} was trained with (fingerprint "
          f"{data.tokenizer.fingerprint[:12]} vs {saved_fp[:12]}); point "
          "data.data_dir at the run's data (set TFDS_DATA_DIR).")
    vocab_size = data.vocab_size
    inputs = model_inputs(cfg, None, vocab_size, shapes_only=True, say=lambda _: None)
    with sharding.use_mesh(mesh, cfg.sharding.rules):
      spec = StateSpec(cfg, vocab_size, mesh, make_optimizer(cfg.train), inputs=inputs)
      state, _ = ckpt.restore(step, spec.abstract_with_shardings())
    ckpt.close()
    say(f"loaded {workdir} at step {step} ({spec.num_params:,} params, "
        f"{cfg.model.sublayer} sublayer) on {mesh.devices.size} device(s)")
    return cls(workdir=workdir, step=step, cfg=cfg, data=data, mesh=mesh,
               spec=spec, params=state["params"],
               model_state=state["model_state"], dataset=meta.get("dataset", {}))

  @property
  def graphdef(self):
    return self.spec.graphdef

  def model(self):
    return nnx.merge(self.graphdef, self.params, self.model_state)

  def use_mesh(self):
    """The context every call into the model runs under (its sharding rules)."""
    return sharding.use_mesh(self.mesh, self.cfg.sharding.rules)
