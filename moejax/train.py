"""Training and evaluation: `train_and_evaluate(cfg, workdir)`.

Reads top to bottom: validate -> data -> workdir and resume check -> mesh ->
model/optimizer state (initialized directly into its shardings, or restored) ->
jitted steps -> loop (log, evaluate, checkpoint) -> final evaluation.

The train state is a dict of pytrees:
  params       nnx.State of nnx.Param          (the optimizer updates these)
  model_state  nnx.State of all other variables (updated by the forward pass,
               e.g. aux-loss-free router biases; never touched by the optimizer)
  opt_state    optax state
  step         int32, steps taken
  first_bad_step int32, -1 until a step produced a non-finite loss or gradient
A non-finite step leaves params, model_state and opt_state unchanged; the host
sees `first_bad_step` before the next checkpoint and stops without saving, so
the last checkpoint on disk is always a good one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from moejax import budget as budget_lib
from moejax import extensions
from moejax import mfu as mfu_lib
from moejax.config import budget_match
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import run_history
from moejax import sharding
from moejax.checkpoint import Checkpointer
from moejax.errors import ConfigError, NonFiniteLossError
from moejax.metrics import MetricWriter
from moejax.model.transformer import Transformer
from moejax.optim import learning_rate_schedule, make_optimizer
from moejax.provenance import provenance
from moejax import workdir as workdir_lib
from moejax.workdir_lock import WorkdirLock

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def say(msg: str) -> None:
  """Progress output for people: process 0 only, unbuffered."""
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------
def cross_entropy(logits, targets, weights):
  """Returns (sum of weighted token NLL in nats, sum of weights)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights)


def split_aux(aux: dict) -> tuple[jax.Array, dict]:
  """Aux losses ("loss/*", already weighted) summed, and all entries as metrics."""
  total = sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.float32(0))
  return total, {f"aux/{k}": v for k, v in aux.items()}


