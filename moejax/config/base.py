"""The base config every preset starts from, and the `:arg` preset parser.

Every field can be overridden from the command line, e.g.
`python run.py --config=configs/dense.py:tiny --config.train.steps=200`.
The generic groups are here: `model`, `budget_match`, `data`, `train`, `mesh`,
`sharding`, `checkpoint`, `debug`. Each paper adds its own group (its fields,
defaults and comments live in its package's config.py): `moe`
(moejax/moe/config.py), `atomic` (moejax/papers/omnimoe/config.py), `mohge`,
`loop` (LoopMoE) and `l3`. Every group is in every config, so a paper's layers
can be added to any preset from the command line (`--config.l3.after_layers=(2,)`).
moejax/config/validation.py checks the whole config before anything is built.
"""

import json
import os
import sys

import ml_collections

from moejax import extensions
from moejax.errors import ConfigError

# Logical axis name -> mesh axes. One table for the whole model; parameters and
# activations carry logical names (moejax/sharding.py applies this table).
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
)


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a tiny dense model on the embedded corpus)."""
  c = ml_collections.ConfigDict()
  c.name = "dense_tiny"
  c.seed = 0

  # --- model -----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.sublayer = "dense"  # FFN slot of every block: "dense" or a registered
                              # sublayer (moejax/model/sublayers.py)
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2  # grouped-query attention: num_heads % num_kv_heads == 0
  c.model.head_dim = 32
  c.model.ffn_dim = 384  # SwiGLU hidden width
  c.model.max_seq_len = 1024  # longest training sequence this model accepts
  c.model.rope_theta = 10_000.0
  c.model.tie_embeddings = True
  c.model.norm_eps = 1e-6
  c.model.compute_dtype = "float32"  # "bfloat16" for mixed precision
  c.model.param_dtype = "float32"
  c.model.init_std = 0.02

  # --- paper groups: one per registered extension (moejax/extensions.py) ---
  for ext in extensions.registered():
    if ext.group:
      c[ext.group] = ext.defaults()

  # --- budget match: asserted before training --------------------------------
  c.budget_match = ml_collections.ConfigDict()
  c.budget_match.reference = ""  # e.g. "configs/loopmoe.py:vanilla_tiny"; "" = no claim
  c.budget_match.quantities = ("params", "forward_flops_per_token", "attn_ffn_active_ratio")
  c.budget_match.tolerance = 0.01  # largest relative difference allowed

  # --- data ------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "stdlib_source"  # embedded corpus; "synthetic"; "files" (your own text
                                 # files, below); or any TFDS name, e.g. "lm1b"
  c.data.data_dir = ""  # "" = $TFDS_DATA_DIR, else ~/tensorflow_datasets; local path
                        # (on cloud TPU: a gcsfuse mount of the bucket)
  c.data.text_key = "text"  # feature holding the document text (TFDS datasets; the
                            # field of .jsonl lines and column of .parquet files)
  # name="files" (moejax/data/local_files.py has the document and split rules):
  c.data.files = ""  # glob(s) of the files, comma-separated; ~ expanded, ** recursive
  c.data.eval_files = ""  # glob(s) of the validation files; "" = split by eval_fraction
  c.data.eval_fraction = 0.05  # share of documents held out for validation, by hash
  c.data.txt_documents = "file"  # a text file is one document ("file") or one per
                                 # block between blank lines ("blank_line")
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.tokenizer = "sentencepiece"  # or "byte"
  c.data.vocab_size = 2048  # sentencepiece only; the byte tokenizer has a fixed vocabulary
  c.data.seq_len = 128
  c.data.auto_prepare = True  # build the embedded corpus and tokenizer if missing

  # --- training --------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 300
  c.train.global_batch = 32  # sequences per step, over all devices and hosts
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 0  # periodic evaluation: this many batches of windows spread
                            # evenly over the validation split; 0 = all of it
  c.train.final_eval_batches = 0  # evaluation at the end, likewise; 0 = the whole split

  # --- mesh: axis sizes; -1 fills the remaining devices --------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.tensor = 1

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_SHARDING_RULES + tuple(
      rule for ext in extensions.registered() for rule in ext.sharding_rules)

  # --- checkpoints -----------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # --- debugging -------------------------------------------------------------
  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nan_at_step = -1  # >= 1 makes that step's loss NaN (tests the guard)
  c.debug.tensorboard = True  # write TensorBoard events (tensorboardX)
  c.debug.peak_tflops = 0.0  # per device, for MFU; 0 = the device's known bf16 peak,
                             # or a measured float32 matmul on CPU (moejax/mfu.py)
  c.debug.profile_steps = ""  # "A:B": a jax.profiler trace of steps A..B-1 under
                              # <workdir>/profile (TensorBoard's profile plugin)
  return c


def parse_preset(arg: str | None, presets: dict, default: str) -> str:
  """Returns the preset name in `configs/x.py:NAME`, or raises a ConfigError whose
  example names the calling config file."""
  name = (arg or default).strip()
  if name not in presets:
    caller = os.path.basename(sys._getframe(1).f_code.co_filename)  # pylint: disable=protected-access
    raise ConfigError(
        f"Unknown preset {name!r}; choose one of {sorted(presets)} "
        f"(e.g. --config=configs/{caller}:{default})."
    )
  return name


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(cfg.to_json())
