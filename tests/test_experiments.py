"""The experiment registry and sweep runner (experiments/): rows, budgets, failures, reuse."""

import json
import math
import os
import sys
import types

import pytest

import jax

from experiments import common, registry, sweep
from experiments.registry import Experiment, Match, Target
from moejax.config.files import load_config
from moejax import provenance
from moejax.errors import ConfigError
from tests.helpers import TINY_FLAGS, run_py

# A 2-step run of the tests' tiny dense model on synthetic data, as row
# overrides: they come after scales.OVERRIDES["tiny"] (150 steps, ...), so
# every field that scale sets is set again here. 8 sequences: conftest.py
# gives the test process 8 CPU devices.
FAST = {**{k: v for k, v in TINY_FLAGS.items() if k != "name"},
        "train.steps": 2, "train.warmup_steps": 1, "train.log_every": 1,
        "train.eval_every": 1000, "train.eval_batches": 1, "train.final_eval_batches": 1,
        "checkpoint.every": 2}
SPEC = "configs/dense.py:tiny"


def train_row(arm: str, seed: int = 0, **overrides) -> dict:
  return dict(arm=arm, seed=seed, config=SPEC, **{**FAST, **overrides})


def measure_row(arm: str, seed: int = 0, **overrides) -> dict:
  return dict(arm=arm, seed=seed, task="measure", config=SPEC, **{**FAST, **overrides})


def read(path) -> dict:
  with open(path) as f:
    return json.load(f)


@pytest.fixture
def register(monkeypatch):
  """register(name, rows, ...) makes `experiments.<name>` a fake experiment for this test."""
  def add(name: str, rows: list, **kw) -> Experiment:
    exp = Experiment(name=name, title=f"fake {name}", paper="tests", columns=("eval/loss",),
                     sweep=lambda scale: [dict(r) for r in rows], scales=("tiny",), **kw)
    module = types.ModuleType(f"experiments.{name}")
    module.EXPERIMENT = exp
    monkeypatch.setitem(sys.modules, f"experiments.{name}", module)
    monkeypatch.setattr(registry, "NAMES", (*registry.NAMES, name))
    return exp
  return add


@pytest.fixture
def no_training(monkeypatch):
  """Makes any call of train_and_evaluate fail the test loudly (run_row would record it)."""
  calls = []

  def refuse(cfg, workdir):
    calls.append(workdir)
    raise AssertionError(f"trained {workdir}")

  monkeypatch.setattr("moejax.train.train_and_evaluate", refuse)
  return calls


def sweep_quietly(name, root, **kw):
  said = []
  records = sweep.run_sweep(name, "tiny", str(root), say=said.append, **kw)
  return records, "\n".join(said)


# --- the real experiments ------------------------------------------------------


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_experiment_has_well_formed_rows_at_every_scale(name):
  exp = registry.get(name)
  assert exp.name == name and exp.columns and set(exp.scales) <= set(registry.SCALES)
  for scale in exp.scales:
    rows = exp.rows(scale)
    assert rows, f"{name} has no rows at {scale}"
    for row in rows:
      assert {"arm", "config", "seed"} <= set(row), row
      assert isinstance(row["seed"], int) and ":" in row["config"], row
      assert row.get("task") in (None, "measure"), row
      if row.get("task") == "measure":
        assert exp.measure is not None, f"{name} has measure rows but no measure function"
    names = [registry.row_name(r) for r in rows]
    assert len(names) == len(set(names)), f"{name} at {scale} repeats a row: {names}"
    if scale != "paper":
      seeds = {}
      for r in rows:
        seeds.setdefault(r["arm"], set()).add(r["seed"])
      thin = {arm: s for arm, s in seeds.items() if len(s) < 2}
      assert not thin, f"{name} at {scale}: arms with fewer than 2 seeds: {thin}"
  # Claims and matches name arms that exist.
  arms = set(exp.arms)
  for claim in exp.claims:
    assert claim.arm in arms and claim.than_arm in arms | {None}, claim
  for match in exp.matches:
    assert {match.reference, *match.arms} <= arms, match


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_experiment_prepares_at_tiny_on_one_device(name):
  exp = registry.get(name)
  plan = sweep.prepare(exp, "tiny", num_devices=1)
  configs, rows = plan.configs, exp.rows("tiny")
  assert [row for row, _ in configs] == rows
  for row, cfg in configs:
    assert cfg.seed == row["seed"]
    assert cfg.name == f"{name}-{registry.row_name(row)}"
    for key, value in sweep.overrides(row).items():
      group, field = key.rsplit(".", 1)
      node = cfg
      for part in group.split("."):
        node = node[part]
      assert node[field] == (tuple(value) if isinstance(value, list) else value), key
  trained = {r["arm"] for r in rows if r.get("task") != "measure"}
  assert set(plan.budgets) == trained
  # The matches hold, recomputed here from the budgets rather than taken from the report.
  for m in exp.matches:
    for arm in m.arms:
      for q in m.quantities:
        ref = plan.budgets[m.reference][q]
        assert abs(plan.budgets[arm][q] - ref) <= m.tolerance * abs(ref), (arm, q)


