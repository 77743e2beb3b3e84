"""The `l3` config group: defaults, validation and the fields a resume may not change."""

import ml_collections

from moejax import data as data_lib
from moejax.config.checks import positive, require
from moejax.model import layer_plan
from moejax.papers.l3.allocation import METHODS
from moejax.papers.l3.lookup import PATHS

# A resume may change these (the lookup path gives equal results; host_eval only
# adds an evaluation); every other field of the group fixes the run.
RESUME_FREE = ("l3.path", "l3.host_eval")


def defaults() -> ml_collections.ConfigDict:
  # large lookup layers (L3); see moejax/papers/l3/layer.py
  g = ml_collections.ConfigDict()
  g.after_layers = ()  # insert an L3 layer after this many decoder layers, e.g. (2,);
                       # counts unique layers (a looped block counts once)
  g.rows = 16384  # v: table rows per L3 layer, shared out over the vocabulary
  g.max_rows_per_token = 32  # k: cap on the rows one token id owns
  g.allocation = "lzw"  # rows per token id: "lzw", "uniform" or "frequency"
  g.allocation_tokens = 2_000_000  # training tokens read to compute the allocation
  g.emb_dim = 128  # d_emb: width of a value row (= d_model when tie_kv)
  g.up_dim = 128  # d_up: width of the projected, normalised read
  g.tie_kv = False  # one table serves as keys and values (W_K = W_V)
  g.path = "padded"  # "padded" gather of max_rows rows, or "sorted" segment softmax
  g.scale_scores = False  # divide the scores K_t x by sqrt(d_model)
  g.init_std = 0.02  # table rows N(0, std)
  g.host_eval = False  # also run the final evaluation with the tables in host
                       # memory, shipping each batch's rows (moejax/papers/l3/host.py)
  return g


def validate(cfg, axes: dict) -> None:
  """Checks cfg.l3 when L3 layers are inserted."""
  l3, layers = cfg.l3, cfg.model.num_layers
  after = tuple(l3.after_layers)
  if not after:
    return
  require(all(isinstance(p, int) and 1 <= p <= layers for p in after),
          f"--config.l3.after_layers={after} must list decoder layers between 1 and "
          f"model.num_layers={layers} (an L3 layer goes after that many unique layers).")
  require(len(set(after)) == len(after) and list(after) == sorted(after),
          f"--config.l3.after_layers={after} must increase strictly.")
  plan = layer_plan.build(cfg)
  if plan.loop_end > plan.loop_start:
    inside = [p for p in after if plan.loop_start < p < plan.loop_end]
    require(not inside,
            f"--config.l3.after_layers={after} puts an L3 layer inside the looped block "
            f"(layers {plan.loop_start + 1}..{plan.loop_end}); place it before or after "
            "the loop.")
  vocab = data_lib.vocab_size(cfg.data)
  positive("l3", l3, "rows", "max_rows_per_token", "allocation_tokens", "up_dim",
           "init_std")
  require(vocab <= l3.rows <= vocab * l3.max_rows_per_token,
          f"--config.l3.rows={l3.rows} must lie between the vocabulary size ({vocab}: "
          f"every token id owns at least one row) and vocab x l3.max_rows_per_token "
          f"({vocab * l3.max_rows_per_token}).")
  require(l3.tie_kv or l3.emb_dim > 0,
          f"--config.l3.emb_dim must be positive, got {l3.emb_dim}.")
  require(not l3.tie_kv or l3.emb_dim == cfg.model.d_model,
          f"--config.l3.tie_kv uses the keys as values, so --config.l3.emb_dim must equal "
          f"model.d_model={cfg.model.d_model}, got {l3.emb_dim}.")
  require(l3.allocation in METHODS,
          f"--config.l3.allocation={l3.allocation!r} is not one of {METHODS}.")
  require(l3.path in PATHS,
          f"--config.l3.path={l3.path!r} is not one of {sorted(PATHS)}.")
  ep = axes["expert"]
  require(not l3.host_eval or ep == 1,
          f"--config.l3.host_eval keeps whole tables on one host device, but the expert "
          f"mesh axis ({ep}) splits them by rows; set --config.mesh.expert=1 or turn "
          "host_eval off.")
  require(l3.rows % ep == 0,
          f"--config.l3.rows={l3.rows} is not divisible by the expert mesh axis ({ep}), "
          f"which splits the L3 tables by rows; use a multiple of {ep}.")
