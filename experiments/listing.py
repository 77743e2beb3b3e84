"""`python run.py --list`: every experiment, its arms, rows and claims."""

from experiments import registry


def describe(scale: str = "tiny") -> str:
  lines = []
  for exp in registry.all_experiments():
    rows = exp.rows(scale) if scale in exp.scales else []
    lines.append(f"{exp.name:<14s}{exp.title} ({exp.paper})")
    lines.append(f"{'':<14s}{len(rows)} rows at --scale={scale}; arms: {', '.join(exp.arms)}")
    for i, row in enumerate(rows):
      task = " (measured, not trained)" if row.get("task") == "measure" else ""
      extra = " ".join(f"{k}={v}" for k, v in row.items() if "." in k)
      lines.append(f"{'':<14s}--sweep_index={i:<3d} {registry.row_name(row)}: "
                   f"{row['config']}{' ' + extra if extra else ''}{task}")
    for claim in exp.claims:
      lines.append(f"{'':<14s}claim: {claim.text}")
  lines.append("run one with: python run.py --experiment=NAME --scale=tiny "
               "[--sweep_index=I] [--dry_run]")
  return "\n".join(lines)