# ----------------------------------------------------------------------------
# Model and state construction
# ----------------------------------------------------------------------------
class StateSpec:
  """Graph definition, abstract state and shardings of model + optimizer."""

  def __init__(self, cfg, vocab_size: int, mesh, tx, *, inputs: dict | None = None):
    """inputs: what extensions prepared for their layers (model_inputs)."""
    rules = cfg.sharding.rules
    self.cfg, self.vocab_size, self.mesh, self.tx = cfg, vocab_size, mesh, tx
    self.inputs = inputs
    abstract_model = nnx.eval_shape(lambda: self._new_model())
    self.graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    params_sh = sharding.state_shardings(abs_params, mesh, rules)
    rest_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abs_rest)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abs_opt, params_sh,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    scalar = sharding.replicated(mesh)
    self.shardings = dict(params=params_sh, model_state=rest_sh, opt_state=opt_sh,
                          step=scalar, first_bad_step=scalar)
    self.abstract = dict(params=abs_params, model_state=abs_rest, opt_state=abs_opt,
                         step=jax.ShapeDtypeStruct((), jnp.int32),
                         first_bad_step=jax.ShapeDtypeStruct((), jnp.int32))
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params))

  def _new_model(self):
    return Transformer(self.cfg, self.vocab_size, nnx.Rngs(params=self.cfg.seed),
                       inputs=self.inputs)

  def init(self) -> dict:
    """A fresh train state, created directly in its shardings."""

    def init_fn():
      _, params, rest = nnx.split(self._new_model(), nnx.Param, ...)
      return dict(params=params, model_state=rest, opt_state=self.tx.init(params),
                  step=jnp.int32(0), first_bad_step=jnp.int32(-1))

    return jax.jit(init_fn, out_shardings=self.shardings)()

  def abstract_with_shardings(self) -> dict:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.shardings)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def make_train_step(spec: StateSpec, cfg) -> Callable:
  tx, graphdef = spec.tx, spec.graphdef
  schedule = learning_rate_schedule(cfg.train)
  nan_step = int(cfg.debug.inject_nan_at_step)

  def train_step(state, batch):
    def loss_fn(params, model_state):
      # Fresh variables for this trace: the forward pass may update model state
      # (e.g. router biases), and nnx refuses to mutate variables of an outer trace.
      model_state = jax.tree.map(lambda v: v, model_state)
      model = nnx.merge(graphdef, params, model_state)
      logits, aux = model(batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], step=state["step"],
                          train=True)
      nll_sum, w_sum = cross_entropy(logits, batch["targets"], batch["weights"])
      ce = nll_sum / jnp.maximum(w_sum, 1.0)
      aux_loss, aux_metrics = split_aux(aux)
      loss = ce + aux_loss
      if nan_step >= 0:  # debug: poison one step to exercise the guard
        loss = jnp.where(state["step"] + 1 == nan_step, jnp.nan, loss)
      new_model_state = nnx.state(model, nnx.Not(nnx.Param))
      return loss, (ce, aux_metrics, new_model_state)

    (loss, (ce, aux_metrics, new_ms)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"], state["model_state"])
    updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_ok(new, old):
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    step = state["step"]
    bad = state["first_bad_step"]
    new_state = dict(
        params=keep_if_ok(new_params, state["params"]),
        model_state=keep_if_ok(new_ms, state["model_state"]),
        opt_state=keep_if_ok(new_opt, state["opt_state"]),
        step=step + 1,
        first_bad_step=jnp.where(ok | (bad >= 0), bad, step + 1),
    )
    metrics = dict(loss=loss, ce_loss=ce, grad_norm=grad_norm, lr=schedule(step),
                   **aux_metrics)
    return new_state, metrics

  batch_sh = {k: sharding.batch_sharding(spec.mesh) for k in BATCH_KEYS}
  return jax.jit(train_step, in_shardings=(spec.shardings, batch_sh),
                 out_shardings=(spec.shardings, None), donate_argnums=(0,))


def eval_sums(graphdef, params, model_state, batch, bytes_per_token) -> dict:
  """One batch's summed token NLL, token weight and target bytes (eval forward)."""
  model = nnx.merge(graphdef, params, model_state)
  logits, _ = model(batch["inputs"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"], train=False)
  nll_sum, w_sum = cross_entropy(logits, batch["targets"], batch["weights"])
  nbytes = jnp.sum(bytes_per_token[batch["targets"]] * batch["weights"])
  return dict(nll_sum=nll_sum, weight_sum=w_sum, bytes_sum=nbytes)


def make_eval_step(spec: StateSpec) -> Callable:
  eval_step = functools.partial(eval_sums, spec.graphdef)
  batch_sh = {k: sharding.batch_sharding(spec.mesh) for k in BATCH_KEYS}
  rep = sharding.replicated(spec.mesh)
  return jax.jit(eval_step, in_shardings=(spec.shardings["params"],
                                          spec.shardings["model_state"], batch_sh, rep))


def to_global_batch(local: dict, mesh, global_batch: int) -> dict:
  """Assembles each process's rows into arrays sharded over the batch axes."""
  out = {}
  for k in BATCH_KEYS:
    arr = np.asarray(local[k])
    out[k] = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, arr.ndim), arr, (global_batch,) + arr.shape[1:])
  return out


def evaluate(eval_step, state, eval_iter, bytes_per_token, mesh, global_batch,
             max_batches: int) -> dict:
  """Validation loss (nats/token), perplexity and bits per byte over the split."""
  pending = []
  for local in eval_iter.iter_eval(max_batches or None):
    batch = to_global_batch(local, mesh, global_batch)
    pending.append(eval_step(state["params"], state["model_state"], batch,
                             bytes_per_token))
  return metrics_from_batches(jax.device_get(pending))


def metrics_from_batches(outputs) -> dict:
  """The evaluation metrics from each batch's eval_sums (host values)."""
  totals = dict(nll_sum=0.0, weight_sum=0.0, bytes_sum=0.0)
  batch_losses = []
  for out in outputs:
    for k in totals:
      totals[k] += float(out[k])
    if float(out["weight_sum"]) > 0:
      batch_losses.append(float(out["nll_sum"]) / float(out["weight_sum"]))
  return metrics_from_totals(totals, batch_losses)


def metrics_from_totals(totals: dict, batch_losses=()) -> dict:
  """Validation loss (nats/token), perplexity and bits per byte from summed NLL,
  token weights and target bytes. With the per-batch losses, also the sampling
  error of the loss as an estimate from these batches: their std / sqrt(batches),
  what another draw of as many batches would move it by."""
  loss = totals["nll_sum"] / max(totals["weight_sum"], 1.0)
  bpb = totals["nll_sum"] / (math.log(2) * max(totals["bytes_sum"], 1.0))
  out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
         "eval/bits_per_byte": bpb, "eval/tokens": totals["weight_sum"]}
  if len(batch_losses) >= 2:
    out["eval/loss_batch_se"] = float(np.std(batch_losses, ddof=1) /
                                      math.sqrt(len(batch_losses)))
  return out


