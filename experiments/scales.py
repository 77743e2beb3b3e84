"""What --scale changes in every row, beside the preset size each experiment picks.

tiny   the 2-core CPU machine: 300 steps of 16 x 128 tokens (614K tokens) and
       five seeds per arm (experiments/common.py). Every row scores the same 16 validation batches
       (32K tokens) every 30 steps and at the end, so the curves and the table
       read one evaluation set, and a seed fixes the data order of every arm of
       a table, so claims are judged on paired differences
       (experiments/report/stats.py). docs/design.md gives the measurement
       behind this choice. A comparison early in training, not a converged one.
small  one GPU, the `*_small` presets as written (2k steps of 64 x 512 tokens).
paper  the papers' model sizes, for `--dry_run` budget checks; training them
       needs a TPU slice or a GPU cluster and the papers' token counts.
"""

OVERRIDES = {
    "tiny": {
        "train.steps": 300,
        "train.global_batch": 16,
        "train.warmup_steps": 30,
        "train.log_every": 10,
        "train.eval_every": 30,
        "train.eval_batches": 16,
        "train.final_eval_batches": 16,
        "checkpoint.every": 50,
        "debug.tensorboard": False,
    },
    "small": {},
    "paper": {},
}
