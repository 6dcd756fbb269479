"""The per-model, per-cell and per-run records on hand-built outputs."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import ml_collections
import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from prunebias_jax import metrics, records
from prunebias_jax.config import base_config
from prunebias_jax.report import correlation_table


@dataclasses.dataclass
class Evaluated(records.Outputs):
  """Outputs with the features an evaluation pass would have seen (kept here for the tests'
  references; the run keeps only the sums)."""

  layers: dict = dataclasses.field(default_factory=dict)


def outputs(preds, rng, n_classes):
  logits = rng.normal(size=(len(preds), n_classes)).astype(np.float32)
  logits[np.arange(len(preds)), preds] += 5
  feats = rng.normal(size=(len(preds), 6)).astype(np.float32)
  layers = {"features": feats, "stage1": feats[:, :3] ** 2}
  return Evaluated(np.asarray(preds, np.int32), logits, layers=layers)


def compared(ref, model, index=None):
  """`model` with its similarity sums against `ref` accumulated over its layers and logits,
  as the evaluation pass gives them (records.similarity_of); SVCCA's subset `index`."""
  index = np.arange(len(model.predictions)) if index is None else index
  with_logits = lambda o: {**o.layers, "logits": o.logits}
  sim, cka = records.similarity_of(with_logits(ref), with_logits(model), index)
  return dataclasses.replace(model, similarity=sim, layer_cka=cka)


def by_layer(ref, model, index, rule="anatome"):
  return records.similarity_by_layer(ref, compared(ref, model, index), index, rule)


def test_similarity_by_layer_identity_and_difference():
  rng = np.random.default_rng(0)
  preds = rng.integers(0, 4, 200)
  ref = outputs(preds, rng, 4)
  index = np.arange(150)
  same = by_layer(ref, ref, index)
  assert set(same["layer_cka"]) == {"features", "stage1", "logits"}
  assert all(v == pytest.approx(1.0, abs=1e-5) for v in same["layer_cka"].values())
  assert all(v == pytest.approx(0.0, abs=1e-4) for v in same["layer_svcca"].values())
  model = outputs(preds, rng, 4)
  other = by_layer(ref, model, index)
  layers = {"logits": (ref.logits, model.logits)} | {
    k: (v, model.layers[k]) for k, v in ref.layers.items()
  }
  # CKA of every test example (NumPy closed form); SVCCA of the `index` examples only, the
  # logits' SVCCA being the record's headline 'svcca'.
  assert other["layer_cka"] == {
    k: pytest.approx(_numpy_linear_cka(x, y), abs=2e-6) for k, (x, y) in layers.items()
  }
  want_svcca = {  # the default rule, 'anatome'
    k: float(metrics.svcca_distance(x[index], y[index], anatome_compat=True))
    for k, (x, y) in layers.items()
  }
  assert other["layer_svcca"] == {k: pytest.approx(v, abs=2e-6) for k, v in want_svcca.items()}
  assert other["svcca"] == other["layer_svcca"]["logits"]
  everything = float(metrics.svcca_distance(ref.logits, model.logits, anatome_compat=True))
  assert abs(everything - want_svcca["logits"]) > 1e-3  # so the subset is what was checked


