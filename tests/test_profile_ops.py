"""benchmarks/profile_ops.py: traced op times joined with the compiled HLO."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.profile_ops import hlo_ops, profile, stage_of


def test_stage_of_reads_scope_and_direction():
  scopes = ["gather", "experts"]
  assert stage_of("jit(loss)/jvp(experts)/while/body/dot_general", scopes) == "experts forward"
  assert stage_of("jit(loss)/transpose(jvp(experts))/dot_general", scopes) == "experts backward"
  assert stage_of("jit(loss)/jvp(gatherer)/mul", scopes) == "other forward"  # whole words only
  assert stage_of("", scopes) == "other forward"


def test_profile_splits_a_gradient_by_named_scope():
  def loss(w, x):
    with jax.named_scope("first"):
      h = jnp.tanh(x @ w)
    with jax.named_scope("second"):
      return jnp.sum(jnp.sin(h @ w.T))

  w, x = jnp.ones((64, 64)) * 0.01, jnp.ones((256, 64))
  grad = jax.jit(jax.grad(loss))
  hlo = grad.lower(w, x).compile().as_text()
  r = profile(lambda: jax.block_until_ready(grad(w, x)), hlo, calls=2,
              scopes=["first", "second"], top=50)
  assert r["op_ms"] > 0
  assert sum(r["stages"].values()) == pytest.approx(r["op_ms"])
  assert {"first forward", "first backward", "second backward"} <= set(r["stages"])
  ops = hlo_ops(hlo)
  assert r["top_ops"] and all(o["op"] in ops for o in r["top_ops"])
