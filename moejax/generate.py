"""Autoregressive sampling with a KV cache: one prefill, then one token per step.

    tokens = Generator(graphdef, params, model_state, max_len=...).generate(
        prompt_ids, max_new_tokens=64, temperature=0.8, top_k=40, top_p=0.95, seed=0,
        num_samples=4)

The prefill runs the prompt through Transformer.decode once and fills the cache;
each later step feeds the token just drawn at the next position. Both are jitted
with the cache donated, so the cache is updated in place and nothing compiles
again after the first token (the position is a traced argument).

The next token is drawn from softmax(filter(logits / temperature)), where filter
keeps the top_k largest logits (0 = all) and then the smallest set of tokens
whose probabilities reach top_p (1 = all); temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import ConfigError


def check_sampling_options(*, temperature: float, top_k: int, top_p: float,
                           max_new_tokens: int, num_samples: int, vocab_size: int) -> None:
  """One sentence per option out of range."""
  if not (temperature >= 0 and math.isfinite(temperature)):
    raise ConfigError(f"--temperature={temperature} must be >= 0 (0 = greedy).")
  if not 0 <= top_k <= vocab_size:
    raise ConfigError(f"--top_k={top_k} must lie in [0, {vocab_size}] (0 = no top-k "
                      "filter).")
  if not 0 < top_p <= 1:
    raise ConfigError(f"--top_p={top_p} must lie in (0, 1] (1 = no nucleus filter).")
  if max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens={max_new_tokens} must be at least 1.")
  if num_samples < 1:
    raise ConfigError(f"--num_samples={num_samples} must be at least 1.")


def filter_logits(logits, *, top_k: int, top_p: float):
  """logits [b, vocab] with everything outside the top-k / nucleus set at -inf."""
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass of the tokens ranked above it is below top_p: the
    # smallest set reaching top_p, and always the most likely token.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg_inf)
  return logits


def next_token(logits, key, *, temperature: float, top_k: int, top_p: float):
  """logits [b, vocab] float32 -> token ids [b] int32."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
  """Jitted prefill and decode steps of one model, for prompts of any length up
  to max_len - 1 (the cache holds max_len positions)."""

  def __init__(self, graphdef, params, model_state, *, max_len: int):
    self.graphdef, self.params, self.model_state = graphdef, params, model_state
    self.max_len = max_len
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,),
                            static_argnames=("temperature", "top_k", "top_p"))
    self._step = jax.jit(self._step_fn, donate_argnums=(2,),
                         static_argnames=("temperature", "top_k", "top_p"))

  def _model(self, params, model_state):
    return nnx.merge(self.graphdef, params, model_state)

  def init_cache(self, batch: int):
    model = self._model(self.params, self.model_state)
    return model.init_cache(batch, self.max_len)

  def _prefill_fn(self, params, model_state, cache, prompt, key, **sampling):
    model = self._model(params, model_state)
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1]), prompt.shape)
    logits, cache = model.decode(prompt, positions=positions, cache=cache)
    return next_token(logits[:, -1], key, **sampling), logits, cache

  def _step_fn(self, params, model_state, cache, token, position, key, **sampling):
    model = self._model(params, model_state)
    positions = jnp.full((token.shape[0], 1), position, jnp.int32)
    logits, cache = model.decode(token[:, None], positions=positions, cache=cache)
    return next_token(logits[:, -1], key, **sampling), logits[:, -1], cache

  def generate(self, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
               return_logits: bool = False, on_token=None):
    """prompt_ids: a list of token ids (BOS included) -> int array [num_samples,
    max_new_tokens] of drawn tokens (and the logits of every position when
    return_logits: [num_samples, len(prompt) + max_new_tokens - 1, vocab]).
    on_token(step, tokens [num_samples]) is called after each token is drawn."""
    prompt_len = len(prompt_ids)
    if prompt_len + max_new_tokens > self.max_len:
      raise ConfigError(
          f"The prompt ({prompt_len} tokens) plus --max_new_tokens={max_new_tokens} "
          f"exceeds the {self.max_len} positions of the cache; shorten the prompt or "
          "generate fewer tokens.")
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    prompt = jnp.broadcast_to(jnp.asarray(prompt_ids, jnp.int32), (num_samples, prompt_len))
    cache = self.init_cache(num_samples)
    token, logits, cache = self._prefill(self.params, self.model_state, cache, prompt,
                                         keys[0], **sampling)
    all_logits = [logits] if return_logits else None
    drawn = [token]
    if on_token is not None:
      on_token(0, token)
    for i in range(1, max_new_tokens):
      position = jnp.int32(prompt_len + i - 1)
      token, logits, cache = self._step(self.params, self.model_state, cache, token,
                                        position, keys[i], **sampling)
      drawn.append(token)
      if return_logits:
        all_logits.append(logits[:, None])
      if on_token is not None:
        on_token(i, token)
    tokens = np.stack(jax.device_get(drawn), axis=1)
    if return_logits:
      return tokens, np.concatenate(jax.device_get(all_logits), axis=1)
    return tokens


@functools.partial(jax.jit, static_argnums=(0,))
def full_forward_logits(graphdef, params, model_state, tokens):
  """Evaluation-mode logits of a whole sequence [b, s]: the reference a cached
  decode must equal, and the no-cache baseline of benchmarks/decode.py."""
  logits, _ = nnx.merge(graphdef, params, model_state)(tokens, train=False)
  return logits
