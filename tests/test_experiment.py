"""The whole pipeline on a tiny config: outputs, contents, and resume-by-skipping."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from prunebias_jax import experiment, stages
from prunebias_jax import workdir as workdir_lib
from prunebias_jax.checkpoint import CheckpointError
from prunebias_jax.config import resolve_config

RECORD_KEYS = {
  "method",
  "sparsity",
  "kd",
  "seed",
  "accuracy",
  "cev",
  "sde",
  "cka",
  "realized_sparsity",
  "realized_sparsity_per_layer",
  "fpr",
  "fnr",
  "dfpr",
  "dfnr",
  "agreement",
  "zero_rate_classes",
  "temperature",
  "layer_cka",
  "layer_svcca",
  "svcca",
  "cka_debiased",
  "cev_ci",
  "sde_ci",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  from configs.default import get_config

  cfg = get_config()
  cfg.dense.epochs = 2
  cfg.finetune.epochs = 1
  cfg.pruning.methods = ("l1_filter", "global_magnitude")
  cfg.pruning.sparsities = (0.7,)
  cfg.pruning.control = False  # these tests count the pruned cells (the control has its own)
  workdir = tmp_path_factory.mktemp("run")
  old_umask = os.umask(0o022)  # the usual umask: files must come out 0644 (shared clusters)
  try:
    records = experiment.run(cfg, workdir)
  finally:
    os.umask(old_umask)
  return cfg, workdir, records


def test_outputs_written(finished_run):
  _, workdir, records = finished_run
  for name in (
    "results.jsonl",
    "results.md",
    "config.json",
    "dataset.json",
    "timings.json",
    "plots/bias_vs_sparsity.png",
    "plots/bias_vs_size.png",
    "plots/accuracy_vs_sparsity.png",
    "plots/cka_vs_cev.png",
    "plots/class_changes.png",
    "cells.jsonl",
    "correlations.jsonl",
    "plots/cie_grid.png",
    "plots/cka_layers.png",
    "plots/similarity_vs_bias.png",
  ):
    assert (workdir / name).is_file() and (workdir / name).stat().st_size > 0, name
  lines = (workdir / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(records) == 1 + 2 * 1 * 2  # dense + methods × sparsities × {CE, KD}
  assert not list(workdir.glob("**/*.tmp"))  # atomic writes leave no temporaries
  for path in workdir.rglob("*"):  # results and plots readable by colleagues (umask 022)
    if path.is_file() and "checkpoints" not in path.relative_to(workdir).parts:
      assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
  table = (workdir / "results.md").read_text()
  assert "| l1_filter | 0.7 |" in table and "CEV KD" in table
  assert (
    "## Compression Identified Exemplars" in table
    and "## Similarity to the dense model vs bias" in table
  )
  cells = [json.loads(l) for l in (workdir / "cells.jsonl").read_text().splitlines()]
  assert all("cie_fraction" in c and "significance" in c for c in cells)  # 1 dense model, 1 seed
  # Training curves: every stage of the run, KD terms only in KD stages, TensorBoard beside.
  steps = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  stages_logged = {r["stage"] for r in steps}
  assert "dense" in stages_logged and len(stages_logged) == 1 + 2 * 2  # dense + 2 cells × CE/KD
  train = [r for r in steps if "test_accuracy" not in r]
  assert all(("kd_loss" in r) == ("_kd" in r["stage"]) for r in train)
  assert all(r["learning_rate"] > 0 and 0 <= r["train_accuracy"] <= 1 for r in train)
  # One test accuracy per epoch and stage; the last one is the kept model's own accuracy.
  from prunebias_jax.load import load_run

  run = load_run(workdir)
  for record in records:
    stage = run.checkpoint_name(record)
    tested = [r for r in steps if r["stage"] == stage and "test_accuracy" in r]
    epochs = 2 if record["method"] == "dense" else 1
    assert [r["epoch"] for r in tested] == list(range(1, epochs + 1)), stage
    assert tested[-1]["test_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
  assert len(list((workdir / "tensorboard").glob("*/events.out.tfevents.*"))) == 5


def test_records_are_consistent(finished_run):
  _, workdir, records = finished_run
  parsed = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  assert parsed == records
  dense = parsed[0]
  assert dense["method"] == "dense" and dense["cev"] == 0.0 and dense["sde"] == 0.0
  assert dense["cka"] == pytest.approx(1.0, abs=1e-5) and dense["agreement"] == 1.0
  for r in parsed:
    assert RECORD_KEYS <= set(r)
    assert len(r["fpr"]) == len(r["dfnr"]) == 10
    assert "seconds" not in json.dumps(r)  # timings live in timings.json only
  pruned = parsed[1:]
  assert {(r["method"], r["kd"]) for r in pruned} == {
    (m, kd) for m in ("l1_filter", "global_magnitude") for kd in (False, True)
  }
  for r in pruned:
    assert (
      abs(r["realized_sparsity"] - r["target_sparsity"]) < 1e-6
    )  # nothing revived by fine-tuning
    assert r["cev"] >= 0 and r["sde"] >= 0 and 0 <= r["cka"] <= 1 + 1e-6
  ds = json.loads((workdir / "dataset.json").read_text())
  # Each pruned record's changes recomputed in NumPy from its own rates and the dense record's
  # (floor rule, Simon Says constants): a record built with the two models swapped, or against
  # the wrong reference, fails here.
  counts = np.array(ds["test_class_counts"], float)
  n = counts.sum()
  ref_fpr, ref_fnr = np.array(dense["fpr"]), np.array(dense["fnr"])
  den_fpr = np.where(ref_fpr > 0, ref_fpr, 1 / (n - counts))
  den_fnr = np.where(ref_fnr > 0, ref_fnr, 1 / counts)
  for r in pruned:
    fpr, fnr = np.array(r["fpr"]), np.array(r["fnr"])
    assert not np.array_equal(fpr, ref_fpr)  # a pruned model, not the reference again
    dfpr, dfnr = 100 * (fpr - ref_fpr) / den_fpr, 100 * (fnr - ref_fnr) / den_fnr
    # Records keep float32 rates to 6 decimals (each off by up to 5e-7): the numerator of a
    # change is off by up to 100·1e-6/den and the denominator by a factor 1 ± 5e-7/den, plus
    # float32 rounding (a swapped pair is off by 10-1000%).
    for got, want, den in ((r["dfpr"], dfpr, den_fpr), (r["dfnr"], dfnr, den_fnr)):
      tol = 100 * 1e-6 / den + np.abs(want) * (1e-6 / den + 1e-5) + 1e-4
      assert np.all(np.abs(np.array(got) - want) <= tol), (got, want)
    assert r["cev"] == pytest.approx(0.5 * (dfpr.var() + dfnr.var()), rel=1e-3)
    assert r["sde"] == pytest.approx(np.mean(np.abs(dfpr - dfnr)) / np.sqrt(2), rel=1e-3)
  assert sum(ds["test_class_counts"]) == dense["num_test_examples"]
  assert ds["finetune_train_class_counts"][3] < ds["teacher_train_class_counts"][3]


def test_rerun_skips_training_and_reproduces_results(finished_run, monkeypatch):
  cfg, workdir, _ = finished_run
  before = (workdir / "results.jsonl").read_bytes()

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage was retrained")

  monkeypatch.setattr(stages, "fit", no_training)
  experiment.run(cfg, workdir)
  assert (workdir / "results.jsonl").read_bytes() == before


def _tree_state(directory):
  return sorted(
    (str(p.relative_to(directory)), p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
    for p in directory.rglob("*")
  )


def test_models_trained_differently_are_refused_and_left_as_they_are(finished_run):
  """A different KD temperature: the KD students' checkpoints say they were trained at T=4,
  so the run stops before any work, naming the field, and changes nothing."""
  cfg, workdir, _ = finished_run
  before = _tree_state(workdir)
  other = cfg.copy_and_resolve_references()
  other.kd.temperature = 2.0
  with pytest.raises(
    CheckpointError,
    match=r"global_magnitude_s0.7_kd_seed0 was trained with a different config "
    r"\(kd.temperature: trained with 4.0, this run has 2.0\).*\(1 more checkpoint\(s\) differ\)",
  ):
    experiment.run(other, workdir)
  assert _tree_state(workdir) == before


@pytest.fixture(scope="module")
def gradual_two_seed_run(tmp_path_factory):
  from configs.default import get_config

  cfg = get_config()
  cfg.dense.epochs = 2
  cfg.finetune.epochs = 3
  cfg.pruning.methods = ("layer_magnitude",)
  cfg.pruning.sparsities = (0.8,)
  cfg.pruning.schedule = "gradual"
  cfg.pruning.frequency_epochs = 1
  cfg.pruning.end_fraction = 1.0  # span 2: prune at epochs 0 (10%), 1 (AGP), 2 (target)
  cfg.seeds = (0, 1)
  cfg.pruning.control = False
  workdir = tmp_path_factory.mktemp("gradual")
  records = experiment.run(cfg, workdir)
  cells = [json.loads(l) for l in (workdir / "cells.jsonl").read_text().splitlines()]
  return workdir, records, cells


def test_gradual_schedule_reaches_the_target_exactly(gradual_two_seed_run):
  _, records, _ = gradual_two_seed_run
  pruned = records[1:]
  assert len(pruned) == 4  # 2 seeds × {CE, KD}
  for r in pruned:
    assert r["target_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert r["realized_sparsity"] == pytest.approx(r["target_sparsity"], abs=1e-6)
    for frac in r["realized_sparsity_per_layer"].values():
      assert frac == pytest.approx(0.8, abs=0.01)


def test_cells_average_rates_over_seeds_before_the_change(gradual_two_seed_run):
  workdir, records, cells = gradual_two_seed_run
  dense = records[0]
  counts = np.array(json.loads((workdir / "dataset.json").read_text())["test_class_counts"], float)
  n = counts.sum()
  assert len(cells) == 2 and {c["kd"] for c in cells} == {False, True}
  for cell in cells:
    members = [r for r in records[1:] if r["kd"] == cell["kd"]]
    assert cell["seeds"] == [0, 1]
    # Independent NumPy: mean rates over seeds, floor rule in the denominator, Simon Says constants.
    ref_fpr, ref_fnr = np.array(dense["fpr"]), np.array(dense["fnr"])
    fpr = np.mean([r["fpr"] for r in members], axis=0)
    fnr = np.mean([r["fnr"] for r in members], axis=0)
    den_fpr = np.where(ref_fpr > 0, ref_fpr, 1 / (n - counts))
    den_fnr = np.where(ref_fnr > 0, ref_fnr, 1 / counts)
    dfpr, dfnr = 100 * (fpr - ref_fpr) / den_fpr, 100 * (fnr - ref_fnr) / den_fnr
    cev = 0.5 * (dfpr.var() + dfnr.var())
    sde = np.mean(np.abs(dfpr - dfnr)) / np.sqrt(2)
    assert cell["cev"] == pytest.approx(cev, rel=1e-3)
    assert cell["sde"] == pytest.approx(sde, rel=1e-3)
    assert cell["accuracy_seed_mean"] == pytest.approx(
      np.mean([r["accuracy"] for r in members]), abs=1e-6
    )
    assert cell["cev_seed_std"] == pytest.approx(
      np.std([r["cev"] for r in members], ddof=1), rel=1e-4, abs=1e-3
    )
  table = (workdir / "results.md").read_text()
  assert "±" in table and "seeds 0, 1" in table


def test_workdir_from_before_a_new_field_is_accepted(finished_run):
  """A config.json written before a field existed counts as that field's default."""
  cfg, workdir, _ = finished_run
  saved = json.loads((workdir / "config.json").read_text())
  try:
    trimmed = dict(saved)
    trimmed.pop("analysis")
    (workdir / "config.json").write_text(json.dumps(trimmed))
    assert workdir_lib.config_differences(workdir, resolve_config(cfg)) == []
    changed = resolve_config(cfg)
    changed.analysis.bootstrap_resamples = 7
    changed.seeds = (0, 5)  # a sweep axis: extends the run, not a difference
    differing = workdir_lib.config_differences(workdir, changed)
    assert differing == ["analysis.bootstrap_resamples"]
  finally:
    (workdir / "config.json").write_text(json.dumps(saved))