@pytest.mark.parametrize("name,scale", [(n, s) for n in registry.NAMES
                                        for s in registry.get(n).scales if s != "tiny"])
def test_every_experiment_prepares_at_its_larger_scales(name, scale):
  """Budgets and matches at small and paper scale: what --dry_run checks before a GPU run."""
  exp = registry.get(name)
  configs = sweep.prepare(exp, scale, num_devices=1).configs
  assert len(configs) == len(exp.rows(scale))


def test_unknown_experiment_and_scale_are_config_errors(register):
  with pytest.raises(ConfigError, match="Unknown experiment 'nope'"):
    registry.get("nope")
  exp = register("fake_scales", [measure_row("a")])
  with pytest.raises(ConfigError, match="no 'paper' scale"):
    exp.rows("paper")


def test_a_row_without_its_keys_is_rejected(register):
  exp = register("fake_keys", [dict(arm="a", config=SPEC)])
  with pytest.raises(ValueError, match="seed"):
    exp.rows("tiny")


def test_common_rows_crosses_arms_with_seeds():
  rows = common.rows("tiny", {"a": dict(config=SPEC), "b": dict(config=SPEC, x=1)})
  seeds = common.SEEDS["tiny"]
  assert len(seeds) >= 3
  assert [(r["arm"], r["seed"]) for r in rows] == ([("a", s) for s in seeds]
                                                   + [("b", s) for s in seeds])
  assert rows[len(seeds)]["x"] == 1 and "x" not in rows[0]


def test_queue_runs_each_table_seed_by_seed_and_timing_rows_last():
  """A suite stopped partway must leave every arm with the same seeds (pairing)."""
  from experiments.queue import queue
  names = ["omnimoe", "all_variants"]
  pairs = queue(names, "tiny")
  rows = {name: registry.get(name).rows("tiny") for name in names}
  trained = [(n, i) for n, i in pairs if rows[n][i].get("task") != "measure"]
  measured = [(n, i) for n, i in pairs if rows[n][i].get("task") == "measure"]
  assert measured and pairs == trained + measured
  assert sorted(pairs) == sorted((n, i) for n in names for i in range(len(rows[n])))
  for name in names:
    order = [rows[name][i] for n, i in trained if n == name]
    assert [r["seed"] for r in order] == sorted(r["seed"] for r in order)
    arms = {r["arm"] for r in order}
    assert {r["arm"] for r in order[:len(arms)]} == arms  # every arm's first seed first
  assert [n for n, _ in trained] == sorted([n for n, _ in trained], key=names.index)


def test_list_names_every_experiment():
  r = run_py(["--list"])
  assert r.returncode == 0, r.stderr[-3000:]
  starts = {line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()}
  assert set(registry.NAMES) <= starts, r.stdout
  assert "--experiment=NAME" in r.stdout
  first_deepseek = len(common.SEEDS["tiny"])  # after the dense rows
  assert (f"--sweep_index={first_deepseek:<3d} deepseek_s0: configs/moe.py:deepseek_tiny "
          "moe.expert_ffn_dim=46") in r.stdout


