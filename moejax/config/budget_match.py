"""Budget match: a config that claims a reference's budget is checked before training.

budget_match.reference names the reference ("configs/loopmoe.py:vanilla_tiny");
each of budget_match.quantities (keys of moejax.budget.model_budget) must agree
within budget_match.tolerance, relative to the reference. The reference first
gets the candidate's `data` group: both arms train on the same data, and the
data enters the budget (the vocabulary sizes the embedding and unembedding,
seq_len the attention-score FLOPs), so a reference preset written for another
corpus or length can neither fail nor pass the claim by itself.
"""

import numbers

from moejax import budget as budget_lib
from moejax.config.files import load_config
from moejax.errors import ConfigError


def numeric_quantities(budget: dict) -> tuple[str, ...]:
  """The model_budget keys a match can be claimed on (those holding numbers)."""
  return tuple(k for k, v in budget.items()
               if isinstance(v, numbers.Real) and not isinstance(v, bool))


def relative_difference(ours: float, reference: float) -> float:
  """(ours - reference) / |reference|."""
  if reference == 0:
    return 0.0 if ours == 0 else float("inf")
  return (ours - reference) / abs(reference)


def _fmt(x) -> str:
  return f"{x:,}" if isinstance(x, numbers.Integral) else f"{x:.4g}"


def check_config(cfg, vocab_size: int | None = None) -> dict | None:
  """None without a reference; else {quantity: (ours, reference, relative
  difference)}, or a ConfigError naming every quantity off by more than the
  tolerance."""
  bm = cfg.budget_match
  if not bm.reference:
    return None
  ours = budget_lib.model_budget(cfg, vocab_size)
  valid = numeric_quantities(ours)
  quantities = tuple(bm.quantities)
  unknown = [q for q in quantities if q not in valid]
  if unknown or not quantities:
    raise ConfigError(
        f"budget_match.quantities={list(quantities)} must name one or more of "
        f"{', '.join(valid)}{f' (unknown: {unknown})' if unknown else ''}.")
  if bm.tolerance < 0:
    raise ConfigError(f"budget_match.tolerance must be >= 0 (got {bm.tolerance}).")
  ref_cfg = load_config(bm.reference)
  ref_cfg.data = cfg.data.copy_and_resolve_references()  # same data for both arms
  theirs = budget_lib.model_budget(ref_cfg, vocab_size)
  report = {q: (ours[q], theirs[q], relative_difference(ours[q], theirs[q]))
            for q in quantities}
  bad = [q for q, (_, _, rel) in report.items() if abs(rel) > bm.tolerance]
  if bad:
    listed = ", ".join(f"{q} {_fmt(report[q][0])} vs {_fmt(report[q][1])} "
                       f"({report[q][2]:+.2%})" for q in bad)
    raise ConfigError(
        f"{cfg.name} misses the budget of {bm.reference} by more than "
        f"budget_match.tolerance={bm.tolerance:g} in {listed}; resize the model "
        f"(moejax.papers.loopmoe.balance.balance_loop sizes a looped MoE), raise the tolerance "
        f"or set budget_match.reference=''.")
  return report


def format_report(report: dict) -> str:
  """Aligned lines: quantity, ours, reference, relative difference."""
  rows = [("quantity", "ours", "reference", "diff")]
  rows += [(q, _fmt(a), _fmt(b), f"{rel:+.2%}") for q, (a, b, rel) in report.items()]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join(
      f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"
      for r in rows)
