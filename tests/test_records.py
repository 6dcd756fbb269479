"""The per-model, per-cell and per-run records on hand-built outputs."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from prunebias_jax import records
from prunebias_jax.config import base_config
from prunebias_jax.report import correlation_table


def outputs(preds, rng, n_classes):
  logits = rng.normal(size=(len(preds), n_classes)).astype(np.float32)
  logits[np.arange(len(preds)), preds] += 5
  feats = rng.normal(size=(len(preds), 6)).astype(np.float32)
  return records.Outputs(
    np.asarray(preds, np.int32), logits, {"features": feats, "stage1": feats[:, :3] ** 2}
  )


def test_similarity_by_layer_identity_and_difference():
  rng = np.random.default_rng(0)
  preds = rng.integers(0, 4, 200)
  ref = outputs(preds, rng, 4)
  same = records.similarity_by_layer(ref, ref, svcca_examples=150)
  assert set(same["layer_cka"]) == {"features", "stage1", "logits"}
  assert all(v == pytest.approx(1.0, abs=1e-5) for v in same["layer_cka"].values())
  assert all(v == pytest.approx(0.0, abs=1e-4) for v in same["layer_svcca"].values())
  other = records.similarity_by_layer(ref, outputs(preds, rng, 4), svcca_examples=150)
  assert other["layer_cka"]["features"] < 0.3 and other["svcca"] >= 0


def test_binary_fairness_matches_fairlearn():
  rng = np.random.default_rng(1)
  y, p, g = rng.integers(0, 2, 300), rng.integers(0, 2, 300), rng.integers(0, 3, 300)
  fair = records.fairness(y, g, p, num_classes=2, num_groups=3)
  assert fair["dpd"] == pytest.approx(
    demographic_parity_difference(y, p, sensitive_features=g), abs=1e-5
  )
  assert fair["eod"] == pytest.approx(
    equalized_odds_difference(y, p, sensitive_features=g), abs=1e-5
  )
  assert fair["eod_mean"] == pytest.approx(
    equalized_odds_difference(y, p, sensitive_features=g, agg="mean"), abs=1e-5
  )
  multi = records.fairness(
    rng.integers(0, 5, 300), g, rng.integers(0, 5, 300), num_classes=5, num_groups=3
  )
  assert {"dpd", "eod", "dpd_classmean", "eod_classmean"} <= set(multi)
  assert multi["dpd_classmean"] <= multi["dpd"]


def test_bootstrap_intervals_bracket_a_plausible_range():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 5, 400)
  ref = np.where(rng.random(400) < 0.8, y, rng.integers(0, 5, 400))
  pred = np.where(rng.random(400) < 0.6, y, rng.integers(0, 5, 400))
  cfg = base_config()
  cfg.analysis.bootstrap_resamples = 64
  out = records.bootstrap_intervals(
    y, ref, pred, rng.integers(0, 2, 400), 5, 2, cfg.analysis, cfg.metrics, seed=0
  )
  for name in ("cev_ci", "sde_ci", "dpd_ci", "eod_ci"):
    lo, hi = out[name]
    assert lo is not None and hi is not None and lo <= hi, name
  cfg.analysis.bootstrap_resamples = 0
  assert (
    records.bootstrap_intervals(y, ref, pred, None, 5, 0, cfg.analysis, cfg.metrics, seed=0) == {}
  )


def test_cell_analysis_cie_and_significance():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(4), 50)
  dense = [labels.copy() for _ in range(3)]
  pruned = [labels.copy() for _ in range(3)]
  for p in pruned:
    p[labels == 2] = 3  # class 2 is forgotten by every pruned model
    flip = rng.random(200) < 0.05
    p[flip] = rng.integers(0, 4, flip.sum())
  cfg = ml_collections.ConfigDict(dict(fdr_q=0.05, permutations=500))
  out, order = records.cell_analysis(labels, dense, pruned, 4, cfg, seed=0)
  assert out["num_cie"] >= 50 and out["cie_per_class"][2] == 50
  assert out["dense_accuracy_on_cie"] == pytest.approx(1.0)
  assert out["pruned_accuracy_on_cie"] < 0.2
  assert 2 in out["significant_classes_welch"]
  assert len(order) == out["num_cie"]
  single, _ = records.cell_analysis(labels, dense[:1], pruned[:1], 4, cfg, seed=0)
  assert "significance" in single and "not computed" in single["significance"]


def test_correlations_on_monotone_records():
  models = [
    {
      "method": "m",
      "cka": 1 - 0.1 * i,
      "cka_debiased": 1 - 0.1 * i,
      "agreement": 1 - 0.05 * i,
      "svcca": 0.1 * i,
      "cev": float(i**2),
      "sde": float(i),
    }
    for i in range(8)
  ]
  cfg = base_config().analysis
  cfg.correlation_resamples = 100
  rows = records.correlations(models, cfg, seed=0)
  by = {(r["similarity"], r["bias"]): r for r in rows}
  assert by[("cka", "sde")]["pearson"][0] == pytest.approx(-1.0, abs=1e-5)
  assert by[("svcca", "cev")]["spearman"][0] == pytest.approx(1.0, abs=1e-5)
  assert "| cka | cev | 8 |" in correlation_table(rows)
