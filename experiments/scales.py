"""What --scale changes in every row, beside the preset size each experiment picks.

tiny   the 2-core CPU machine: 150 steps of 16 x 128 tokens (307K tokens), a
       validation curve every 50 steps on 8 batches, and a final evaluation on
       the first 32 validation batches (65K tokens, the same for every row). A
       row takes about 1-3 minutes, so each experiment's sweep (two seeds per
       arm) fits in about half an hour on a machine shared with other work.
       This is a smoke-level check of each claim's direction early in
       training, not a converged comparison.
small  one GPU, the `*_small` presets as written (2k steps of 64 x 512 tokens).
paper  the papers' model sizes, for `--dry_run` budget checks; training them
       needs a TPU slice or a GPU cluster and the papers' token counts.
"""

OVERRIDES = {
    "tiny": {
        "train.steps": 150,
        "train.global_batch": 16,
        "train.warmup_steps": 15,
        "train.log_every": 10,
        "train.eval_every": 50,
        "train.eval_batches": 8,
        "train.final_eval_batches": 32,
        "checkpoint.every": 100,
        "debug.tensorboard": False,
    },
    "small": {},
    "paper": {},
}