def test_the_control_cell_is_fine_tuned_unpruned(tmp_path):
  from configs.default import get_config

  cfg = get_config()
  cfg.dense.epochs = 1
  cfg.finetune.epochs = 1
  cfg.pruning.methods = ("random",)
  cfg.pruning.sparsities = (0.5,)
  cfg.pruning.control = True
  cfg.analysis.svcca_conv = True  # this small run also checks the per-position SVCCA switch
  cfg.analysis.svcca_conv_size = 3
  records = experiment.run(cfg, tmp_path / "w")
  assert [(r["method"], r["sparsity"], r["kd"]) for r in records] == [
    ("dense", 0.0, False),
    ("none", 0.0, False),
    ("none", 0.0, True),
    ("random", 0.5, False),
    ("random", 0.5, True),
  ]
  for r in records[1:3]:
    assert r["realized_sparsity"] == 0.0 and r["target_sparsity"] == 0.0
    assert r["accuracy"] != records[0]["accuracy"] or r["cka"] < 1.0  # it was fine-tuned
  rows = [
    json.loads(line) for line in (tmp_path / "w" / "correlations.jsonl").read_text().splitlines()
  ]
  assert rows == []  # only the 2 compressed models count, fewer than the 3 a row needs
  assert (tmp_path / "w" / "checkpoints" / "none_s0_ce_seed0").is_dir()
  # Per-position SVCCA of both stage outputs (small_cnn: 8×8 and 4×4 maps pooled to 3×3).
  assert records[0]["layer_svcca_conv"] == {
    "stage1": pytest.approx(0.0, abs=1e-4),
    "stage2": pytest.approx(0.0, abs=1e-4),
  }  # the teacher itself
  for r in records[1:]:
    assert set(r["layer_svcca_conv"]) == {"stage1", "stage2"}
    assert all(0.0 < v <= 1.0 for v in r["layer_svcca_conv"].values())
  text = (tmp_path / "w" / "results.md").read_text()
  assert "## Per-position SVCCA of the stage outputs" in text and "3 × 3" in text


