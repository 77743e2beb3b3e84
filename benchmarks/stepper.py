"""A config's jitted train step, state and data iterator, ready to time.

The trainer's own step and input pipeline, with no checkpoints or evaluation;
train_step.py and profile_ops.py time and profile it.
"""

import time


class Stepper:
  """A config's trainer step, state and data iterator, ready to time.

  `run(n)` dispatches n steps asynchronously, as training does, blocks on the
  last, and returns (seconds, seconds spent waiting for input)."""

  def __init__(self, cfg, warmup: int):
    import jax

    from moejax import budget as budget_lib
    from moejax import config as config_lib
    from moejax import data as data_lib
    from moejax import sharding
    from moejax.optim import make_optimizer
    from moejax.train import StateSpec, make_train_step, model_inputs, to_global_batch

    config_lib.validate(cfg, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
    data = data_lib.RunData.prepare(cfg.data)
    vocab = data.tokenizer.vocab_size
    inputs = model_inputs(cfg, data, vocab)  # e.g. L3's rows per token id
    self.cfg, self.mesh = cfg, sharding.make_mesh(cfg.mesh)
    self._to_global = to_global_batch
    self._rules = cfg.sharding.rules
    self.it = data.train_iterator(
        seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch, seed=cfg.seed,
        rows=sharding.process_batch_rows(self.mesh, cfg.train.global_batch))
    with sharding.use_mesh(self.mesh, self._rules):
      spec = StateSpec(cfg, vocab, self.mesh, make_optimizer(cfg.train), inputs=inputs)
      self.state = spec.init()
      self.step_fn = make_train_step(spec, cfg)
    budget = budget_lib.model_budget(cfg, vocab)
    self.flops_per_token, self.params = budget["train_flops_per_token"], budget["params"]
    self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    self.run(warmup)

  def next_batch(self):
    """The next global batch from the trainer's iterator, on the mesh."""
    return self._to_global(next(self.it), self.mesh, self.cfg.train.global_batch)

  def run(self, steps: int) -> tuple[float, float]:
    import jax

    from moejax import sharding
    wait, metrics = 0.0, None
    with sharding.use_mesh(self.mesh, self._rules):
      start = time.perf_counter()
      for _ in range(steps):
        t0 = time.perf_counter()
        batch = self.next_batch()
        wait += time.perf_counter() - t0
        self.state, metrics = self.step_fn(self.state, batch)
      jax.block_until_ready((self.state["step"], metrics))
      return time.perf_counter() - start, wait
