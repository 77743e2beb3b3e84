"""What --scale changes in every row, beside the preset size each experiment picks.

tiny   the 2-core CPU machine: 200 steps of 32 x 128 tokens (820K tokens), a
       validation curve every 50 steps on 8 batches, the whole validation split
       at the end. A row takes 1-4 minutes, so each experiment's sweep (at least
       two seeds per arm) finishes in about half an hour.
small  one GPU, the `*_small` presets as written (2k steps of 64 x 512 tokens).
paper  the papers' model sizes, for `--dry_run` budget checks; training them
       needs a TPU slice or a GPU cluster and the papers' token counts.
"""

OVERRIDES = {
    "tiny": {
        "train.steps": 200,
        "train.warmup_steps": 20,
        "train.log_every": 10,
        "train.eval_every": 50,
        "train.eval_batches": 8,
        "checkpoint.every": 100,
        "debug.tensorboard": False,
    },
    "small": {},
    "paper": {},
}