def _numpy_linear_cka(x, y):
  x = np.asarray(x, np.float64) - np.mean(x, 0)
  y = np.asarray(y, np.float64) - np.mean(y, 0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


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
  ym, pm_ = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
  multi = records.fairness(ym, g, pm_, num_classes=5, num_groups=3)
  # one-vs-rest per class with fairlearn, then max and mean over the 5 classes
  per_class = {
    "dpd": [
      demographic_parity_difference(ym == c, pm_ == c, sensitive_features=g) for c in range(5)
    ],
    "eod": [equalized_odds_difference(ym == c, pm_ == c, sensitive_features=g) for c in range(5)],
    "eod_mean": [
      equalized_odds_difference(ym == c, pm_ == c, sensitive_features=g, agg="mean")
      for c in range(5)
    ],
  }
  want = {k: np.max(v) for k, v in per_class.items()}
  want |= {f"{k}_classmean": np.mean(v) for k, v in per_class.items()}
  assert multi == {k: pytest.approx(v, abs=2e-6) for k, v in want.items()}


def test_bootstrap_intervals_are_the_percentiles_of_each_statistic_on_its_resamples():
  """Each interval is recomputed here from its own resamples (`bootstrap_indices` with the key
  the record derives: fold_in(key(seed), 0/1) for CEV/SDE, 10/11 for DPD/EOD), the statistic
  of each resample taken one at a time (fairlearn for DPD/EOD), then NumPy's percentiles: a
  swapped key, array, statistic or interval rule in the record's wiring changes the numbers."""
  rng = np.random.default_rng(2)
  n, R = 400, 64
  y = rng.integers(0, 2, n)
  ref = np.where(rng.random(n) < 0.8, y, 1 - y)
  pred = np.where(rng.random(n) < 0.6, y, 1 - y)
  g = rng.integers(0, 2, n)
  cfg = base_config()
  cfg.analysis.bootstrap_resamples = R
  cfg.analysis.bootstrap_interval = "percentile"
  cfg.analysis.confidence = 0.9
  out = records.bootstrap_intervals(y, ref, pred, g, 2, 2, cfg.analysis, cfg.metrics, seed=7)
  assert set(out) == {"cev_ci", "sde_ci", "dpd_ci", "eod_ci"}
  key = jax.random.key(7)
  kw = dict(num_classes=2, zero_rate=cfg.metrics.zero_rate, convention=cfg.metrics.convention)
  per_resample = {
    "cev_ci": (0, lambda i: metrics.combined_error_variance(y[i], ref[i], pred[i], **kw)),
    "sde_ci": (1, lambda i: metrics.symmetric_distance_error(y[i], ref[i], pred[i], **kw)),
    "dpd_ci": (10, lambda i: demographic_parity_difference(y[i], pred[i], sensitive_features=g[i])),
    "eod_ci": (11, lambda i: equalized_odds_difference(y[i], pred[i], sensitive_features=g[i])),
  }
  for name, (fold, statistic) in per_resample.items():
    idx = np.asarray(metrics.bootstrap_indices(jax.random.fold_in(key, fold), n, R))
    values = np.array([float(statistic(i)) for i in idx])
    # records hold 6 decimals
    want = np.percentile(values, [5, 95])
    np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert out[name][0] < out[name][1], name  # 64 distinct resamples: a real spread
  cfg.analysis.bootstrap_resamples = 0
  assert (
    records.bootstrap_intervals(y, ref, pred, None, 2, 0, cfg.analysis, cfg.metrics, seed=0) == {}
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
  cfg = base_config().analysis
  cfg.permutations = 500
  cfg.classwise_statistic = "accuracy"
  out, order = records.cell_analysis(labels, dense, pruned, 4, cfg, seed=0)
  # CIE by hand: no label is modal in both populations (dense: every model predicts the label)
  votes = np.stack([np.bincount(col, minlength=4) for col in np.stack(pruned).T])
  modal = votes == votes.max(1, keepdims=True)
  cie = ~modal[np.arange(200), labels]
  assert out["num_cie"] == cie.sum() and out["num_cie"] >= 50
  assert out["cie_per_class"] == np.bincount(labels[cie], minlength=4).tolist()
  assert out["cie_per_class"][2] == 50
  assert out["dense_accuracy_on_cie"] == pytest.approx(1.0)
  assert out["pruned_accuracy_on_cie"] < 0.2
  sig = out["significance"]
  assert sig["computed"] and sig["statistic"] == "accuracy" and sig["against"] == "dense"
  assert 2 in sig["significant_classes_welch"]
  # 3 vs 3 models: C(6, 3) = 20 splits, all enumerated; the smallest two-sided p is 2/20.
  assert sig["exact"] and sig["min_attainable_p"] == pytest.approx(0.1)
  assert sig["can_reject"] is False and sig["significant_classes_permutation"] == []
  assert len(order) == out["num_cie"]
  single, _ = records.cell_analysis(labels, dense[:1], pruned[:1], 4, cfg, seed=0)
  assert single["significance"]["computed"] is False
  assert "needs >= 2 models" in single["significance"]["reason"]


def test_a_uniform_accuracy_drop_is_not_a_disproportionate_change():
  """Every class loses 30% of its examples in every pruned model: raw per-class accuracy
  calls every class changed, normalised recall (recall − overall accuracy) none."""
  rng = np.random.default_rng(8)
  C, per = 4, 200
  labels = np.repeat(np.arange(C), per)

  def model(flip_rate):
    p = labels.copy()
    for c in range(C):
      idx = np.flatnonzero(labels == c)
      drop = rng.choice(idx, int(round(flip_rate * per)), replace=False)
      p[drop] = (c + 1) % C
    return p

  dense = [model(0.02 + 0.01 * k) for k in range(4)]
  pruned = [model(0.30 + 0.01 * k) for k in range(4)]
  cfg = base_config().analysis
  cfg.permutations = 100  # C(8, 4) = 70 splits fit: the test is exact
  raw = records.significance(
    labels, np.stack(dense), np.stack(pruned), C, _with(cfg, "accuracy"), 0, against="dense"
  )
  norm = records.significance(labels, np.stack(dense), np.stack(pruned), C, cfg, 0, against="dense")
  assert raw["significant_classes_welch"] == [0, 1, 2, 3]
  assert norm["statistic"] == "normalized_recall" and norm["significant_classes_welch"] == []
  assert norm["exact"] and norm["min_attainable_p"] == pytest.approx(2 / 70, abs=1e-6)


def _with(cfg, statistic):
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.classwise_statistic = statistic
  return cfg


def test_paired_ce_minus_kd_against_scipy():
  from scipy import stats

  ce = [
    {"seed": s, "cev": v, "sde": w, "accuracy": 0.5}
    for s, v, w in ((0, 10.0, 1.0), (1, 20.0, 2.0), (2, 30.0, 3.0), (3, 40.0, 5.0))
  ]
  kd = [
    {"seed": s, "cev": v, "sde": w, "accuracy": 0.6}
    for s, v, w in ((3, 30.0, 4.0), (0, 5.0, 0.5), (1, 25.0, 1.0), (2, 10.0, 1.5))
  ]  # other order
  out = records.paired_vs_ce(ce, kd)
  d = np.array([40 - 30, 10 - 5, 20 - 25, 30 - 10.0])  # CE − KD, paired by seed
  assert out["n_pairs"] == 4 and out["cev_diff"] == pytest.approx(d.mean())
  assert out["sign_test_p"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)
  assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue)
  assert out["accuracy_diff"] == pytest.approx(-0.1)
  assert out["sde_diff"] == pytest.approx(np.mean([1.0, 0.5, 1.0, 1.5]))


def _models_over_sparsities(rng):
  """Four cells (2 methods × CE/KD) per sparsity × 3 seeds; CEV rises with sparsity and
  falls with CKA within a sparsity, with noise."""
  rows = []
  for s, method, kd in itertools.product((0.5, 0.7, 0.9), ("m", "n"), (False, True)):
    for seed in range(3):
      cka = 1 - s + 0.05 * rng.normal()
      rows.append(
        {
          "method": method,
          "sparsity": s,
          "kd": kd,
          "temperature": 4.0 if kd else None,
          "seed": seed,
          "cka": cka,
          "cka_debiased": cka,
          "agreement": 1 - s,
          "svcca": s,
          "accuracy": 1 - s + 0.01 * rng.normal(),
          "cev": 100 * s - 50 * cka + rng.normal(),
          "sde": s + rng.normal(),
        }
      )
  return rows


def test_correlations_scopes_levels_and_resampling():
  from scipy import stats

  rng = np.random.default_rng(4)
  models = _models_over_sparsities(rng)
  cells = []
  for key in dict.fromkeys((r["method"], r["sparsity"], r["kd"], r["temperature"]) for r in models):
    ms = [r for r in models if (r["method"], r["sparsity"], r["kd"], r["temperature"]) == key]
    cells.append(
      {
        **dict(zip(("method", "sparsity", "kd", "temperature"), key)),
        "cev": float(np.mean([r["cev"] for r in ms])) + 1.0,  # a population value
        "sde": 0.0,
        "cka_seed_mean": float(np.mean([r["cka"] for r in ms])),
        "accuracy_seed_mean": float(np.mean([r["accuracy"] for r in ms])),
      }
    )
  cfg = base_config().analysis
  cfg.correlation_resamples = 200
  rows = records.correlations(models, cells, cfg, seed=0)
  find = lambda **kw: [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
  x = np.array([r["cka"] for r in models])
  y = np.array([r["cev"] for r in models])
  (naive,) = find(similarity="cka", bias="cev", level="model", scope="pooled", resampled="models")
  (clustered,) = find(
    similarity="cka", bias="cev", level="model", scope="pooled", resampled="cells"
  )
  assert naive["pearson"][0] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-5)
  assert clustered["pearson"][0] == naive["pearson"][0]  # same points, other intervals
  assert clustered["n"] == 36
  for s in (0.5, 0.7, 0.9):
    (within,) = find(
      similarity="cka", bias="cev", level="model", scope="within_sparsity", sparsity=s
    )
    sel = np.array([r["sparsity"] == s for r in models])
    assert within["pearson"][0] == pytest.approx(stats.pearsonr(x[sel], y[sel])[0], abs=1e-5)
  (partial,) = find(similarity="cka", bias="cev", level="model", scope="partial_accuracy")
  z = np.array([r["accuracy"] for r in models])
  rxy, rxz, ryz = stats.pearsonr(x, y)[0], stats.pearsonr(x, z)[0], stats.pearsonr(y, z)[0]
  expected = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
  assert partial["pearson"][0] == pytest.approx(expected, abs=1e-4)
  (cell_level,) = find(similarity="cka", bias="cev", level="cell", scope="pooled")
  cx = [c["cka_seed_mean"] for c in cells]
  cy = [c["cev"] for c in cells]
  assert cell_level["n"] == 12
  assert cell_level["pearson"][0] == pytest.approx(stats.pearsonr(cx, cy)[0], abs=1e-5)
  assert "| cka | cev | cell | pooled | cells | 12 |" in correlation_table(rows)
  # The control cell and the dense models never enter.
  extra = [{**models[0], "method": "none", "cev": 1e9}, {**models[0], "method": "dense"}]
  again = records.correlations(models + extra, cells, cfg, seed=0)
  assert again == rows


def _class_sorted(n_per_class: int, num_classes: int, rng):
  """A test split stored class by class (as an image folder lists it)."""
  labels = np.repeat(np.arange(num_classes), n_per_class)
  return labels, outputs(labels, rng, num_classes)


def test_svcca_sees_every_class_in_proportion_on_a_class_sorted_split():
  rng = np.random.default_rng(5)
  labels, teacher = _class_sorted(100, 10, rng)
  # Unbalanced too: class 9 has half the examples of the others.
  keep = np.concatenate([np.arange(950), np.arange(950, 1000)[:0]])
  labels, teacher = (
    labels[keep],
    Evaluated(
      teacher.predictions[keep],
      teacher.logits[keep],
      layers={k: v[keep] for k, v in teacher.layers.items()},
    ),
  )
  ref = records.reference(labels, None, 10, teacher, svcca_examples=190, seed=3)
  counts = np.bincount(labels[ref.svcca_index], minlength=10)
  assert counts.sum() == 190
  assert counts.tolist() == [20] * 9 + [10]  # 190 · n_c / 950, exactly
  assert len(set(ref.svcca_index.tolist())) == 190
  # Seeded: the same seed picks the same examples, another seed others.
  again = records.reference(labels, None, 10, teacher, svcca_examples=190, seed=3)
  other = records.reference(labels, None, 10, teacher, svcca_examples=190, seed=4)
  np.testing.assert_array_equal(ref.svcca_index, again.svcca_index)
  assert not np.array_equal(ref.svcca_index, other.svcca_index)
  # 0, or more than the split holds: every example.
  assert len(records.reference(labels, None, 10, teacher, svcca_examples=0).svcca_index) == 950
  assert len(records.reference(labels, None, 10, teacher, 5000).svcca_index) == 950


def test_model_record_reports_exclude_beside_floor_and_flags_the_floor():
  """A hand-built case: every class of 3 has a zero teacher FPR or FNR, so all hit the
  zero-rate rule (more than a third: the floor decides CEV) and `exclude` keeps none."""
  labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
  teacher_pred = np.array([0, 0, 1, 1, 2, 2, 0, 1])  # class 2 errs twice (FNR 0.5)
  student_pred = np.array([0, 1, 1, 1, 2, 0, 0, 1])
  rng = np.random.default_rng(0)
  teacher, student = outputs(teacher_pred, rng, 3), outputs(student_pred, rng, 3)
  cfg = base_config()
  cfg.analysis.bootstrap_resamples = 0
  cfg.analysis.svcca_examples = 0
  ref = records.reference(labels, None, 3, teacher)
  rec = records.model_record(ref, compared(teacher, student), 0, cfg)
  assert rec["zero_rate_classes"] == 3 and rec["floor_decides"] is True
  # Independent NumPy: rates per class, exclude drops every class with a zero reference FPR
  # or FNR. Teacher FPR = (1/6, 1/6, 0), FNR = (0, 0, 1/2): every class has a zero rate,
  # so nothing is left and the exclude values are undefined (None).
  assert rec["cev_exclude"] is None and rec["sde_exclude"] is None
  assert rec["cev"] is not None and rec["cev"] > 0
  cfg.metrics.zero_rate = "exclude"
  same = records.model_record(ref, compared(teacher, student), 0, cfg)
  assert same["cev"] == same["cev_exclude"] is None


def test_records_from_the_passes_counts_equal_records_from_predictions():
  """The evaluation pass's confusion counts give the same accuracy, rates and CEV/SDE as the
  predictions (an audit's path); counts of other predictions would not."""
  rng = np.random.default_rng(12)
  C, n = 4, 300
  labels = rng.integers(0, C, n)
  ref_pred = np.where(rng.random(n) < 0.75, labels, rng.integers(0, C, n))
  pred = np.where(rng.random(n) < 0.6, labels, rng.integers(0, C, n))
  cfg = base_config()
  cfg.analysis.bootstrap_resamples = 0
  counts = lambda p: np.asarray(metrics.confusion_matrix(labels, p, C)).astype(np.int32)
  teacher = outputs(ref_pred, rng, C)
  plain = records.reference(labels, None, C, teacher)
  counted = records.reference(
    labels, None, C, dataclasses.replace(teacher, confusion=counts(ref_pred))
  )
  student = compared(teacher, outputs(pred, rng, C))
  want = records.model_record(plain, student, 0, cfg)
  got = records.model_record(counted, dataclasses.replace(student, confusion=counts(pred)), 0, cfg)
  assert got == want
  other = np.where(rng.random(n) < 0.5, labels, pred)
  wrong = records.model_record(
    counted, dataclasses.replace(student, confusion=counts(other)), 0, cfg
  )
  assert wrong["cev"] != want["cev"] and wrong["accuracy"] != want["accuracy"]


def _numpy_exclude(labels, ref_pred, pred, C):
  """CEV/SDE (simon_says) over the classes whose reference FPR and FNR are both non-zero."""

  def rates(p):
    fpr, fnr = np.zeros(C), np.zeros(C)
    for c in range(C):
      pos, neg = labels == c, labels != c
      fnr[c] = np.mean(p[pos] != c)
      fpr[c] = np.mean(p[neg] == c)
    return fpr, fnr

  (rf, rn), (f, n) = rates(ref_pred), rates(pred)
  keep = (rf > 0) & (rn > 0)
  dfpr, dfnr = 100 * (f - rf)[keep] / rf[keep], 100 * (n - rn)[keep] / rn[keep]
  return (
    0.5 * (dfpr.var() + dfnr.var()),
    np.mean(np.abs(dfpr - dfnr)) / np.sqrt(2),
    int((~keep).sum()),
  )


def test_exclude_values_equal_a_numpy_reference():
  rng = np.random.default_rng(11)
  C, n = 5, 500
  labels = rng.integers(0, C, n)
  ref_pred = np.where(rng.random(n) < 0.7, labels, rng.integers(0, C, n))
  ref_pred[labels == 0] = 0  # the teacher never misses class 0: a zero FNR
  pred = np.where(rng.random(n) < 0.6, labels, rng.integers(0, C, n))
  cfg = base_config()
  cfg.analysis.bootstrap_resamples = 0
  cfg.analysis.svcca_examples = 0
  ref = records.reference(labels, None, C, outputs(ref_pred, rng, C))
  rec = records.model_record(ref, compared(ref.outputs, outputs(pred, rng, C)), 0, cfg)
  cev, sde, dropped = _numpy_exclude(labels, ref_pred, pred, C)
  assert dropped == rec["zero_rate_classes"] == 1 and rec["floor_decides"] is False
  assert rec["cev_exclude"] == pytest.approx(cev, rel=1e-4)
  assert rec["sde_exclude"] == pytest.approx(sde, rel=1e-4)
  assert rec["cev"] != rec["cev_exclude"]  # the floored class counts under 'floor'


def test_svcca_rule_selects_the_anatome_rule_by_default():
  rng = np.random.default_rng(9)
  preds = rng.integers(0, 5, 300)
  ref, other = outputs(preds, rng, 5), outputs(preds, rng, 5)
  index = np.arange(0, 300, 2)
  got = {
    rule: by_layer(ref, other, index, rule)["layer_svcca"]["features"]
    for rule in ("anatome", "centered")
  }
  for rule, compat in (("anatome", True), ("centered", False)):
    x, y = ref.layers["features"][index], other.layers["features"][index]
    expected = float(metrics.svcca_distance(x, y, anatome_compat=compat))
    assert got[rule] == pytest.approx(expected, abs=1e-6)
  assert got["anatome"] != got["centered"]
  assert base_config().analysis.svcca_rule == "anatome"


def test_the_maps_pass_pools_each_stage_output():
  """make_eval_fn(map_size=3) on 8×8 and 4×4 stage maps: each equals the model's sown output
  averaged over the adaptive bins by hand; the features pass is unchanged by the option."""
  import jax

  from prunebias_jax.models import get_model
  from prunebias_jax.train.steps import make_eval_fn

  model = get_model("small_cnn", num_classes=10)
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(2, 3, 8, 8, 1), dtype=np.uint8)  # 2 batches of 3
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  _, pooled = make_eval_fn(model, mean=(0.5,), std=(0.25,), map_size=3)(variables, None, images)
  _, features = make_eval_fn(model, mean=(0.5,), std=(0.25,))(variables, None, images)
  assert set(pooled) == {"stage1", "stage2"}  # the 2-D penultimate features have no map
  assert set(features) == {"stage1", "stage2", "features"}
  x = (images.reshape(6, 8, 8, 1).astype(np.float32) / 255 - 0.5) / 0.25
  _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  bins = {8: [(0, 3), (2, 6), (5, 8)], 4: [(0, 2), (1, 3), (2, 4)]}
  for name in ("stage1", "stage2"):
    raw = np.asarray(state["intermediates"][name][0])
    b = bins[raw.shape[1]]
    want = np.stack(
      [np.stack([raw[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in b], 1) for r0, r1 in b], 1
    )
    np.testing.assert_allclose(np.asarray(pooled[name]), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
      np.asarray(features[name]), raw.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5
    )


def test_conv_svcca_is_computed_from_the_maps_of_both_models():
  rng = np.random.default_rng(6)
  preds = rng.integers(0, 4, 120)
  ref, other = outputs(preds, rng, 4), outputs(preds, rng, 4)
  maps = rng.normal(size=(120, 2, 2, 5)).astype(np.float32)
  related = np.tanh(maps @ rng.normal(size=(5, 5))) + 0.3 * rng.normal(size=maps.shape)
  ref.maps, other.maps = {"stage1": maps}, {"stage1": related.astype(np.float32)}
  index = np.arange(120)
  got = by_layer(ref, other, index, "anatome")["layer_svcca_conv"]
  want = metrics.svcca_conv_distance(maps, related, anatome_compat=True)
  assert got == {"stage1": pytest.approx(float(want), abs=1e-6)} and got["stage1"] > 0.05
  centered = by_layer(ref, other, index, "centered")["layer_svcca_conv"]
  assert centered["stage1"] == pytest.approx(
    float(metrics.svcca_conv_distance(maps, related)), abs=1e-6
  )
  same = by_layer(ref, ref, index, "anatome")["layer_svcca_conv"]
  assert same["stage1"] == pytest.approx(0.0, abs=1e-5)
  assert "layer_svcca_conv" not in by_layer(ref, ref.without_maps(), index)
  with pytest.raises(ValueError, match="maps of"):  # maps of other examples than the subset
    records.reference(preds, None, 4, ref, svcca_examples=60)


def test_debiased_cka_of_fewer_than_4_examples_is_undefined_not_a_crash():
  rng = np.random.default_rng(7)
  ref = outputs(np.array([0, 1, 2]), rng, 3)
  other = outputs(np.array([0, 1, 1]), rng, 3)
  sim = by_layer(ref, other, np.arange(3))
  assert sim["cka_debiased"] is None
  assert "cka_debiased" in records.undefined_metrics(sim)
  four = by_layer(
    outputs(np.arange(4) % 3, rng, 3), outputs(np.arange(4) % 3, rng, 3), np.arange(4)
  )
  assert isinstance(four["cka_debiased"], float)


@pytest.mark.parametrize(
  "training,skipped,never",
  [
    (None, None, None),
    ({"steps": 12, "nonfinite_steps": 0, "resumed_at_step": 0}, None, None),
    ({"steps": 12, "nonfinite_steps": 5, "resumed_at_step": 0}, 5, False),
    ({"steps": 12, "nonfinite_steps": 12, "resumed_at_step": 0}, 12, True),
    # Resumed at step 4: only the 8 steps after it were counted, so the first 4 may have
    # applied updates; never called untrained.
    ({"steps": 12, "nonfinite_steps": 8, "resumed_at_step": 4}, 8, False),
  ],
)
def test_the_record_says_how_many_training_steps_were_skipped(training, skipped, never):
  rng = np.random.default_rng(8)
  labels = rng.integers(0, 3, 60)
  ref = records.reference(labels, None, 3, outputs(labels, rng, 3))
  params = {"Conv_0": {"kernel": np.ones((3, 3, 1, 2), np.float32)}}
  identity = {"method": "random", "sparsity": 0.5, "kd": False, "temperature": None, "seed": 0}
  model = compared(ref.outputs, outputs(labels, rng, 3))
  r = records.full_record(ref, model, identity, base_config(), {"params": params}, None, training)
  assert r.get("nonfinite_steps") == skipped and r.get("every_step_skipped") == never


def test_layers_are_shown_in_network_depth_order():
  names = ["logits", "stage10", "features", "stage2", "stage1", "extra"]
  assert sorted(names, key=records.depth_order) == [
    "extra",
    "stage1",
    "stage2",
    "stage10",
    "features",
    "logits",
  ]


def test_the_showcase_cell_is_the_chosen_one_or_the_one_with_most_cies():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 50)
  ref = records.reference(labels, None, 3, outputs(labels, rng, 3))
  cells, outs, cie = [], {}, {}
  for method, sparsity, distill, num_cie in (
    ("a", 0.5, "ce", 9),
    ("a", 0.5, "kd", 2),
    ("b", 0.9, "kd", 4),
    ("a", 0.5, "sp+kd", 3),
  ):
    kd = distill != "ce"
    key = (method, sparsity, kd, 4.0 if kd else None, distill)
    fields = ("method", "sparsity", "kd", "temperature", "distill")
    cells.append(dict(zip(fields, key), num_cie=num_cie))
    outs[key] = [compared(ref.outputs, outputs(rng.integers(0, 3, 50), rng, 3))]
    cie[key] = np.arange(num_cie)
  assert records.showcase(ref, cells, cie, outs).cell["num_cie"] == 9
  chosen = records.showcase(ref, cells, cie, outs, "b,0.90,kd")
  assert chosen.cell["method"] == "b" and len(chosen.cie_indices) == 4
  assert chosen.layer_names == ["stage1", "features", "logits"]  # depth order
  # The heatmap's matrix, from the sums of the concatenated layers, against the in-memory
  # cka_matrix of the features themselves.
  member = outs[("b", 0.9, True, 4.0, "kd")][0]
  layer = lambda o, name: o.logits if name == "logits" else o.layers[name]
  want = metrics.cka_matrix(
    [layer(ref.outputs, n) for n in chosen.layer_names],
    [layer(member, n) for n in chosen.layer_names],
  )
  np.testing.assert_allclose(chosen.layer_cka, np.asarray(want), atol=2e-6)
  assert chosen.layer_cka.shape == (3, 3) and abs(chosen.layer_cka[0, 1] - want[0, 1]) < 2e-6
  assert records.showcase(ref, cells, cie, outs, "a,0.5,kd").cell["num_cie"] == 2
  assert records.showcase(ref, cells, cie, outs, "a,0.5,sp+kd").cell["num_cie"] == 3
