"""The report's text: summary.json rendered as table.md (Markdown) and table.tex (LaTeX).

Numbers are formatted by metric: losses with 4 decimals, integers with
thousands separators, everything else with 4 significant digits.
"""

import math

def _is_loss(metric: str) -> bool:
  return "loss" in metric or "bits_per_byte" in metric


def format_number(metric: str, value, integral: bool = False, missing: str = "—") -> str:
  """Losses with 4 decimals, integers with thousands separators, else 4 significant digits."""
  if value is None:
    return missing
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if _is_loss(metric):
    return f"{value:.4f}"
  if integral and value.is_integer():
    return f"{int(value):,}"
  if abs(value) >= 1e3:  # 4 significant digits or more: whole units, grouped
    return f"{value:,.0f}"
  return f"{value:.4g}"


def format_stat(metric: str, s: dict | None, completed: int | None = None, pm: str = " ± ",
                missing: str = "—") -> str:
  """"mean ± std", "mean (n=1)", or `missing`; "(n=k)" when k differs from `completed`."""
  if s is None or s["n"] == 0:
    return missing
  mean = format_number(metric, s["mean"], s["integral"])
  if s["n"] == 1:
    return f"{mean} (n=1)"
  text = f"{mean}{pm}{format_number(metric, s['std'], s['integral'])}"
  return text if completed in (None, s["n"]) else f"{text} (n={s['n']})"


def _relation(c: dict) -> str:
  return f"close (±{c['tolerance']:g})" if c["relation"] == "close" else c["relation"]


def _than(c: dict, pm: str = " ± ", missing: str = "—") -> str:
  if c["than_arm"] is None:
    return f"value {format_number(c['metric'], c['than_value'], missing=missing)}"
  return f"{c['than_arm']}: {format_stat(c['metric'], c['theirs'], pm=pm, missing=missing)}"


def paired_interval_text(c: dict, missing: str = "—") -> str:
  """"d [low, high] (n=k)" of a claim's paired differences, or `missing`."""
  m = c["metric"]
  if c["d"] is None:
    return missing
  if c["low"] is None:
    return f"{format_number(m, c['d'])} (n={c['pairs']})"
  return (f"{format_number(m, c['d'])} [{format_number(m, c['low'])}, "
          f"{format_number(m, c['high'])}] (n={c['pairs']})")


def paired_detail(c: dict) -> str:
  """": paired d = ... [95% CI]" for a progress line ('' without a difference)."""
  text = paired_interval_text(c, missing="")
  return f": paired d = {text}" if text else ""


def unpaired_text(c: dict, missing: str = "—") -> str:
  u = c["unpaired"]
  if u["d"] is None:
    return missing
  m = c["metric"]
  t = "" if u["t"] is None else f", t = {format_number(m, u['t'])}"
  return f"d = {format_number(m, u['d'])}{t}: {u['verdict']}"


def md_cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "—": "--", "≥": r"$\geq$", "≤": r"$\leq$"}


def tex_escape(text) -> str:
  """Text with LaTeX's special characters escaped."""
  return "".join(_TEX.get(ch, ch) for ch in str(text))


