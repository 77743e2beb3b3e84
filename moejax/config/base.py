"""The base config every preset starts from, and the `:arg` preset parser.

Every field below can be overridden from the command line, e.g.
`python run.py --config=configs/dense.py:tiny --config.train.steps=200`.
Fields are grouped: `model`, `data`, `train`, `mesh`, `sharding`, `checkpoint`,
`debug`. `moejax/config/validation.py` validates the whole thing before anything is built.
"""

import ml_collections

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
    ("l3_rows", "expert"),  # L3 lookup tables are split by rows (moejax/papers/l3/parallel.py)
)


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a tiny dense model on the embedded corpus)."""
  c = ml_collections.ConfigDict()
  c.name = "dense_tiny"
  c.seed = 0

  # --- model -----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.sublayer = "dense"  # FFN slot of every block; see moejax/model/sublayers.py
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

  # --- MoE sublayer (model.sublayer = "moe"); see moejax/moe/layer.py -------
  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.expert_ffn_dim = 192  # SwiGLU width of one routed expert
  c.moe.num_shared_experts = 0  # always-on experts (DeepSeekMoE), each expert_ffn_dim wide
  c.moe.score_fn = "softmax"  # router scores: "softmax" or "sigmoid" (fp32)
  c.moe.renormalize = True  # divide the k selected scores by their sum
  c.moe.routed_scaling_factor = 1.0  # multiplies the routed output (DeepSeek-V3: 2.5)
  c.moe.load_balance_coef = 0.01  # global-batch load-balance loss weight (0 = off)
  c.moe.z_loss_coef = 1e-3  # router z-loss weight (0 = off)
  c.moe.bias_update_rate = 0.0  # aux-loss-free balancing: bias += rate * sign(load error)
  c.moe.backend = "sorted"  # dispatch: "sorted", "ragged_dot", "capacity", "pallas" or
                            # "auto" (fastest measured on the platform: dispatch/auto.py)
  c.moe.block_size = 0  # rows per block of the sorted backend; 0 = chosen from the load
  c.moe.capacity_factor = 1.25  # "capacity" backend: slots per expert = cf * T * k / E
  c.moe.ep_capacity_factor = 0.0  # expert parallelism: rows sent to each expert shard,
                                  # as a multiple of the balanced share; 0 = dropless
  c.moe.first_dense_layers = 0  # the first N blocks keep a dense FFN (DeepSeekMoE)

  # --- atomic experts (model.sublayer = "omnimoe" or "peer") ----------------
  # see moejax/papers/omnimoe/omnimoe.py and peer.py
  c.atomic = ml_collections.ConfigDict()
  c.atomic.num_experts = 1024  # N single-neuron experts; a perfect square (sqrt(N) grid)
  c.atomic.top_k = 16  # experts per token (per head for PEER)
  c.atomic.shared_ffn_dim = 352  # width of the always-on SwiGLU beside them (0 = none)
  c.atomic.router = "product"  # "product": per-axis candidates, O(sqrt(N) + k^2);
                               # "full": scan all N cells (the reference)
  c.atomic.path = "gather"  # "gather" (token-centric) or "expert_sorted" (expert-centric)
  c.atomic.bn_momentum = 0.1  # router BatchNorm running statistics (PyTorch convention)
  c.atomic.bn_eps = 1e-5
  c.atomic.expert_init_std = 0.02  # expert tables N(0, std); the OmniMoE code uses 1.0
  c.atomic.peer_heads = 1  # PEER: query heads, each choosing top_k experts
  c.atomic.peer_query_dim = 128  # PEER: query width per head (0 = d_model); even
  c.atomic.peer_query_batchnorm = True  # PEER: BatchNorm on the query

  # --- heterogeneous grouped experts (model.sublayer = "mohge") -------------
  # see moejax/papers/mohge/mohge.py; defaults are the tiny preset's
  c.mohge = ml_collections.ConfigDict()
  c.mohge.group_widths = (28, 44, 60, 76)  # SwiGLU width of each group's experts
  c.mohge.experts_per_group = 4
  c.mohge.top_groups = 2  # K_g groups chosen per token
  c.mohge.top_k = 4  # experts chosen per token, inside the chosen groups
  c.mohge.shared_ffn_dim = 128  # always-on shared SwiGLU width (0 = none)
  c.mohge.gate = "megatron"  # "megatron": softmax over the k chosen (the released
                             # code path); "renormalized": r / sum of the k chosen
  c.mohge.group_aux_coef = 1e-5  # size-weighted group loss (alpha_g)
  c.mohge.group_aux_start_fraction = 0.5  # ... switched on after this much training
  c.mohge.group_aux_width_interval = 0  # its D; 0 = W_max - W_min + (W_1 - W_0)
  c.mohge.intra_aux_coef = 5e-3  # intra-group experts loss (alpha_e)
  c.mohge.backend = "sorted"  # a dropless backend: "sorted", "ragged_dot", "pallas", "auto"
  c.mohge.block_size = 0  # sorted backend rows per block; 0 = chosen from the load

  # --- looped block (LoopMoE); see moejax/model/loop.py ----------------------
  # Layers run as: prefix_layers unique blocks, then block_layers blocks applied
  # `iterations` times with shared weights, then the remaining
  # num_layers - prefix_layers - block_layers blocks. block_layers = 0: no loop.
  c.loop = ml_collections.ConfigDict()
  c.loop.prefix_layers = 0
  c.loop.block_layers = 0
  c.loop.iterations = 1  # R
  c.loop.iter_adaln = True  # IterAdaLN at each pre-norm of the looped block ("Loop Base": off)
  c.loop.adaln_dim = 4  # width a of the conditioning vector c = SiLU(MLP(PE(k)) + W_h h)
  c.loop.adaln_pe_dim = 32  # width of the sinusoidal iteration encoding PE(k)
  c.loop.adaln_gate = True  # also modulate the sublayer output: h + (1 + alpha) * F(...)
  c.loop.remat = False  # recompute each iteration's activations in the backward pass

  # --- large lookup layers (L3); see moejax/papers/l3/layer.py ---------------------
  c.l3 = ml_collections.ConfigDict()
  c.l3.after_layers = ()  # insert an L3 layer after this many decoder layers, e.g. (2,);
                          # counts unique layers (a looped block counts once)
  c.l3.rows = 16384  # v: table rows per L3 layer, shared out over the vocabulary
  c.l3.max_rows_per_token = 32  # k: cap on the rows one token id owns
  c.l3.allocation = "lzw"  # rows per token id: "lzw", "uniform" or "frequency"
  c.l3.allocation_tokens = 2_000_000  # training tokens read to compute the allocation
  c.l3.emb_dim = 128  # d_emb: width of a value row (= d_model when tie_kv)
  c.l3.up_dim = 128  # d_up: width of the projected, normalised read
  c.l3.tie_kv = False  # one table serves as keys and values (W_K = W_V)
  c.l3.path = "padded"  # "padded" gather of max_rows rows, or "sorted" segment softmax
  c.l3.scale_scores = False  # divide the scores K_t x by sqrt(d_model)
  c.l3.init_std = 0.02  # table rows N(0, std)
  c.l3.host_eval = False  # also run the final evaluation with the tables in host
                          # memory, shipping each batch's rows (moejax/papers/l3/host.py)

  # --- budget match: asserted before training --------------------------------
  c.budget_match = ml_collections.ConfigDict()
  c.budget_match.reference = ""  # e.g. "configs/loopmoe.py:vanilla_tiny"; "" = no claim
  c.budget_match.quantities = ("params", "forward_flops_per_token", "attn_ffn_active_ratio")
  c.budget_match.tolerance = 0.01  # largest relative difference allowed

  # --- data ------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "stdlib_source"  # embedded corpus; "synthetic"; or any TFDS name, e.g. "lm1b"
  c.data.data_dir = ""  # "" = $TFDS_DATA_DIR, else ~/tensorflow_datasets; local path
                        # (on cloud TPU: a gcsfuse mount of the bucket)
  c.data.text_key = "text"  # feature holding the document text (TFDS datasets)
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
  c.train.eval_batches = 0  # periodic evaluation; 0 = the whole validation split
  c.train.final_eval_batches = 0  # evaluation at the end; 0 = the whole split

  # --- mesh: axis sizes; -1 fills the remaining devices --------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.tensor = 1

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_SHARDING_RULES

  # --- checkpoints -----------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # --- debugging -------------------------------------------------------------
  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nan_at_step = -1  # >= 1 makes that step's loss NaN (tests the guard)
  c.debug.tensorboard = True  # write TensorBoard events (tensorboardX)
  return c


def parse_preset(arg: str | None, presets: dict, default: str) -> str:
  """Returns the preset name in `configs/x.py:NAME`, or raises a ConfigError."""
  name = (arg or default).strip()
  if name not in presets:
    raise ConfigError(
        f"Unknown preset {name!r}; choose one of {sorted(presets)} "
        f"(e.g. --config=configs/dense.py:{default})."
    )
  return name
