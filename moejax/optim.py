"""AdamW with linear warmup, cosine decay and global-norm gradient clipping.

  lr(t) = peak * t / warmup                                   for t < warmup
        = end + (peak - end) * (1 + cos(pi * (t - warmup) / (T - warmup))) / 2
  with end = peak * min_lr_ratio. Weight decay applies to matrices only
  (ndim >= 2): norms' scales are not pulled towards zero.
"""

import jax
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_cfg.learning_rate,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio,
  )


def _decay_mask(params):
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(
          learning_rate=learning_rate_schedule(train_cfg),
          b1=train_cfg.b1,
          b2=train_cfg.b2,
          eps=train_cfg.eps,
          weight_decay=train_cfg.weight_decay,
          mask=_decay_mask,
      ),
  )
