"""Paper-scale arms (--scale=paper, checked with --dry_run): overrides and reported sizes.

Being written (issue 7): until it is, the paper scale of each experiment has no
size overrides and no targets.
"""

OMNIMOE = {a: {} for a in ("dense", "deepseek", "peer", "omnimoe")}
OMNIMOE_TARGETS = ()
MOHGE = {a: {} for a in ("dense", "baseline", "mohge", "mohge_no_group_loss")}
MOHGE_TARGETS = ()
LOOPMOE = {a: {} for a in ("vanilla", "loopbase", "loopmoe", "loopmoe_nogate")}
LOOPMOE_TARGETS = ()
L3 = {a: {} for a in ("dense", "lzw", "uniform", "moe")}
L3_TARGETS = ()