def test_cells_carry_seed_intervals_and_paired_tests(gradual_two_seed_run):
  """Recomputed from the run's own per-model records with SciPy."""
  from scipy import stats

  _, records, cells = gradual_two_seed_run
  key = lambda r: (r["method"], r["sparsity"], r["kd"], r["temperature"])
  for cell in cells:
    members = [r for r in records if key(r) == key(cell)]
    assert len(members) == 2
    for field in ("accuracy", "cev", "sde"):
      values = np.array([r[field] for r in members])
      low, high = stats.t.interval(0.95, 1, values.mean(), values.std(ddof=1) / np.sqrt(2))
      assert cell[f"{field}_seed_ci"] == pytest.approx([low, high], rel=1e-4, abs=1e-5)
    assert cell["significance"]["computed"] is False  # one dense model
    if cell["kd"]:
      ce = {
        r["seed"]: r for r in records if key(r) == (cell["method"], cell["sparsity"], False, None)
      }
      d = np.array([ce[r["seed"]]["cev"] - r["cev"] for r in members])
      paired = cell["paired_vs_ce"]
      assert paired["n_pairs"] == 2 and paired["cev_diff"] == pytest.approx(d.mean(), rel=1e-5)
      assert paired["sign_test_p"] == pytest.approx(
        stats.binomtest(int((d > 0).sum()), int((d != 0).sum())).pvalue
      )
      vs_ce = cell["significance_vs_ce"]
      assert vs_ce["computed"] and vs_ce["paired"] and vs_ce["against"] == "ce"
      assert vs_ce["min_attainable_p"] == pytest.approx(0.5, abs=1e-6)  # 2 pairs: 2 / 2²
      assert vs_ce["statistic"] == "normalized_recall"