def model_inputs(cfg, data, vocab_size: int, *, shapes_only: bool = False, say=say) -> dict:
  """{extension name: what it prepares before the model is built} (Extension.model_inputs),
  from the run's RunData; with shapes_only (data None), stand-ins of the right
  shapes (for --dry_run)."""
  inputs = {}
  for ext in extensions.registered():
    if ext.model_inputs is not None:
      value = ext.model_inputs(cfg, data, vocab_size, shapes_only=shapes_only, say=say)
      if value is not None:
        inputs[ext.name] = value
  return inputs


@dataclasses.dataclass
class RunContext:
  """What an extension's final_eval hook may read of a finished run."""
  spec: StateSpec
  state: dict
  eval_iter: Any
  data: data_lib.RunData
  final: dict
  say: Callable


# ----------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, metrics: dict, tokens_per_s: float,
                  eta_s: float) -> str:
  parts = [f"step {step:>6d}/{total}", f"loss {metrics['loss']:.4f}",
           f"{tokens_per_s:,.0f} tok/s"]
  if "perf/mfu" in metrics:
    parts.append(f"{metrics['perf/tflops_per_device']:.3g} TFLOP/s/dev "
                 f"(MFU {100 * metrics['perf/mfu']:.1f}%)")
  parts += [f"ETA {format_duration(eta_s)}", f"lr {metrics['lr']:.2e}",
            f"|g| {metrics['grad_norm']:.2f}"]
  health = {k: v for k, v in metrics.items()
            if k.startswith("aux/") and np.ndim(v) == 0}
  parts += [f"{k[4:]} {v:.3g}" for k, v in sorted(health.items())]
  return " | ".join(parts)


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (save, then exit).

  Single-process runs only. With several processes, each may see the signal at
  a different step; there JAX's preemption notifier (installed by
  jax.distributed) and Orbax's `reached_preemption` agree on one step for all,
  so this handler stays out of the way.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------
