"""The audit of predictions from anywhere (prunebias_jax.audit): the same numbers as the
metrics, any input form (predictions, logits, populations, string labels), and one-line
refusals of bad input. (The audit of a finished run's own predictions.npz is checked against
that run's records in test_experiment.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fairlearn.metrics as flm
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax import metrics as pm
from prunebias_jax.audit import AuditError, audit
from prunebias_jax.config import base_config

ROOT = Path(__file__).resolve().parents[1]
C, N = 4, 400


def _case(seed: int = 0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, C, N)
  ref = np.where(rng.random(N) < 0.9, y, rng.integers(0, C, N))
  comp = np.where(rng.random((3, N)) < 0.7, y, rng.integers(0, C, (3, N)))
  groups = rng.integers(0, 2, N)
  return y, ref, comp, groups


def _config(resamples: int = 0):
  cfg = base_config()
  cfg.analysis.bootstrap_resamples = resamples
  return cfg


def test_records_equal_the_metrics_on_the_same_predictions():
  y, ref, comp, g = _case()
  report = audit(y, ref, {"pruned": comp[0]}, groups=g, config=_config())
  (r,) = report.records
  change = pm.relative_rate_change(jnp.asarray(y), jnp.asarray(ref), jnp.asarray(comp[0]), C)
  args = (change.dfpr, change.dfnr, change.valid)
  assert r["cev"] == pytest.approx(float(pm.cev_from_changes(*args)), rel=1e-6)
  assert r["sde"] == pytest.approx(float(pm.sde_from_changes(*args)), rel=1e-6)
  assert r["accuracy"] == pytest.approx(np.mean(comp[0] == y), abs=1e-6)
  assert r["dpd"] is not None and r["eod"] is not None  # binary values: the next test
  assert report.reference[0]["cev"] == 0.0 and report.reference[0]["agreement"] == 1.0
  assert report.group_names == ("0", "1")


def test_binary_dpd_and_eod_equal_fairlearn_with_string_groups():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, N)
  ref = np.where(rng.random(N) < 0.9, y, 1 - y)
  comp = np.where(rng.random(N) < 0.7, y, 1 - y)
  race = rng.choice(["asian", "black", "white"], N)
  (r,) = audit(y, ref, comp, groups=race, config=_config()).records
  assert r["dpd"] == pytest.approx(
    flm.demographic_parity_difference(y, comp, sensitive_features=race), abs=1e-6
  )
  assert r["eod"] == pytest.approx(
    flm.equalized_odds_difference(y, comp, sensitive_features=race), abs=1e-6
  )


def test_logits_strings_and_populations_give_the_same_records_as_predictions():
  y, ref, comp, _ = _case(2)
  rng = np.random.default_rng(0)
  onehot = lambda p: np.eye(C, dtype=np.float32)[p] * 3 + rng.normal(0, 0.1, p.shape + (C,))
  names = ("cat", "dog", "emu", "fox")
  by_preds = audit(y, ref, {"p": comp}, config=_config(20))
  by_logits = audit(
    np.array(names)[y],
    onehot(ref).astype(np.float32),
    {"p": onehot(comp).astype(np.float32)},
    class_names=names,
    config=_config(20),
  )
  assert by_preds.records == by_logits.records
  assert by_logits.class_names == names
  # A population's CEV/SDE come from its models' averaged rates (as a run's cells).
  (cell,) = by_preds.cells
  change = pm.relative_rate_change(jnp.asarray(y), jnp.asarray(ref), jnp.asarray(comp), C)
  cev = float(pm.cev_from_changes(change.dfpr, change.dfnr, change.valid))
  assert cell["cev"] == pytest.approx(cev, rel=1e-6)
  assert cell["num_pruned_models"] == 3 and [r["seed"] for r in by_preds.records] == [0, 1, 2]
  assert 0 <= cell["cie_fraction"] <= 1
  table = by_preds.table()
  assert list(table.index) == ["p"] and table.loc["p", "cev"] == cell["cev"]


def test_features_add_linear_and_debiased_cka_against_the_reference():
  y, ref, comp, _ = _case(4)
  rng = np.random.default_rng(5)
  f_ref = rng.normal(size=(N, 8)).astype(np.float32)
  f_comp = np.stack([f_ref @ rng.normal(size=(8, 8)), rng.normal(size=(N, 8))]).astype(np.float32)
  report = audit(
    y, ref, {"p": comp[:2]}, config=_config(), features={"reference": f_ref, "p": f_comp}
  )
  for r, f in zip(report.records, f_comp):
    assert r["cka"] == pytest.approx(
      float(pm.linear_cka(jnp.asarray(f_ref), jnp.asarray(f))), abs=1e-6
    )
    assert r["cka_debiased"] == pytest.approx(
      float(pm.debiased_linear_cka(jnp.asarray(f_ref), jnp.asarray(f))), abs=1e-6
    )
  assert report.records[0]["cka"] > 0.5 > report.records[1]["cka"]
  with pytest.raises(AuditError, match=r"features of 'p': shape \(3, 400, 8\)"):
    audit(
      y,
      ref,
      {"p": comp[:2]},
      config=_config(),
      features={"reference": f_ref, "p": f_comp[[0, 1, 1]]},
    )
  with pytest.raises(AuditError, match=r"need the reference's features"):
    audit(y, ref, {"p": comp[:2]}, config=_config(), features={"p": f_comp})


BAD = [
  (
    "length",
    lambda y, r, c: (y[:-1], r, c, {}),
    r"predictions of shape \(400,\); expected \(399,\)",
  ),
  (
    "label range",
    lambda y, r, c: (np.where(y == 3, 7, y), r, c, {"class_names": list("abcd")}),
    r"label 7 is out of range for the 4 classes",
  ),
  ("negative label", lambda y, r, c: (y - 1, r, c, {}), r"labels must be >= 0; found -1"),
  (
    "prediction range",
    lambda y, r, c: (y, r, np.where(c == 0, 9, c), {"class_names": list("abcd")}),
    r"compressed 'compressed': prediction 9 is out of range for 4 classes",
  ),
  (
    "nan logits",
    lambda y, r, c: (y, np.where(np.eye(C)[r] > 0, np.nan, 0.0), c, {}),
    r"reference: 400 logits are NaN or infinite",
  ),
  (
    "strings without classes",
    lambda y, r, c: (np.array(list("abcd"))[y], r, c, {}),
    r"labels are strings but no class list was given",
  ),
  (
    "unknown string label",
    lambda y, r, c: (np.array(list("abcz"))[y], r, c, {"class_names": list("abcd")}),
    r"labels \['z'\] are not in the class list",
  ),
  (
    "logit width",
    lambda y, r, c: (y, np.zeros((N, 5), np.float32), c, {"class_names": list("abcd")}),
    r"reference: logits of shape \(400, 5\); expected \(400, 4\)",
  ),
  ("groups length", lambda y, r, c: (y, r, c, {"groups": np.zeros(3)}), r"groups must be one"),
  ("one group", lambda y, r, c: (y, r, c, {"groups": np.zeros(N, int)}), r"1 group\(s\) present"),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(case, make, message):
  y, ref, comp, _ = _case()
  labels, reference, compressed, kw = make(y, ref, comp[0])
  with pytest.raises(AuditError, match=message) as e:
    audit(labels, reference, compressed, config=_config(), **kw)
  assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_cli_writes_the_report_and_refuses_bad_files_in_one_line(tmp_path):
  y, ref, comp, g = _case(3)
  np.save(tmp_path / "y.npy", y)
  np.save(tmp_path / "dense.npy", ref)
  np.save(tmp_path / "pruned.npy", comp)
  np.savez(tmp_path / "int8.npz", logits=np.eye(C, dtype=np.float32)[comp[0]], other=y)
  np.save(tmp_path / "g.npy", g)
  cmd = [sys.executable, "-m", "prunebias_jax.audit", "--labels", str(tmp_path / "y.npy")]
  cmd += ["--reference", str(tmp_path / "dense.npy"), "--groups", str(tmp_path / "g.npy")]
  cmd += ["--class_names", "a,b,c,d", "--bootstrap_resamples", "10"]
  good = cmd + ["--compressed", str(tmp_path / "pruned.npy"), f"{tmp_path / 'int8.npz'}:logits"]
  features = np.random.default_rng(0).normal(size=(N, 5)).astype(np.float32)
  np.save(tmp_path / "f_ref.npy", features)
  np.save(tmp_path / "f_pruned.npy", np.stack([features] * 3))
  np.save(tmp_path / "f_int8.npy", features[:, ::-1].copy())
  good += ["--reference_features", str(tmp_path / "f_ref.npy"), "--compressed_features"]
  good += [str(tmp_path / "f_pruned.npy"), str(tmp_path / "f_int8.npy")]
  proc = subprocess.run(
    good + ["--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = tmp_path / "out"
  records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert [(r["method"], r["model"]) for r in records] == [
    ("reference", 0),
    ("pruned", 0),
    ("pruned", 1),
    ("pruned", 2),
    ("int8", 0),
  ]
  api = audit(
    y,
    ref,
    {"pruned": comp, "int8": comp[0]},
    groups=g,
    class_names=list("abcd"),
    config=_config(10),
  )
  assert [r.pop("cka") for r in records[1:]] == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-5)
  assert all(r.pop("cka_debiased") is not None for r in records[1:])
  assert records[1:] == json.loads(json.dumps(api.records))
  assert len((out / "cells.jsonl").read_text().splitlines()) == 2
  assert "| pruned | 3 |" in (out / "results.md").read_text()
  assert (out / "plots" / "class_changes.png").stat().st_size > 0

  bad = subprocess.run(
    cmd + ["--compressed", str(tmp_path / "int8.npz"), "--out", str(tmp_path / "bad")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  lines = [l for l in bad.stderr.splitlines() if l.strip()]
  assert bad.returncode == 2 and len(lines) == 1, bad.stderr
  assert "holds 2 arrays (logits, other); name one as FILE.npz:KEY" in lines[0]
  assert not (tmp_path / "bad").exists()