def test_an_audit_of_the_runs_predictions_reproduces_its_records(finished_run):
  from prunebias_jax.audit import PREDICTION_FIELDS, audit

  cfg, workdir, records = finished_run
  with np.load(workdir / "predictions.npz") as z:
    saved = {k: z[k] for k in z.keys()}
  assert saved["predictions"].shape == (len(records), len(saved["labels"]))
  np.testing.assert_array_equal(saved["predictions"], saved["logits"].argmax(-1))
  names = {i: f"model{i}" for i in range(1, len(records))}  # results.jsonl line i ↔ row i
  report = audit(
    saved["labels"],
    saved["logits"][0],
    {names[i]: saved["logits"][i] for i in names},
    class_names=saved["class_names"].tolist(),
    config=resolve_config(cfg),
    seeds={names[i]: [records[i]["seed"]] for i in names},
  )
  pairs = [(report.reference[0], records[0])] + list(zip(report.records, records[1:]))
  compared = 0
  for audited, run in pairs:
    for field in PREDICTION_FIELDS:
      if field in run:
        assert audited[field] == run[field], field
        compared += 1
  assert compared >= len(pairs) * 13  # the bias fields and the intervals of every model


def test_load_run_gives_every_model_back_with_the_runs_predictions(finished_run):
  from prunebias_jax.data import load_dataset
  from prunebias_jax.load import load_run

  cfg, workdir, records = finished_run
  run = load_run(workdir)
  assert run.records == records and run.config.model == cfg.model
  assert len(run.model_names()) == len(records)  # one checkpoint per record, none partial
  images = load_dataset(resolve_config(cfg).data).test.images
  with np.load(workdir / "predictions.npz") as z:
    logits, predictions = z["logits"], z["predictions"]
  for i, record in enumerate(records):
    model = run.model(record)
    assert (model.masks is None) == (record["method"] == "dense")
    got = model.apply(images)
    np.testing.assert_allclose(got, logits[i], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), predictions[i])
  with pytest.raises(CheckpointError, match="has no model 'nope'; its models: dense"):
    run.model("nope")