def test_dry_run_prints_budget_matches_without_training(tmp_path):
  r = run_py(["--experiment=l3", "--scale=tiny", "--dry_run", f"--workdir={tmp_path}"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "budgets matched before training" in out
  for arm in ("lzw", "uniform", "moe"):
    assert any("active_params" in l and arm in l and "vs dense" in l for l in out.splitlines()), out
  assert any(l.split()[:2] == ["params", "moe"] and "vs lzw" in l for l in out.splitlines()), out
  assert not os.listdir(tmp_path)


# --- overrides and budget checks ------------------------------------------------


def test_set_dotted_rejects_fields_that_do_not_exist():
  cfg = load_config(SPEC)
  sweep.set_dotted(cfg, "train.steps", 7)
  sweep.set_dotted(cfg, "mohge.group_widths", [1, 2])
  assert cfg.train.steps == 7 and cfg.mohge.group_widths == (1, 2)
  with pytest.raises(ConfigError, match="'train.stepz'.*'stepz'"):
    sweep.set_dotted(cfg, "train.stepz", 3)
  with pytest.raises(ConfigError, match="'trian.steps'.*'trian'"):
    sweep.set_dotted(cfg, "trian.steps", 3)


def test_a_bad_override_stops_the_sweep_before_anything_runs(register, tmp_path, no_training):
  register("fake_typo", [measure_row("a"), train_row("b", **{"moe.topk": 2})])
  with pytest.raises(ConfigError, match="moe.topk"):
    sweep_quietly("fake_typo", tmp_path / "runs")
  assert not (tmp_path / "runs").exists() and not no_training


def test_a_violated_match_stops_the_sweep_before_anything_trains(register, tmp_path,
                                                                 no_training):
  register("fake_match", [train_row("small"), train_row("big", **{"model.ffn_dim": 128})],
           matches=(Match("small", ("big",), ("active_params",), 0.01),))
  with pytest.raises(ConfigError, match="arm 'big' matches 'small' on active_params"):
    sweep_quietly("fake_match", tmp_path / "runs")
  assert not (tmp_path / "runs").exists() and not no_training


def test_a_missed_paper_target_is_a_config_error(register):
  exp = register("fake_target", [train_row("a")],
                 targets=(Target("a", "tiny", "params", 1e9, "tests"),))
  budgets = sweep.arm_budgets(exp, "tiny")
  with pytest.raises(ConfigError, match="from the paper's"):
    sweep.check_targets(exp, "tiny", budgets)
  close = Target("a", "tiny", "params", budgets["a"]["params"] * 1.01, "tests")
  exp = register("fake_target2", [train_row("a")], targets=(close,))
  lines = sweep.check_targets(exp, "tiny", budgets)
  assert len(lines) == 1 and "vs paper" in lines[0]


# --- running rows ----------------------------------------------------------------


def test_a_measure_row_writes_the_measured_metrics(register, tmp_path, no_training):
  seen = []

  def measure(row, cfg, workdir, scale, settings):
    seen.append((row["arm"], cfg.train.steps, workdir, scale))
    return {"time/ratio_to_dense": 1.5, "latency/peer_ms": 2.25}

  register("fake_measure", [measure_row("timing")], measure=measure)
  records, _ = sweep_quietly("fake_measure", tmp_path)
  workdir = tmp_path / "fake_measure" / "tiny" / "timing_s0"
  assert seen == [("timing", 2, str(workdir), "tiny")]
  final = read(workdir / "final.json")
  assert final["status"] == "completed"
  assert final["time/ratio_to_dense"] == 1.5 and final["latency/peer_ms"] == 2.25
  assert final["jax_version"] == jax.__version__ and final["devices"].endswith("cpu")
  assert final["code_version"] == provenance.code_version()
  assert read(workdir / "config.json")["train"]["steps"] == 2
  row = read(workdir / "row.json")
  assert row["status"] == "completed" and row["arm"] == "timing" and row["seed"] == 0
  assert records[0]["status"] == "completed" and not no_training


def test_a_failing_row_is_recorded_and_the_sweep_goes_on(register, tmp_path):
  def measure(row, cfg, workdir, scale, settings):
    raise RuntimeError("the timer broke")

  register("fake_fail", [measure_row("broken"), train_row("ok")], measure=measure)
  records, said = sweep_quietly("fake_fail", tmp_path)
  assert [r["status"] for r in records] == ["failed", "completed"]
  broken = tmp_path / "fake_fail" / "tiny" / "broken_s0"
  row = read(broken / "row.json")
  assert row["status"] == "failed" and row["error"] == "RuntimeError: the timer broke"
  text = (broken / "error.txt").read_text()
  assert "Traceback" in text and "the timer broke" in text
  assert not (broken / "final.json").exists()
  ok = tmp_path / "fake_fail" / "tiny" / "ok_s0"
  final = read(ok / "final.json")
  assert final["status"] == "completed" and math.isfinite(final["eval/loss"])
  assert read(ok / "row.json")["status"] == "completed"
  assert read(ok / "config.json")["train"]["steps"] == 2
  assert "1 completed, 1 failed: broken_s0" in said

  # The broken row, fixed (another config), runs again instead of being refused;
  # its failed files are kept beside it.
  def measure_fixed(row, cfg, workdir, scale, settings):
    return {"latency/x_ms": 1.0}

  register("fake_fail", [measure_row("broken", **{"train.learning_rate": 1e-3}),
                         train_row("ok")], measure=measure_fixed)
  records, said = sweep_quietly("fake_fail", tmp_path)
  assert [r["status"] for r in records] == ["completed", "completed"]
  assert "broken_s0 failed with another config; moved to" in said
  assert read(broken / "final.json")["latency/x_ms"] == 1.0
  assert len(list((tmp_path / "fake_fail" / "tiny").glob("broken_s0.failed-*"))) == 1


def test_sweep_index_runs_exactly_one_row(register, tmp_path, no_training):
  measured = []

  def measure(row, cfg, workdir, scale, settings):
    measured.append(registry.row_name(row))
    return {"time/x": float(row["seed"])}

  register("fake_index", [measure_row("a", s) for s in range(3)], measure=measure)
  records, _ = sweep_quietly("fake_index", tmp_path, sweep_index=1)
  assert measured == ["a_s1"] and [r["row"] for r in records] == ["a_s1"]
  assert sorted(os.listdir(tmp_path / "fake_index" / "tiny")) == ["a_s1"]
  for bad in (3, -1):
    with pytest.raises(ConfigError, match=f"--sweep_index={bad} is out of range.*3 rows"):
      sweep_quietly("fake_index", tmp_path / "other", sweep_index=bad)
  assert not (tmp_path / "other").exists() and measured == ["a_s1"]


def test_sweep_index_without_experiment_exits_2_with_one_sentence(tmp_path):
  r = run_py(["--sweep_index=0", f"--workdir={tmp_path}"])
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("config error:")]
  assert len(lines) == 1 and "--experiment=NAME" in lines[0], r.stderr
  assert "Traceback" not in r.stderr and not os.listdir(tmp_path)


def test_config_flags_with_experiment_exit_2_with_one_sentence(tmp_path):
  r = run_py(["--experiment=l3", "--config.train.steps=5", "--dry_run", f"--workdir={tmp_path}"])
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("config error:")]
  assert len(lines) == 1 and "--set=" in lines[0], r.stderr


