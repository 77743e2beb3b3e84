"""Timing rows ("task": "measure"): sublayers timed side by side in one process.

The machines are shared and noisy, so every comparison is a ratio measured in
one run: the variants' calls are interleaved round by round, and each gets the
median of its rounds.
"""

import numpy as np


def _sublayer_fn(cfg, tokens: int, seed: int, backward: bool):
  """A jitted call of cfg's FFN sublayer on [1, tokens, d] inputs, and its args."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model import sublayers  # pylint: disable=import-outside-toplevel

  # The last block: DeepSeek-style configs keep their first blocks dense.
  layer = sublayers.build(cfg, cfg.model.num_layers - 1, nnx.Rngs(params=seed))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(seed), (1, tokens, cfg.model.d_model), jnp.float32)
  ids = jnp.zeros((1, tokens), jnp.int32)

  def forward(params, x):
    y, _ = nnx.merge(graphdef, params, rest)(x, token_ids=ids, train=False)
    return y

  if not backward:
    return jax.jit(forward), (params, x)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x, token_ids=ids, train=True)
    extra = sum((v for k, v in aux.items() if k.startswith("loss/")), 0.0)
    return jnp.mean(jnp.square(y.astype(jnp.float32))) + extra

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x)


def interleaved_ms(cfgs: dict, *, tokens: int, seed: int, backward: bool = False,
                   repeats: int = 9) -> dict:
  """name -> median milliseconds per call of each config's sublayer."""
  import jax  # pylint: disable=import-outside-toplevel
  from moejax.timing import time_once  # pylint: disable=import-outside-toplevel
  fns = {name: _sublayer_fn(cfg, tokens, seed, backward) for name, cfg in cfgs.items()}
  for fn, args in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      times[name].append(time_once(fn, args))
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}
