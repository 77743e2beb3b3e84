"""L3, large lookup layers: per-token rows of a table read by a softmax over the
token's own keys, inserted between decoder layers.

  layer.py        the L3 layer          lookup.py     padded and sorted lookups
  allocation.py   rows per token id (LZW, uniform, frequency) and its CLI
  parallel.py     tables split by rows over the expert mesh axis
  host.py         evaluation with the tables in host memory
  plan.py, hooks.py   where the layers go; the allocation before the model is
                  built and the host-table final evaluation
  config.py, budget.py   the `l3` config group and the budget
Notes on the paper: docs/papers/l3.md.
"""

from moejax import extensions
from moejax.papers.l3 import budget, config, hooks, plan, plots

extensions.register(extensions.Extension(
    name="l3", group="l3", defaults=config.defaults, validate=config.validate,
    resume_free=config.RESUME_FREE,
    sharding_rules=(("l3_rows", "expert"),),  # tables split by rows (parallel.py)
    layer_plan=plan.add_l3_layers, budget=budget.l3_layers_budget,
    model_inputs=hooks.allocation_inputs, final_eval=hooks.host_table_eval,
    plots={"l3_entropy.png": plots.plot_l3_entropy}, notes="docs/papers/l3.md"))