def test_rerun_skips_completed_rows_and_equal_configs_are_reused(register, tmp_path,
                                                                 monkeypatch):
  register("fake_a", [train_row("base")])
  records, _ = sweep_quietly("fake_a", tmp_path)
  assert records[0]["status"] == "completed"
  base = tmp_path / "fake_a" / "tiny" / "base_s0"
  metrics = base / "metrics.jsonl"
  before = (metrics.read_bytes(), os.stat(metrics).st_mtime_ns,
            os.stat(base / "final.json").st_mtime_ns)
  assert before[0]

  # From here on nothing trains for real: a stand-in records the call and
  # writes the final.json a completed run leaves.
  trained = []

  def fake_train(cfg, workdir):
    trained.append(workdir)
    final = {"status": "completed", "eval/loss": 1.0}
    with open(os.path.join(workdir, "final.json"), "w") as f:
      json.dump(final, f)
    return final

  monkeypatch.setattr("moejax.train.train_and_evaluate", fake_train)
  records, said = sweep_quietly("fake_a", tmp_path)
  assert records[0]["status"] == "completed" and "already completed" in said
  assert not trained
  assert (metrics.read_bytes(), os.stat(metrics).st_mtime_ns,
          os.stat(base / "final.json").st_mtime_ns) == before

  # Another experiment's row with the same config (another arm name, same seed)
  # reuses the run; one with another seed is another config and trains.
  register("fake_b", [train_row("dense"), train_row("dense", seed=1)])
  records, said = sweep_quietly("fake_b", tmp_path)
  assert [r["status"] for r in records] == ["completed", "completed"]
  reused = tmp_path / "fake_b" / "tiny" / "dense_s0"
  row = read(reused / "row.json")
  assert row["status"] == "completed" and row["reused_from"] == str(base.resolve())
  assert not (reused / "metrics.jsonl").exists() and "reusing it" in said
  assert trained == [str(tmp_path / "fake_b" / "tiny" / "dense_s1")]
  assert "reused_from" not in read(tmp_path / "fake_b" / "tiny" / "dense_s1" / "row.json")

  # Rerunning the reusing experiment keeps the reuse and trains nothing again.
  trained.clear()
  records, said = sweep_quietly("fake_b", tmp_path)
  assert [r["status"] for r in records] == ["completed", "completed"] and not trained
  assert said.count("already completed") == 2
  assert read(reused / "row.json")["reused_from"] == str(base.resolve())
  assert metrics.read_bytes() == before[0]

  # A row that ran before a config field existed (its config.json lacks the
  # field, its fingerprint differs) still counts as done while the field keeps
  # its default.
  saved = read(base / "config.json")
  del saved["data"]["eval_fraction"]
  (base / "config.json").write_text(json.dumps(saved))
  row = read(base / "row.json")
  row["fingerprint"] = "0" * 16
  (base / "row.json").write_text(json.dumps(row))
  records, said = sweep_quietly("fake_a", tmp_path)
  assert records[0]["status"] == "completed" and "already completed" in said
  assert not trained

  # The same holds for a row that reused another run: its config is that run's.
  row = read(reused / "row.json")
  row["fingerprint"] = "1" * 16
  (reused / "row.json").write_text(json.dumps(row))
  records, said = sweep_quietly("fake_b", tmp_path)
  assert [r["status"] for r in records] == ["completed", "completed"] and not trained

  # A completed row whose config the sweep now builds differently is not
  # passed off as done: the sweep stops, naming the row, before training.
  register("fake_a", [train_row("base", **{"train.learning_rate": 1e-3})])
  with pytest.raises(ConfigError, match=r"base_s0.*another config.*train\.learning_rate: "
                     r"0\.003 -> 0\.001"):
    sweep_quietly("fake_a", tmp_path)
  assert not trained and metrics.read_bytes() == before[0]