def train_and_evaluate(cfg, workdir: str) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns final.json.

  Process 0 holds the workdir's lock (moejax/workdir_lock.py) for the whole run, so
  a second run started on the same workdir stops at once."""
  wall_start = time.time()
  config_lib.validate(cfg, num_devices=jax.device_count(), num_processes=jax.process_count())
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                      "(it is created if missing).")
  workdir_lib.check_entries(workdir)
  lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  ckpt = None
  try:
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    return _train_and_evaluate(cfg, workdir, wall_start, ckpt)
  finally:
    # Every exit, an error included, stops Orbax's threads: a checkpointer left open
    # keeps the process from exiting.
    if ckpt is not None:
      ckpt.close()
    if lock is not None:
      lock.release()


def _train_and_evaluate(cfg, workdir: str, wall_start: float, ckpt) -> dict[str, Any]:
  num_processes, process_index = jax.process_count(), jax.process_index()
  match = budget_match.check_config(cfg, data_lib.vocab_size(cfg.data))
  cfg_dict = config_lib.to_dict(cfg)

  # --- workdir, resume compatibility, config.json ----------------------------
  latest, saved_meta = ckpt.newest_readable(say=say)
  if saved_meta is not None:
    config_lib.check_resume_compatible(saved_meta["config"], cfg_dict, workdir)
    for warning in config_lib.resume_warnings(saved_meta["config"], cfg_dict):
      say(f"warning: {warning}")
  if process_index == 0:
    changed = run_history.record_config(
        workdir, cfg_dict, saved_config=None if saved_meta is None else saved_meta["config"],
        resume_step=latest)
    if changed:
      shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
      say(f"resuming from step {latest} with a changed config ({shown}); every version "
          f"is kept in {run_history.CONFIG_HISTORY}")

  # --- data -----------------------------------------------------------------
  data = data_lib.RunData.prepare(cfg.data)
  tokenizer, dataset_info = data.tokenizer, data.info
  if saved_meta is not None:
    config_lib.check_same_data(saved_meta.get("dataset", {}), dataset_info, workdir)
  vocab_size = tokenizer.vocab_size
  seq_len, global_batch = cfg.data.seq_len, cfg.train.global_batch

  inputs = model_inputs(cfg, data, vocab_size)

  # --- budget ---------------------------------------------------------------
  budget = budget_lib.model_budget(cfg, vocab_size)
  tokens_per_step = global_batch * seq_len

  mesh = sharding.make_mesh(cfg.mesh)
  rows = sharding.process_batch_rows(mesh, global_batch)
  train_iter = data.train_iterator(
      seq_len=seq_len, global_batch=global_batch, seed=cfg.seed, rows=rows)
  eval_iter = data.eval_iterator(
      seq_len=seq_len, global_batch=global_batch, rows=rows)
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    tx = make_optimizer(cfg.train)
    spec = StateSpec(cfg, vocab_size, mesh, tx, inputs=inputs)
    if spec.num_params != budget["params"]:
      logging.warning("Budget formula (%d params) disagrees with the model (%d).",
                      budget["params"], spec.num_params)
    say(f"moejax | {cfg.name} | {spec.num_params:,} params "
        f"({budget_lib.format_count(budget['active_params'])} active/token), "
        f"{budget_lib.format_count(budget['train_flops_per_token'])} train FLOPs/token | "
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {num_processes} process(es)")
    if match is not None:
      say(f"budget matches {cfg.budget_match.reference} within "
          f"{cfg.budget_match.tolerance:.1%}:\n{budget_match.format_report(match)}")
    say(f"data {dataset_info.get('name')} | tokenizer {cfg.data.tokenizer} "
        f"(vocab {vocab_size}) | {global_batch} x {seq_len} tokens/step | "
        f"workdir {workdir}")

    if latest is not None:  # the newest checkpoint that restores whole and finite
      latest, state, meta = ckpt.restore_newest_whole(spec.abstract_with_shardings(),
                                                      newest=latest, say=say)
      train_iter.set_state(meta["data"])
    writer = MetricWriter(workdir, tensorboard=cfg.debug.tensorboard, resume_step=latest)
    if latest is not None:
      say(f"Resumed from checkpoint at step {latest}.")
    else:
      state = spec.init()
      writer.write_text("config", "```\n" + cfg.to_json(indent=2) + "\n```")
      writer.write_scalars(0, {"params": spec.num_params, **{
          f"budget/{k}": v for k, v in budget.items()}})

    train_step = make_train_step(spec, cfg)
    eval_step = make_eval_step(spec)
    bytes_per_token = jax.device_put(
        jnp.asarray(tokenizer.bytes_per_token, jnp.float32), sharding.replicated(mesh))

    def run_eval(max_batches):
      return evaluate(eval_step, state, eval_iter, bytes_per_token, mesh,
                      global_batch, max_batches)

    def save(step):
      ckpt.save(step, state, {"step": step, "data": train_iter.get_state(),
                              "config": cfg_dict, "dataset": dataset_info})

    def check_finite(step):
      bad = int(jax.device_get(state["first_bad_step"]))
      if bad >= 0:
        ckpt.wait()
        last_good = ckpt.latest_step()
        final = dict(status="failed_nonfinite_loss", step=step, first_bad_step=bad,
                     last_checkpoint=last_good, workdir=workdir)
        if process_index == 0:
          run_history.write_final(workdir, final)
        ckpt.close()
        if last_good is None:
          raise NonFiniteLossError(
              f"The loss or gradient became NaN/inf at step {bad}, before any checkpoint "
              "was saved; lower --config.train.learning_rate or check the data, then "
              "rerun the same command to start over.")
        raise NonFiniteLossError(
            f"The loss or gradient became NaN/inf at step {bad}; the run stopped "
            f"without saving, and the last good checkpoint (step {last_good}) is in "
            f"{ckpt.directory}: lower --config.train.learning_rate or check the "
            "data, then rerun the same command to resume from it.")

    # --- loop -----------------------------------------------------------------
    start_step = int(jax.device_get(state["step"]))
    total_steps = cfg.train.steps
    schedule = learning_rate_schedule(cfg.train)
    peak, peak_source = mfu_lib.peak_tflops(jax.devices()[0], cfg.debug.peak_tflops)
    profile = config_lib.profile_range(cfg.debug.profile_steps)
    profiling = False
    pending_metrics: list[dict] = []
    input_wait = 0.0
    interval_start = time.time()
    interval_steps = 0
    steady_step_time = None
    last_metrics: dict = {}
    status = "completed"
    with _Preemption() as preemption:
      for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        local = next(train_iter)
        batch = to_global_batch(local, mesh, global_batch)
        input_wait += time.time() - t0
        if profile is not None and step == profile[0] and process_index == 0:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
          profiling = True
        first = step == start_step + 1
        if first:
          say(f"compiling the train step ... (peak {peak:,.2f} TFLOP/s per device: "
              f"{peak_source})")
        state, metrics = train_step(state, batch)
        ckpt.check_saved()  # a failed background save stops the run at once
        if first:
          jax.block_until_ready(metrics)
          say(f"compiled and ran the first step in {time.time() - t0:.1f} s")
        if profiling and step == profile[1] - 1:
          jax.block_until_ready(metrics)
          jax.profiler.stop_trace()
          profiling = False
          say(f"profile of steps {profile[0]}..{step} written to "
              f"{os.path.join(workdir, 'profile')} (tensorboard --logdir there)")
        pending_metrics.append(metrics)
        interval_steps += 1

        if step % cfg.train.log_every == 0 or step == total_steps:
          fetched = jax.device_get(pending_metrics)
          elapsed = time.time() - interval_start
          step_time = elapsed / interval_steps
          if step > start_step + interval_steps or steady_step_time is None:
            steady_step_time = step_time  # the first interval includes compilation
          # Mean over the steps since the last log; vectors (per-expert load) stay vectors.
          last_metrics = {k: np.mean([m[k] for m in fetched], axis=0) for k in fetched[0]}
          last_metrics = {k: (float(v) if np.ndim(v) == 0 else v)
                          for k, v in last_metrics.items()}
          last_metrics["lr"] = float(schedule(step - 1))  # the rate this step used
          last_metrics["perf/tokens_per_s"] = tokens_per_step / step_time
          last_metrics["perf/step_time_s"] = step_time
          last_metrics.update(mfu_lib.utilisation(
              tokens_per_step / step_time, budget["train_flops_per_token"],
              jax.device_count(), peak))
          last_metrics["perf/input_wait_frac"] = input_wait / elapsed
          last_metrics["tokens_seen"] = step * tokens_per_step
          writer.write_scalars(step, last_metrics)
          say(progress_line(step, total_steps, last_metrics, tokens_per_step / step_time,
                            (total_steps - step) * steady_step_time))
          pending_metrics, input_wait, interval_steps = [], 0.0, 0
          interval_start = time.time()
          check_finite(step)

        if step % cfg.train.eval_every == 0 and step != total_steps:
          check_finite(step)
          ev = run_eval(cfg.train.eval_batches)
          writer.write_scalars(step, ev)
          say(f"eval at step {step}: loss {ev['eval/loss']:.4f} | "
              f"bits/byte {ev['eval/bits_per_byte']:.4f}")
          interval_start = time.time()

        preempted = preemption.requested or ckpt.reached_preemption(step)
        if step % cfg.checkpoint.every == 0 or step == total_steps or preempted:
          check_finite(step)
          save(step)
        if preempted:
          status = "preempted"
          say(f"Preemption requested: saved step {step}; rerun the same command to "
              "resume.")
          break

    if profiling:  # the run ended inside the profiled range
      jax.profiler.stop_trace()
    ckpt.wait()
    end_step = int(jax.device_get(state["step"]))
    final = dict(status=status, step=end_step, workdir=workdir, name=cfg.name,
                 params=spec.num_params, budget=budget, dataset=dataset_info,
                 tokens_seen=end_step * tokens_per_step,
                 train_loss=last_metrics.get("loss"),
                 tflops_per_device=last_metrics.get("perf/tflops_per_device"),
                 mfu=last_metrics.get("perf/mfu"), peak_tflops=peak,
                 wall_time_s=time.time() - wall_start, **provenance())
    if status == "completed":
      final.update(run_eval(cfg.train.final_eval_batches))
      run = RunContext(spec=spec, state=state, eval_iter=eval_iter, data=data,
                       final=final, say=say)
      for ext in extensions.registered():
        if ext.final_eval is not None:
          final.update(ext.final_eval(cfg, run))
      writer.write_scalars(end_step, {k: v for k, v in final.items() if k.startswith("eval/")})
    writer.flush()
    writer.close()
    ckpt.close()
    if process_index == 0:
      run_history.write_final(workdir, final)
  if status == "completed":
    say(f"done: step {end_step} | validation loss {final['eval/loss']:.4f} | "
        f"bits/byte {final['eval/bits_per_byte']:.4f} | perplexity "
        f"{final['eval/perplexity']:.2f}")
  written = [name + ("/" if kind == "directory" else "")
             for name, kind in workdir_lib.ENTRIES.items()
             if os.path.exists(os.path.join(workdir, name))]
  say(f"outputs in {workdir}: {', '.join(written)}")
  return final
