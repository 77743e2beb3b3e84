"""Dense decoder LM presets (the baseline every MoE is compared against).

  python run.py                                   # = --config=configs/dense.py:tiny
  python run.py --config=configs/dense.py:small --workdir=runs/dense_small

tiny:  4 layers, d=128, SwiGLU 384, 1.05M params; embedded corpus, sentencepiece
       vocab 2048, 300 steps of 32 x 128 tokens. About 3 minutes on a 2-core CPU
       (validation loss 3.26 nats/token, 1.67 bits/byte).
small: 8 layers, d=512, SwiGLU 1536, ~30M params, 2k steps of 64 x 512 tokens,
       bf16 compute. Sized for one GPU.
"""

from moejax.config.base import base_config, parse_preset

PRESETS = ("tiny", "small")


def get_config(arg: str | None = None):
  preset = parse_preset(arg, dict.fromkeys(PRESETS), default="tiny")
  c = base_config()
  c.name = f"dense_{preset}"
  if preset == "small":
    c.model.d_model = 512
    c.model.num_layers = 8
    c.model.num_heads = 8
    c.model.num_kv_heads = 4
    c.model.head_dim = 64
    c.model.ffn_dim = 1536
    c.model.compute_dtype = "bfloat16"
    c.data.vocab_size = 8192
    c.data.seq_len = 512
    c.train.global_batch = 64
    c.train.steps = 2000
    c.train.warmup_steps = 200
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_batches = 16  # lm1b-sized splits: evaluate a fixed subset
    c.checkpoint.every = 500
  return c