def test_measure_rows_are_never_reused(register, tmp_path):
  calls = []

  def measure(row, cfg, workdir, scale, settings):
    calls.append(workdir)
    return {"time/x": 1.0}

  register("fake_m1", [measure_row("t")], measure=measure)
  register("fake_m2", [measure_row("t")], measure=measure)
  sweep_quietly("fake_m1", tmp_path)
  sweep_quietly("fake_m2", tmp_path)
  assert len(calls) == 2  # timings are of this machine now, not of another run's
  assert "reused_from" not in read(tmp_path / "fake_m2" / "tiny" / "t_s0" / "row.json")


def test_a_training_row_never_reuses_a_measured_row_of_the_same_config(register, tmp_path,
                                                                       monkeypatch):
  trained = []

  def fake_train(cfg, workdir):
    trained.append(workdir)
    final = dict(status="completed", train_loss=1.0, **{"eval/loss": 1.0})
    with open(os.path.join(workdir, "final.json"), "w") as f:
      json.dump(final, f)
    return final

  monkeypatch.setattr("moejax.train.train_and_evaluate", fake_train)
  register("fake_timing", [measure_row("t")], measure=lambda *a: {"time/x": 1.0})
  register("fake_table", [train_row("t")])
  register("fake_table2", [train_row("t")])
  sweep_quietly("fake_timing", tmp_path)
  _, said = sweep_quietly("fake_table", tmp_path)
  assert len(trained) == 1 and "reusing" not in said
  assert "reused_from" not in read(tmp_path / "fake_table" / "tiny" / "t_s0" / "row.json")
  # A trained row is still shared with the next table that needs it.
  _, said = sweep_quietly("fake_table2", tmp_path)
  assert len(trained) == 1 and "reusing" in said

