"""One FFN sublayer's jitted forward+backward, as the layer benchmarks time it.

    loss = mean(y^2) + the layer's auxiliary losses,  y, aux = layer(x, train=True)

backend "dense" is a dense SwiGLU of width dense_ffn; any other is a top-k MoE
with that dispatch backend and experts of width dense_ffn / top_k, so both sides
have equal active FLOPs.
"""


def sublayer_step(backend: str, num_experts: int, top_k: int, *, d_model: int, dense_ffn: int):
  """(jitted value_and_grad over (params, x), params)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from moejax.config.base import base_config
  from moejax.model import sublayers

  cfg = base_config()
  cfg.model.d_model = d_model
  if backend == "dense":
    cfg.model.sublayer, cfg.model.ffn_dim = "dense", dense_ffn
  else:
    cfg.model.sublayer = "moe"
    cfg.moe.num_experts, cfg.moe.top_k = num_experts, top_k
    cfg.moe.expert_ffn_dim = dense_ffn // top_k
    cfg.moe.backend = backend
  layer = sublayers.build(cfg, 0, nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x, train=True)
    aux_loss = sum((v for k, v in aux.items() if k.startswith("loss/")), 0.0)
    return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux_loss

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params
