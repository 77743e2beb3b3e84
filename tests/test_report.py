"""experiments/report on fake run directories: statistics, verdicts, tables, plots."""

import json
import math
import os
import subprocess
import sys
import types

import pytest

from experiments import report
from experiments.registry import Claim, Experiment
from experiments.report import plots, render, runs, stats
from moejax import plotting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARMS = ("base", "good", "bad", "near_tie", "solo", "ghost")
# eval/loss of each completed seed: base 3.1 ± 0.1414, good 2.6 ± 0.1414, bad 3.6 ± 0.1414,
# near_tie 3.1 ± 0.0707 (seed 1 reused from another experiment), solo one seed (seed 1 failed),
# ghost never ran.
LOSS = {("base", 0): 3.0, ("base", 1): 3.2, ("good", 0): 2.5, ("good", 1): 2.7,
        ("bad", 0): 3.5, ("bad", 1): 3.7, ("near_tie", 0): 3.05, ("near_tie", 1): 3.15,
        ("solo", 0): 3.3}
ENTROPY = {("good", 0): 0.9, ("good", 1): 0.8}  # last aux/load_entropy in metrics.jsonl

CLAIMS = (
    Claim("good beats base", "eval/loss", "good", "less", than_arm="base"),  # d=-0.5, t=0.2828
    Claim("bad beats base", "eval/loss", "bad", "less", than_arm="base"),  # d=+0.5
    Claim("near_tie beats base", "eval/loss", "near_tie", "less", than_arm="base"),  # d=0
    Claim("near_tie matches base", "eval/loss", "near_tie", "close", than_arm="base",
          tolerance=0.01),
    Claim("good matches base", "eval/loss", "good", "close", than_arm="base", tolerance=0.01),
    Claim("near_tie roughly matches base", "eval/loss", "near_tie", "close", than_arm="base",
          tolerance=0.3),
    Claim("solo is below 4", "eval/loss", "solo", "less", than_value=4.0),
    Claim("ghost beats base", "eval/loss", "ghost", "less", than_arm="base"),
    Claim("base is above good", "eval/loss", "base", "greater", than_arm="good"),
    Claim("good stays balanced: 100% & more", "aux/load_entropy", "good", "greater",
          than_value=1.2),
    Claim("base logs nothing", "aux/nothing", "base", "less", than_value=0.0),
)


def _sweep(scale):
  del scale
  return [dict(arm=a, seed=s, config="configs/dense.py:tiny") for a in ARMS for s in (0, 1)]


def _derived(records, cfg):
  del records
  if cfg.get("broken"):
    raise RuntimeError("derived exploded")
  return {"derived": {"x": cfg["seed"] + 0.5}}


def make_experiment(**kw):
  spec = dict(name="fake", title="A fake table", paper="docs/papers/harness.md §a", sweep=_sweep,
              columns=("eval/loss", "budget/params", "aux/load_entropy", "derived/x"),
              claims=CLAIMS, derived=_derived, notes="Fake runs for tests.")
  spec.update(kw)
  return Experiment(**spec)


