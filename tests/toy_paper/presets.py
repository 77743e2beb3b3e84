"""Presets of the toy paper: `--config=tests/toy_paper/presets.py:tiny`."""

import tests.toy_paper  # noqa: F401  (registers the toy extension before the config is built)
from moejax.config import base_config, parse_preset

PRESETS = ("tiny",)


def get_config(arg: str | None = None):
  parse_preset(arg, dict.fromkeys(PRESETS), default="tiny")
  c = base_config()
  c.name = "toy_tiny"
  c.model.sublayer = "toy"
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 4
  c.model.num_kv_heads, c.model.head_dim = 2, 8
  c.toy.width = 96
  c.data.name, c.data.tokenizer, c.data.seq_len = "synthetic", "byte", 16
  c.train.global_batch, c.train.steps, c.train.warmup_steps = 8, 8, 2
  c.train.log_every, c.train.eval_every = 4, 1000
  c.train.eval_batches = c.train.final_eval_batches = 2
  c.checkpoint.every = 4
  c.debug.tensorboard = False
  return c