def render_markdown(summary: dict, titles: dict | None = None) -> str:
  """table.md from the summary aggregate() writes to summary.json; `titles` maps a
  plot's file name to its image's title (the file name where none is given)."""
  s = summary
  env = s["environment"]
  lines = [f"# {s['title']}", "",
           f"Experiment `{s['experiment']}` at scale `{s['scale']}`; reproduces {s['paper']}.", "",
           "Runs produced by:", "", "```", s["command"], "```", "",
           f"Aggregated with `{s['aggregate_command']}`.", "",
           f"Environment: jax {', '.join(env['jax_version']) or 'not recorded'}; devices "
           f"{', '.join(env['devices']) or 'not recorded'}; code "
           f"{', '.join(env['code_version']) or 'version not recorded'} "
           "(from the completed runs' final.json).",
           "", "## Results", "",
           "Mean ± sample std over completed seeds (n = completed/rows per arm).", ""]
  cols = s["columns"]
  lines.append("| Arm | n | " + " | ".join(md_cell(c) for c in cols) + " |")
  lines.append("|---|---|" + "---|" * len(cols))
  for arm in s["arms"]:
    a = s["stats"][arm]
    cells = [format_stat(c, a["metrics"].get(c), a["completed"]) for c in cols]
    lines.append(f"| {md_cell(arm)} | {a['completed']}/{a['rows']} | " + " | ".join(cells) + " |")
  lines += ["", "## Claims", ""]
  if s["claims"]:
    lines.append("| # | Claim | Metric | Relation | Ours | Than | Paired d [95% CI] | "
                 "Verdict | Unpaired (t = 2s) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(s["claims"], 1):
      lines.append(
          f"| {i} | {md_cell(c['text'])} | {md_cell(c['metric'])} | {_relation(c)} | "
          f"{md_cell(c['arm'])}: {format_stat(c['metric'], c['ours'])} | {md_cell(_than(c))} | "
          f"{paired_interval_text(c)} | **{c['verdict']}** | {md_cell(unpaired_text(c))} |")
  else:
    lines.append("This experiment states no claims.")
  paired = [(i, c) for i, c in enumerate(s["claims"], 1) if c.get("half_width") is not None]
  lines += ["", "## Noise floor", "",
            "Paired: the half-width of each claim's 95% interval, the smallest difference "
            "these seeds resolve, and the std of its per-seed differences.", ""]
  if paired:
    lines += ["| # | Metric | Half-width | Std of paired differences | Pairs |",
              "|---|---|---|---|---|"]
    lines += [f"| {i} | {md_cell(c['metric'])} | {format_number(c['metric'], c['half_width'])} | "
              f"{format_number(c['metric'], c['sd'])} | {c['pairs']} |" for i, c in paired]
  else:
    lines.append("No claim has two paired seeds yet.")
  lines += ["", "Unpaired: the pooled seed-to-seed std of each claimed metric, sqrt(mean of "
            "the per-arm sample variances) over the arms with at least 2 completed seeds.", ""]
  if s["noise_floor"]:
    lines += ["| Metric | Pooled std | Arms |", "|---|---|---|"]
    for metric, nf in s["noise_floor"].items():
      lines.append(f"| {md_cell(metric)} | {format_number(metric, nf['std'])} | "
                   f"{md_cell(', '.join(nf['arms'])) or 'none with 2 seeds'} |")
  lines += _along_training(s["claims"])
  lines += ["", "## Rows", ""]
  bad = [r for r in s["rows"] if r["status"] != "completed"]
  done = len(s["rows"]) - len(bad)
  lines.append(f"{done} of {len(s['rows'])} rows completed.")
  if bad:
    lines += ["", "| Row | Status | Error |", "|---|---|---|"]
    lines += [f"| {md_cell(r['row'])} | {md_cell(r['status'])} | {md_cell(r['error']) or '—'} |" for r in bad]
  reused = [r for r in s["rows"] if r["reused_from"]]
  if reused:
    lines += ["", "Rows whose identical config had already trained elsewhere (files read from "
              "there):", ""]
    lines += [f"- {r['row']} <- `{r['reused_from']}`" for r in reused]
  if s["warnings"]:
    lines += ["", "## Warnings", ""] + [f"- {md_cell(w)}" for w in s["warnings"]]
  if s["notes"]:
    lines += ["", "## Notes", "", s["notes"]]
  lines += ["", "## Plots", ""]
  if s["plots"]:
    lines += [f"![{(titles or {}).get(p, p)}]({p})" for p in s["plots"]]
  else:
    lines.append("No plots: no completed run logged the data they need.")
  lines += ["", "---", "", f"Verdict rule: {s['rule']}", ""]
  return "\n".join(lines)


_SHORT = {"reproduced": "R", "contradicted": "C", "inconclusive": "I"}


def _along_training(claims: list) -> list[str]:
  """Lines of a table: each evaluation step, and for each claim on an evaluation
  metric its paired d +- half-width there with the verdict it would get."""
  shown = [(i, c) for i, c in enumerate(claims, 1) if c.get("along_training")]
  if not shown:
    return []
  steps = sorted({p["step"] for _, c in shown for p in c["along_training"]})
  lines = ["", "## Along training", "",
           "Each claim's paired d ± the half-width of its 95% interval at every evaluation "
           "step (the same batches each time), and the verdict it would get there "
           "(R reproduced, C contradicted, I inconclusive).", "",
           "| Step | " + " | ".join(f"#{i}" for i, _ in shown) + " |",
           "|---|" + "---|" * len(shown)]
  for step in steps:
    cells = []
    for _, c in shown:
      p = next((p for p in c["along_training"] if p["step"] == step), None)
      cells.append("—" if p is None else
                   f"{format_number(c['metric'], p['d'])} ± "
                   f"{format_number(c['metric'], p['half_width'])} {_SHORT[p['verdict']]}")
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  return lines


def render_latex(summary: dict) -> str:
  """table.tex: booktabs tabulars of the main table and of the claims."""
  s = summary
  pm, dash = r" $\pm$ ", "--"
  cols = s["columns"]
  lines = [f"% {tex_escape(s['title'])}: experiment {s['experiment']}, scale {s['scale']}.",
           r"% Generated by python -m experiments.report; needs \usepackage{booktabs}.",
           r"\begin{tabular}{l r " + "r " * len(cols) + "}", r"\toprule",
           "Arm & $n$ & " + " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
  for arm in s["arms"]:
    a = s["stats"][arm]
    cells = [format_stat(c, a["metrics"].get(c), a["completed"], pm=pm, missing=dash)
             for c in cols]
    lines.append(f"{tex_escape(arm)} & {a['completed']}/{a['rows']} & " + " & ".join(cells)
                 + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", ""]
  if s["claims"]:
    lines += [r"\begin{tabular}{p{6cm} l l l l r r r l}", r"\toprule",
              r"Claim & Metric & Relation & Ours & Than & paired $d$ & 95\% CI low & high & "
              r"Verdict \\", r"\midrule"]
    for c in s["claims"]:
      ours = f"{tex_escape(c['arm'])}: {format_stat(c['metric'], c['ours'], pm=pm, missing=dash)}"
      than = _than(c, pm="\0", missing=dash)  # escaped first, then the \pm put in
      lines.append(" & ".join([
          tex_escape(c["text"]), tex_escape(c["metric"]), tex_escape(_relation(c)), ours,
          tex_escape(than).replace("\0", pm), format_number(c["metric"], c["d"], missing=dash),
          format_number(c["metric"], c["low"], missing=dash),
          format_number(c["metric"], c["high"], missing=dash),
          tex_escape(c["verdict"])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
  lines.append(f"% Verdict rule: {tex_escape(s['rule'])}")
  return "\n".join(lines) + "\n"