def write_run(path, *, row=None, final=None, records=(), config=None):
  path.mkdir(parents=True)
  if row is not None:
    (path / "row.json").write_text(json.dumps(row))
  if final is not None:
    (path / "final.json").write_text(json.dumps(final))
  if config is not None:
    (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def vector_records(seed, loss, *, vectors=True, evals=True):
  """Training records every 10 steps to 40; eval every 20 plus a final full-split eval."""
  out = []
  for step in (10, 20, 30, 40):
    r = {"step": step, "loss": 5.0 - step / 20 + seed, "aux/load_entropy": 0.5}
    if vectors:
      r["aux/expert_load/layer_00"] = [0.4, 0.3, 0.2, 0.1]
      r["aux/expert_load/layer_01"] = [0.25, 0.25, 0.25, 0.25]
      r["aux/expert_load/layer_01/iter_0"] = [1.0, 0.0, 0.0, 0.0]  # LoopMoE: not a layer
      r["aux/group_share/layer_00"] = [0.3, 0.7]
      r["aux/l3_entropy_norm/after_01"] = 0.5 + step / 100
    out.append(r)
    if evals and step % 20 == 0:
      out.append({"step": step, "eval/loss": loss + 1.0 - step / 40, "eval/tokens": 100.0})
  if evals:
    out.append({"step": 40, "eval/loss": 9.9, "eval/tokens": 500.0})  # final.json wins
  return out


def make_runs(root, *, vectors=True, evals=True):
  """The fake experiment's row directories under root/fake/tiny (and one reused row)."""
  base = root / "fake" / "tiny"
  for (arm, seed), loss in LOSS.items():
    settings = {"data.data_dir": "/elsewhere" if (arm, seed) == ("bad", 1) else "/mnt/data"}
    row = dict(experiment="fake", row=f"{arm}_s{seed}", arm=arm, seed=seed, status="completed",
               settings=settings)
    final = {"status": "completed", "eval/loss": loss, "budget": {"params": 1000 + seed},
             "jax_version": "0.10.2", "devices": "1 x cpu"}
    records = vector_records(seed, loss, vectors=vectors, evals=evals)
    for r in records:
      if "aux/load_entropy" in r and (arm, seed) in ENTROPY:
        r["aux/load_entropy"] = ENTROPY[(arm, seed)]
    config = {"seed": seed, "broken": arm == "bad" and seed == 1, "train": {"steps": 40},
              "mohge": {"group_widths": [28, 76], "group_aux_start_fraction": 0.5,
                        "group_aux_coef": 0.01}}
    where = base / f"{arm}_s{seed}"
    if (arm, seed) == ("near_tie", 1):  # trained by another experiment, reused here
      where = root / "other" / "tiny" / "same_s0"
      write_run(base / "near_tie_s1", row=dict(row, reused_from=str(where)))
    write_run(where, row=row, final=final, records=records, config=config)
  write_run(base / "solo_s1", row=dict(experiment="fake", row="solo_s1", arm="solo", seed=1,
                                       status="failed",
                                       error="RuntimeError: boom\nsecond line of the error"))
  return root


@pytest.fixture(name="summary", scope="module")
def fixture_summary(tmp_path_factory):
  """One aggregation (about a second, mostly plotting) that the tests below only read."""
  tmp_path = tmp_path_factory.mktemp("aggregate")
  runs = make_runs(tmp_path / "runs")
  out = tmp_path / "out"
  return report.aggregate(make_experiment(), "tiny", str(runs), str(out), say=lambda _: None), out


def test_mean_and_sample_std_match_hand_computation(summary):
  s, _ = summary
  loss = s["stats"]["base"]["metrics"]["eval/loss"]
  assert loss["n"] == 2 and loss["mean"] == pytest.approx(3.1)
  assert loss["std"] == pytest.approx(math.sqrt(0.02))  # ddof=1: ((0.1^2)*2 / 1) ** 0.5
  solo = s["stats"]["solo"]
  assert solo["completed"] == 1 and solo["rows"] == 2
  assert solo["metrics"]["eval/loss"]["std"] is None  # one seed: no std
  # final.json nested keys are flattened; metrics.jsonl adds what final.json lacks
  params = s["stats"]["base"]["metrics"]["budget/params"]
  assert params["mean"] == pytest.approx(1000.5) and params["integral"]
  assert s["stats"]["good"]["metrics"]["aux/load_entropy"]["mean"] == pytest.approx(0.85)
  # pooled noise floor over base, good, bad (var 0.02) and near_tie (var 0.005)
  assert s["noise_floor"]["eval/loss"]["std"] == pytest.approx(math.sqrt(0.065 / 4))
  assert s["noise_floor"]["eval/loss"]["arms"] == ["base", "good", "bad", "near_tie"]


def test_final_json_wins_over_metrics_and_derived_is_added(summary):
  s, _ = summary
  row = next(r for r in s["rows"] if r["row"] == "base_s1")
  assert row["summary"]["eval/loss"] == pytest.approx(3.2)  # not metrics.jsonl's 9.9
  assert row["summary"]["loss"] == pytest.approx(5.0 - 2 + 1)  # last logged training loss
  assert "aux/expert_load/layer_00" not in row["summary"]  # vectors are not scalars
  assert s["stats"]["base"]["metrics"]["derived/x"]["mean"] == pytest.approx(1.0)
  # bad_s1's derived() raised: a warning, and its other values still count
  assert any("derived exploded" in w for w in s["warnings"])
  assert s["stats"]["bad"]["metrics"]["derived/x"]["n"] == 1
  assert s["stats"]["bad"]["metrics"]["eval/loss"]["n"] == 2


def test_every_unpaired_verdict_branch(summary):
  s, _ = summary
  got = {c["text"]: c["unpaired"] for c in s["claims"]}
  assert got["good beats base"]["verdict"] == stats.REPRODUCED
  assert got["good beats base"]["d"] == pytest.approx(-0.5)
  assert got["good beats base"]["t"] == pytest.approx(2 * math.sqrt(0.02))
  assert got["bad beats base"]["verdict"] == stats.CONTRADICTED
  assert got["near_tie beats base"]["verdict"] == stats.INCONCLUSIVE
  assert got["near_tie beats base"]["t"] == pytest.approx(2 * math.sqrt(0.0125))
  # close: |d| + t = 0.2236 exceeds 0.01, and |d| - t is not above it: inside the noise
  assert got["near_tie matches base"]["verdict"] == stats.INCONCLUSIVE
  assert got["near_tie roughly matches base"]["verdict"] == stats.REPRODUCED
  assert got["good matches base"]["verdict"] == stats.CONTRADICTED
  assert got["solo is below 4"]["verdict"] == stats.ONE_SEED
  assert got["solo is below 4"]["d"] == pytest.approx(-0.7) and got["solo is below 4"]["t"] is None
  assert got["ghost beats base"]["verdict"] == stats.NOT_RUN
  assert got["base is above good"]["verdict"] == stats.REPRODUCED
  # a claim against a value uses the arm's own std: d = 0.85 - 1.2, t = 2 * 0.0707
  entropy = got["good stays balanced: 100% & more"]
  assert entropy["verdict"] == stats.CONTRADICTED
  assert entropy["t"] == pytest.approx(2 * math.sqrt(0.005))
  assert got["base logs nothing"]["verdict"] == stats.NO_DATA


def test_every_paired_verdict_branch(summary):
  """Per-seed differences of the fake runs, by hand (two seeds: t(0.975, 1) = 12.706)."""
  s, _ = summary
  got = {c["text"]: c for c in s["claims"]}
  t1 = 12.706204736174698
  good = got["good beats base"]  # differences -0.5, -0.5: no spread
  assert good["d"] == pytest.approx(-0.5) and good["sd"] == pytest.approx(0.0)
  assert good["pairs"] == 2 and good["verdict"] == stats.REPRODUCED
  assert got["bad beats base"]["verdict"] == stats.CONTRADICTED
  # near_tie - base: 0.05, -0.05 -> d = 0, sd = 0.0707, half-width 12.706 * 0.05
  tie = got["near_tie beats base"]
  assert tie["d"] == pytest.approx(0.0, abs=1e-12) and tie["sd"] == pytest.approx(math.sqrt(0.005))
  assert tie["half_width"] == pytest.approx(t1 * 0.05)
  assert tie["low"] == pytest.approx(-t1 * 0.05) and tie["verdict"] == stats.INCONCLUSIVE
  assert got["near_tie matches base"]["verdict"] == stats.INCONCLUSIVE
  assert got["good matches base"]["verdict"] == stats.CONTRADICTED  # [-0.5, -0.5] outside
  assert got["solo is below 4"]["verdict"] == stats.ONE_SEED
  assert got["solo is below 4"]["d"] == pytest.approx(-0.7)
  assert got["ghost beats base"]["verdict"] == stats.NOT_RUN
  assert got["base is above good"]["verdict"] == stats.REPRODUCED
  # against a value: 0.9 - 1.2, 0.8 - 1.2 -> d = -0.35, sd 0.0707; interval
  # -0.35 +- 12.706 * 0.05 = [-0.985, 0.285] contains 0: inconclusive here, where
  # the unpaired rule (t = 2 sd) said contradicted.
  entropy = got["good stays balanced: 100% & more"]
  assert entropy["d"] == pytest.approx(-0.35)
  assert entropy["high"] == pytest.approx(-0.35 + t1 * 0.05)
  assert entropy["verdict"] == stats.INCONCLUSIVE
  assert got["base logs nothing"]["verdict"] == stats.NO_DATA


def _two_arms(a_values, b_values, seeds=(0, 1, 2)):
  return {"a": dict(rows=len(seeds), completed=len(a_values),
                    metrics={"m": stats.stat(a_values, seeds[:len(a_values)])}),
          "b": dict(rows=len(seeds), completed=len(b_values),
                    metrics={"m": stats.stat(b_values, seeds[:len(b_values)])})}


def test_paired_resolves_what_unpaired_cannot():
  """Seeds far apart (std 0.5) but a steady per-seed gap: differences -0.05, -0.06,
  -0.04 -> d = -0.05, sd = 0.01, half-width t(0.975, 2) * 0.01 / sqrt(3) with
  t(0.975, 2) = 4.302653, so [-0.07484, -0.02516]: reproduced. Unpaired, the
  means differ by 0.05 against t = 2 x 0.4975: inconclusive."""
  arm_stats = _two_arms([3.0, 3.5, 4.0], [3.05, 3.56, 4.04])
  v = stats.verdict(Claim("a below b", "m", "a", "less", than_arm="b"), arm_stats)
  half = 4.302652729911275 * 0.01 / math.sqrt(3)
  assert v["d"] == pytest.approx(-0.05) and v["sd"] == pytest.approx(0.01)
  assert v["low"] == pytest.approx(-0.05 - half) and v["high"] == pytest.approx(-0.05 + half)
  assert v["verdict"] == stats.REPRODUCED and v["pairs"] == 3
  assert v["unpaired"]["verdict"] == stats.INCONCLUSIVE
  # sample variances: a 0.25, b (0.25 + 0.0001 + 0.2401) / 2 = 0.2451
  assert v["unpaired"]["t"] == pytest.approx(2 * math.sqrt((0.25 + 0.2451) / 2))
  # close with tolerance 0.1: [-0.0748, -0.0252] lies inside: reproduced; 0.03: not all
  close = Claim("a matches b", "m", "a", "close", than_arm="b", tolerance=0.1)
  assert stats.verdict(close, arm_stats)["verdict"] == stats.REPRODUCED
  close = Claim("a matches b", "m", "a", "close", than_arm="b", tolerance=0.03)
  assert stats.verdict(close, arm_stats)["verdict"] == stats.INCONCLUSIVE
  close = Claim("a matches b", "m", "a", "close", than_arm="b", tolerance=0.02)
  assert stats.verdict(close, arm_stats)["verdict"] == stats.CONTRADICTED


def test_only_seeds_both_arms_completed_are_paired():
  arm_stats = _two_arms([1.0, 2.0, 3.0], [1.5, 2.4])  # b's seed 2 did not complete
  v = stats.verdict(Claim("a below b", "m", "a", "less", than_arm="b"), arm_stats)
  assert v["seeds"] == [0, 1] and v["d"] == pytest.approx(-0.45)
  assert v["sd"] == pytest.approx(math.sqrt(0.005))


def test_greater_inside_noise_is_inconclusive():
  arm_stats = _two_arms([1.0, 1.2], [1.05, 1.25], seeds=(0, 1))
  v = stats.unpaired_verdict(Claim("a above b", "m", "a", "greater", than_arm="b"), arm_stats)
  assert v["verdict"] == stats.INCONCLUSIVE and v["d"] == pytest.approx(-0.05)
  v = stats.unpaired_verdict(Claim("a above 0.5", "m", "a", "greater", than_value=0.5),
                             arm_stats)
  assert v["verdict"] == stats.REPRODUCED


def test_failed_row_and_reused_row_in_table(summary):
  s, out = summary
  rows = {r["row"]: r for r in s["rows"]}
  assert rows["solo_s1"]["status"] == "failed"
  assert rows["solo_s1"]["error"] == "RuntimeError: boom"
  assert rows["ghost_s0"]["status"] == "missing"
  assert rows["near_tie_s1"]["status"] == "completed"
  assert rows["near_tie_s1"]["reused_from"].endswith("other/tiny/same_s0")
  assert s["stats"]["near_tie"]["metrics"]["eval/loss"]["values"] == pytest.approx([3.05, 3.15])
  md = (out / "table.md").read_text()
  assert "| solo_s1 | failed | RuntimeError: boom |" in md
  assert "second line" not in md
  assert "| ghost_s0 | missing |" in md
  assert "near_tie_s1 <- " in md
  assert "| base | 2/2 | 3.1000 ± 0.1414 | 1,000 ± 0.7071 |" in md  # losses 4 decimals, ints
  assert "| solo | 1/2 | 3.3000 (n=1) |" in md
  # the command names the runs' root and the --set values most rows recorded
  assert "python run.py --experiment=fake --scale=tiny --workdir=" in md
  assert s["command"].endswith(" --set=data.data_dir=/mnt/data")
  assert any(w.startswith("bad_s1 was run with --set values {'data.data_dir': '/elsewhere'}")
             for w in s["warnings"])
  assert "jax 0.10.2; devices 1 x cpu" in md
  assert "Fake runs for tests." in md and "Verdict rule:" in md
  assert "**inconclusive (one seed)**" in md and "**not run**" in md
  assert json.loads((out / "summary.json").read_text())["claims"][0]["verdict"] == "reproduced"


def test_latex_escapes_specials(summary):
  _, out = summary
  tex = (out / "table.tex").read_text()
  assert r"near\_tie" in tex and "near_tie" not in tex
  assert r"aux/load\_entropy" in tex
  assert r"100\% \& more" in tex
  assert r"3.1000 $\pm$ 0.1414" in tex
  assert r"\toprule" in tex and r"\bottomrule" in tex
  assert tex.count(r"\begin{tabular}") == 2


def test_plots_written_when_data_exists(summary):
  s, out = summary
  assert s["plots"] == plots.plot_names()
  assert {"val_loss.png", "expert_load.png", "group_traffic.png",
          "l3_entropy.png"} <= set(s["plots"])
  for name in s["plots"]:
    data = (out / name).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert f"]({name})" in (out / "table.md").read_text()
  md = (out / "table.md").read_text()
  for title, name in (("Validation loss", "val_loss.png"), ("Expert load", "expert_load.png"),
                      ("MoHGE group traffic", "group_traffic.png"),
                      ("L3 entropy", "l3_entropy.png")):
    assert f"![{title}]({name})" in md


def test_no_plots_without_data(tmp_path):
  runs = make_runs(tmp_path / "runs", vectors=False, evals=False)
  out = tmp_path / "out"
  out.mkdir()
  (out / "expert_load.png").write_bytes(b"stale")  # from an earlier aggregation
  s = report.aggregate(make_experiment(), "tiny", str(runs), str(out), say=lambda _: None)
  assert s["plots"] == []
  assert not any((out / name).exists() for name in plots.plot_names())
  assert "No plots" in (out / "table.md").read_text()


def test_eval_curve_separates_the_final_full_split_evaluation():
  curve, final = runs.eval_curve(vector_records(0, 3.0))
  assert curve == {20: pytest.approx(3.5), 40: pytest.approx(3.0)}
  assert final == (40, 9.9)


def test_expert_load_ratio_averages_layers_not_iterations():
  records = vector_records(0, 3.0)
  keys = plotting.prefixed(records, "aux/expert_load/layer_")
  assert keys == ["aux/expert_load/layer_00", "aux/expert_load/layer_01"]
  # layer_00: 0.4 / 0.25 = 1.6; layer_01: uniform, 1.0
  ratio = plots._load_ratio(records[0], keys)  # pylint: disable=protected-access
  assert ratio == pytest.approx(1.3)


def test_format_number():
  assert render.format_number("eval/loss", 3.14159) == "3.1416"
  assert render.format_number("budget/params", 1049728, integral=True) == "1,049,728"
  assert render.format_number("wall_time_s", 249.123) == "249.1"
  assert render.format_number("perf/tokens_per_s", 5123.6) == "5,124"
  assert render.format_number("x", None) == "—"


def test_cli_without_runs_says_one_sentence(tmp_path):
  r = subprocess.run([sys.executable, "-m", "experiments.report", "--experiment=mohge",
                      f"--runs={tmp_path}"], capture_output=True, text=True, check=False,
                     cwd=ROOT)
  assert r.returncode == 2, r.stderr
  assert "config error: There are no runs in" in r.stderr and "Traceback" not in r.stderr


def test_paired_interval_along_training_pairs_each_evaluation_step(summary):
  """good - base per seed at the periodic evaluations of the fake runs: each curve is
  loss + 1 - step / 40 at steps 20 and 40, so the difference is -0.5 at both steps,
  for both seeds; near_tie - base is +-0.05 as at the end."""
  s, out = summary
  got = {c["text"]: c for c in s["claims"]}
  curve = got["good beats base"]["along_training"]
  assert [p["step"] for p in curve] == [20, 40]
  assert all(p["d"] == pytest.approx(-0.5) and p["verdict"] == stats.REPRODUCED for p in curve)
  tie = got["near_tie beats base"]["along_training"]
  assert [p["pairs"] for p in tie] == [2, 2]
  assert tie[0]["half_width"] == pytest.approx(12.706204736174698 * 0.05)
  assert got["base logs nothing"]["along_training"] == []
  assert got["good stays balanced: 100% & more"]["along_training"] == []  # not on the curve
  md = (out / "table.md").read_text()
  assert "## Along training" in md and "| 20 | -0.5000 ± 0.0000 R |" in md


def test_overview_readme_part_and_forest_plot(summary, tmp_path):
  from experiments.report import overview
  s, _ = summary
  results = tmp_path / "results"
  (results / "fake").mkdir(parents=True)
  (results / "fake" / "summary.json").write_text(json.dumps(s))
  loaded = overview.load_summaries(str(results), names=["fake", "absent"])
  assert [x["experiment"] for x in loaded] == ["fake"]
  text = overview.markdown(loaded, "results")
  got = {c["text"]: overview.reading(c) for c in s["claims"]}
  assert got["good beats base"] == ("good is below base on these 2 seeds: d = -0.5000 "
                                    "(-0.5000 to -0.5000).")
  assert got["bad beats base"].startswith("The opposite of the claim: bad minus base is 0.5000")
  assert got["near_tie beats base"].startswith("Undecided: d = -0.0000, but the interval")
  assert got["ghost beats base"] == "Not run yet."
  assert "| [fake](results/fake/table.md) | 1 | good beats base | -0.5000 [-0.5000, -0.5000] " \
         "(n=2) | **reproduced** |" in text
  assert "2 seeds per arm" in text and "40 steps" not in text  # the fake final.json has no step
  assert "Verdicts: contradicted 2, inconclusive" in text
  # forest plot: loss claims with an interval only (less/greater)
  assert overview.forest_plot(loaded, str(results / "claims.png"))
  assert (results / "claims.png").stat().st_size > 0
  effect = overview.claimed_effect(next(c for c in s["claims"] if c["text"] == "good beats base"))
  assert effect == pytest.approx((0.5, 0.5, 0.5))
  older = dict(s, experiment="old", claims=[{k: v for k, v in c.items() if k != "pairs"}
                                            for c in s["claims"]])
  text_with_old = overview.markdown(loaded + [older], "results")
  assert text_with_old.startswith(text) and "Not yet rerun at this scale" in text_with_old
  assert "[old](results/old/table.md)" in text_with_old
  readme = tmp_path / "README.md"
  readme.write_text(f"# Title\n\nbefore\n{overview.BEGIN}\nold table\n{overview.END}\nafter\n")
  overview.update_readme(str(readme), text)
  new = readme.read_text()
  assert "old table" not in new and text in new
  assert new.startswith("# Title\n\nbefore\n") and new.endswith(f"{overview.END}\nafter\n")
  readme.write_text("no markers\n")
  with pytest.raises(ValueError, match="marker lines"):
    overview.update_readme(str(readme), text)


def test_rows_of_two_code_versions_are_warned_about():
  def row(name, version):
    return types.SimpleNamespace(name=name, summary={"code_version": version} if version else {})
  one = [row("a_s0", "abc"), row("b_s0", "abc"), row("c_s0", None)]
  assert report.code_version_warnings(one) == []
  (warning,) = report.code_version_warnings(one + [row("a_s1", "def+dirty")])
  assert "2 code versions" in warning and "def+dirty: a_s1" in warning
  assert "abc: a_s0, b_s0" in warning


def test_code_version_is_the_checkout_commit():
  from moejax.provenance import code_version
  head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                        text=True, check=False, cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))))
  if head.returncode != 0:
    pytest.skip("not a git checkout")
  assert code_version().split("+")[0] == head.stdout.strip()
