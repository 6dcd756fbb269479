"""The decision rules of scripts/evidence_analysis.py on records built by hand, where the
outcome of every rule is known in advance (planted)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location(
  "evidence_analysis", ROOT / "scripts/evidence_analysis.py"
)
ev = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ev)

SEEDS = (0, 1, 2)
SPARSITIES = (0.0, 0.5, 0.8)
ACC = {0.0: 0.80, 0.5: 0.70, 0.8: 0.50}
CKA = {0.0: 0.99, 0.5: 0.90, 0.8: 0.70}


def student(sparsity: float, distill: str, seed: int, *, kd_factor: float) -> dict:
  """log CEV = 4 + 3·[s = 0.8] + 2·[s = 0.5] + log(kd_factor)·[KD] + 0.1·seed, accuracy
  varying by seed (so the regression of rule b2 is not collinear)."""
  kd = distill == "kd"
  log_cev = 4 + 3 * (sparsity == 0.8) + 2 * (sparsity == 0.5) + 0.1 * seed
  log_cev += math.log(kd_factor) * kd * (sparsity > 0)
  acc = ACC[sparsity] + 0.01 * seed - 0.005 * kd
  return {
    "method": "none" if sparsity == 0 else "l1_filter",
    "sparsity": sparsity,
    "distill": distill,
    "seed": seed,
    "accuracy": acc,
    "cev": math.exp(log_cev),
    "sde": 10 * math.exp(log_cev / 2),
    # Less similar, more biased, with a seed-to-seed part that follows CEV within a sparsity.
    "cka": CKA[sparsity] - 0.01 * log_cev,
    "svcca": 1 - CKA[sparsity] + 0.01 * log_cev,
    "zero_rate_classes": 0,
    "dfnr": [0.0] * 10,
    "num_test_examples": 10_000,
  }


def run_of(kd_factor: float) -> dict:
  students = {
    (sp, d, s): student(sp, d, s, kd_factor=kd_factor)
    for sp in SPARSITIES
    for d in ("ce", "kd")
    for s in SEEDS
  }
  return {"students": students}


@pytest.fixture(autouse=True)
def seeds(monkeypatch):
  monkeypatch.setattr(ev, "SEEDS", SEEDS)


def test_rule_a_holds_and_fails_where_planted():
  runs = {"imbalanced": run_of(0.5), "balanced": run_of(0.8)}
  a = ev.rule_a(runs)
  assert a["holds"] and len(a["comparisons"]) == 24 and not a["failed"]
  # Control spread (seeds 0..2: log CEV 4.0..4.2) larger than one seed's rise: that one fails.
  runs["balanced"]["students"][(0.8, "kd", 1)]["cev"] = math.exp(4.1) + 0.5 * (
    math.exp(4.2) - math.exp(4.0)
  )
  a = ev.rule_a(runs)
  assert not a["holds"]
  assert [(r["setting"], r["distill"], r["metric"], r["seed"]) for r in a["failed"]] == [
    ("balanced", "kd", "cev", 1)
  ]


def test_kd_effect_recovers_the_planted_coefficient_exactly():
  # log CEV is exactly linear in the regressors but for the accuracy term (0 here): the KD
  # coefficient is log(kd_factor), and the seed term is absorbed by accuracy (0.01 per seed).
  run = run_of(0.5)
  for r in run["students"].values():
    r["cev"] = math.exp(
      4 + 3 * (r["sparsity"] == 0.8) + math.log(0.5) * (r["distill"] == "kd") + 10 * r["accuracy"]
    )
  e = ev.kd_effect(run, "cev")
  assert e["n"] == 12 and e["dof"] == 8
  np.testing.assert_allclose(e["coefficient"], math.log(0.5), atol=1e-9)
  np.testing.assert_allclose(e["ci"], [math.log(0.5)] * 2, atol=1e-6)


def test_rule_b_counts_pairs_and_compares_the_gaps():
  runs = {"imbalanced": run_of(0.5), "balanced": run_of(0.8)}
  b = ev.rule_b(runs)
  imb, bal = b["cev"]["settings"]["imbalanced"], b["cev"]["settings"]["balanced"]
  assert imb["kd_lower_pairs"] == 6 and bal["kd_lower_pairs"] == 6 and imb["pairs"] == 6
  np.testing.assert_allclose(imb["log_ratio_gap"], -math.log(0.5))
  np.testing.assert_allclose(bal["log_ratio_gap"], -math.log(0.8))
  assert b["cev"]["b3"] and b["holds"]
  # Swap the settings: the balanced gap is now the larger one, so b3 and (b) fail.
  b = ev.rule_b({"imbalanced": run_of(0.8), "balanced": run_of(0.5)})
  assert not b["cev"]["b3"] and not b["holds"]
  # Two of six pairs where KD is worse: b1 fails in that setting (4 < 5).
  runs = {"imbalanced": run_of(0.5), "balanced": run_of(0.8)}
  for s in (0, 1):
    runs["imbalanced"]["students"][(0.5, "kd", s)]["cev"] *= 10
  b = ev.rule_b(runs)
  assert b["cev"]["settings"]["imbalanced"]["kd_lower_pairs"] == 4
  assert not b["cev"]["settings"]["imbalanced"]["b1"] and not b["holds"]


def test_rule_b2_fails_when_kd_raises_the_accuracy_adjusted_bias():
  # KD doubles CEV in the imbalanced setting: b1 (no pair lower) and b2 (coefficient about
  # log 2 > 0) fail there, while the balanced setting keeps both.
  runs = {"imbalanced": run_of(2.0), "balanced": run_of(0.5)}
  b = ev.rule_b(runs)
  imb, bal = b["cev"]["settings"]["imbalanced"], b["cev"]["settings"]["balanced"]
  assert imb["accuracy_adjusted_kd_effect"]["coefficient"] > 0.5 and not imb["b2"]
  assert bal["accuracy_adjusted_kd_effect"]["coefficient"] < -0.5 and bal["b2"]
  assert not b["holds"]
  # b2 alone: KD lower in every pair, but only because it is more accurate. KD gains 0.05
  # accuracy (CEV falls by e^-0.5 per 0.05) and carries a factor 1.2 of its own, so each pair
  # has KD/CE = 1.2·e^-0.5 ≈ 0.73 while the adjusted KD effect is log 1.2 > 0.
  runs = {"imbalanced": run_of(0.5), "balanced": run_of(0.5)}
  for r in runs["imbalanced"]["students"].values():
    kd = r["distill"] == "kd"
    r["accuracy"] = ACC[r["sparsity"]] + 0.01 * r["seed"] + 0.05 * kd
    r["cev"] = math.exp(4 + 3 * (r["sparsity"] == 0.8) - 10 * r["accuracy"] + math.log(1.2) * kd)
  imb = ev.rule_b(runs)["cev"]["settings"]["imbalanced"]
  assert imb["kd_lower_pairs"] == 6 and imb["b1"]
  np.testing.assert_allclose(imb["accuracy_adjusted_kd_effect"]["coefficient"], math.log(1.2))
  assert not imb["b2"]


def test_rule_c_wants_the_expected_sign_with_the_interval_off_zero():
  runs = {"imbalanced": run_of(0.5), "balanced": run_of(0.8)}
  c = ev.rule_c(runs)
  assert len(c["estimates"]) == 12
  within = [r for r in c["estimates"] if r["scope"].startswith("within")]
  # CKA falls and SVCCA distance rises exactly with log CEV inside a sparsity: rank ±1.
  for r in within:
    assert r["spearman"] == pytest.approx(r["expected_sign"], abs=1e-6)
    assert r["holds"]
  # The wrong sign: CKA rising with CEV fails every CKA estimate.
  for run in runs.values():
    for r in run["students"].values():
      r["cka"] = CKA[r["sparsity"]] + 0.01 * math.log(r["cev"])
  c = ev.rule_c(runs)
  cka = [r for r in c["estimates"] if r["similarity"] == "linear CKA"]
  assert not c["holds"] and not any(r["holds"] for r in cka if r["scope"].startswith("within"))


def test_cli_writes_the_decisions_from_the_two_workdirs(tmp_path, capsys):
  for setting, factor in (("imbalanced", 0.5), ("balanced", 0.8)):
    d = tmp_path / setting
    d.mkdir()
    students = list(run_of(factor)["students"].values())
    dense = {**students[0], "method": "dense", "accuracy": 0.85, "seed": 0}
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [dense, *students]))
    cells = []
    for sp in SPARSITIES:
      for dist in ("ce", "kd"):
        m = [r for r in students if r["sparsity"] == sp and r["distill"] == dist]
        cell = {"method": m[0]["method"], "sparsity": sp, "distill": dist}
        for f in ("accuracy", "cev", "sde", "cka", "svcca"):
          cell[f"{f}_seed_mean"] = float(np.mean([r[f] for r in m]))
          cell[f"{f}_seed_ci"] = [0.0, 1.0]
        cell["cev"], cell["sde"] = cell["cev_seed_mean"], cell["sde_seed_mean"]
        cells.append(cell)
    (d / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
    counts = [1000] * 10 if setting == "balanced" else [1000, 1000, 100, 200, 500] + [1000] * 5
    (d / "dataset.json").write_text(
      json.dumps(
        {"class_names": [f"c{k}" for k in range(10)], "finetune_train_class_counts": counts}
      )
    )
    (d / "timings.json").write_text(json.dumps({"total": 60.0}))
  ev.main(
    [str(tmp_path), "--markdown", str(tmp_path / "ev.md"), "--json", str(tmp_path / "ev.json")]
    + ["--plot", str(tmp_path / "ev.png")]
  )
  assert (tmp_path / "ev.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = (tmp_path / "ev.md").read_text()
  assert "- **(a)** **holds**: 24 of 24 comparisons hold." in text
  assert "| c2 | c3 | c4 |" in text  # the reduced classes, found from the fine-tuning counts
  decisions = json.loads((tmp_path / "ev.json").read_text())
  assert decisions["b"]["holds"] is True and decisions["a"]["holds"] is True


def test_rule_c_fails_a_right_sign_whose_interval_reaches_zero():
  # Within sparsity: CKA falls by seed (so across seeds it falls as CEV rises) but, inside each
  # seed, the KD student (lower CEV) also has the lower CKA. Over all 6 students Spearman is
  # -0.2, the expected sign; a bootstrap resample of one seed drawn 3 times sees only its own
  # two students, at rank +1, so the interval reaches past zero and the estimate must fail.
  runs = {"imbalanced": run_of(0.5), "balanced": run_of(0.8)}
  for run in runs.values():
    for r in run["students"].values():
      r["cka"] = CKA[r["sparsity"]] - 0.1 * r["seed"] - 0.001 * (r["distill"] == "kd")
  c = ev.rule_c(runs)
  within = [
    r for r in c["estimates"] if r["similarity"] == "linear CKA" and r["scope"].startswith("within")
  ]
  assert len(within) == 4
  for r in within:
    assert r["spearman"] == pytest.approx(-0.2, abs=1e-6)
    assert r["ci"][1] > 0 and not r["holds"]
  assert not c["holds"]
