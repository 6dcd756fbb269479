"""Tests for prunebias_jax.metrics.confusion and prunebias_jax.metrics.bias.

References are written independently here in plain NumPy (np.add.at, loops
over classes) and scikit-learn, following docs/metrics.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import mean_squared_error

from prunebias_jax.metrics import (
  BiasChange,
  ClassRates,
  cev_from_changes,
  combined_error_variance,
  confusion_matrix,
  per_class_rates,
  rate_denominators,
  relative_rate_change,
  relative_rate_change_from_confusion,
  sde_from_changes,
  symmetric_distance_error,
)

# --------------------------------------------------------------------------
# Independent NumPy references
# --------------------------------------------------------------------------


def np_confusion(labels, preds, C, w=None):
  m = np.zeros((C, C), np.float64)
  np.add.at(m, (np.asarray(labels), np.asarray(preds)), 1.0 if w is None else np.asarray(w, float))
  return m


def np_rates(labels, preds, C, w=None):
  m = np_confusion(labels, preds, C, w)
  n = m.sum()
  fpr = np.zeros(C)
  fnr = np.zeros(C)
  for c in range(C):
    tp = m[c, c]
    fp = m[:, c].sum() - tp
    fn = m[c, :].sum() - tp
    tn = n - tp - fp - fn
    fpr[c] = fp / (fp + tn) if fp + tn > 0 else 0.0
    fnr[c] = fn / (fn + tp) if fn + tp > 0 else 0.0
  return fpr, fnr


def np_mean_rates(labels, preds, C, w=None):
  preds = np.asarray(preds)
  if preds.ndim == 1:
    preds = preds[None]
  rs = [np_rates(labels, p, C, w) for p in preds]
  return np.mean([r[0] for r in rs], axis=0), np.mean([r[1] for r in rs], axis=0)


def np_relative_change(labels, ref, preds, C, zero_rate="floor", convention="simon_says", w=None):
  labels = np.asarray(labels)
  ref_fpr, ref_fnr = np_mean_rates(labels, ref, C, w)
  cmp_fpr, cmp_fnr = np_mean_rates(labels, preds, C, w)
  weights = np.ones(len(labels)) if w is None else np.asarray(w, float)
  scale = 100.0 if convention == "simon_says" else 1.0
  dfpr, dfnr, valid = np.zeros(C), np.zeros(C), np.zeros(C, bool)
  hits = 0
  for c in range(C):
    pos = weights[labels == c].sum()
    neg = weights.sum() - pos
    if pos == 0 or neg == 0:
      continue
    rf, rn = ref_fpr[c], ref_fnr[c]
    den_f, den_n = rf, rn  # the floor applies to the denominator only
    if rf == 0 or rn == 0:
      hits += 1
      if zero_rate == "exclude":
        continue
      if rf == 0:
        den_f = 1.0 / neg
      if rn == 0:
        den_n = 1.0 / pos
    valid[c] = True
    dfpr[c] = scale * (cmp_fpr[c] - rf) / den_f
    dfnr[c] = scale * (cmp_fnr[c] - rn) / den_n
  return dfpr, dfnr, valid, hits


def np_cev(dfpr, dfnr, valid, convention="simon_says"):
  pts = np.stack([dfpr[valid], dfnr[valid]], axis=1)
  if convention == "simon_says":
    # The Simon Says code: sklearn MSE against the centroid, two output columns averaged.
    return mean_squared_error(pts, np.tile(pts.mean(axis=0), (len(pts), 1)))
  return np.var(pts[:, 0]) + np.var(pts[:, 1])


def np_sde(dfpr, dfnr, valid, convention="simon_says"):
  total = 0.0
  count = 0
  for c in range(len(dfpr)):
    if valid[c]:
      total += abs(dfpr[c] - dfnr[c])
      count += 1
  factor = 1 / math.sqrt(2) if convention == "simon_says" else 1.0
  return factor * total / count


def random_case(seed, n=500, C=10, K=None, acc=0.7):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, size=n)

  def model():
    correct = rng.random(n) < acc
    return np.where(correct, labels, rng.integers(0, C, size=n))

  if K is None:
    return labels, model(), model()
  return labels, model(), np.stack([model() for _ in range(K)])


# --------------------------------------------------------------------------
# Hand-computed cases (docs/metrics.md)
# --------------------------------------------------------------------------


def metrics_md_tiny_case():
  """C=2, 10 examples per class.  Reference FPR=(.1,.2), FNR=(.2,.1); compared all 0.2."""
  labels = np.array([0] * 10 + [1] * 10)
  ref = labels.copy()
  ref[:2] = 1  # two class-0 examples -> 1: FNR_0 = .2, FPR_1 = .2
  ref[10] = 0  # one class-1 example -> 0: FNR_1 = .1, FPR_0 = .1
  cmp = labels.copy()
  cmp[:2] = 1
  cmp[10:12] = 0
  return labels, ref, cmp


def test_cev_sde_from_changes_metrics_md():
  dfpr = jnp.array([100.0, 0.0])
  dfnr = jnp.array([0.0, 100.0])
  assert float(cev_from_changes(dfpr, dfnr)) == pytest.approx(2500.0)
  assert float(sde_from_changes(dfpr, dfnr)) == pytest.approx(100 / math.sqrt(2), rel=1e-6)
  assert float(sde_from_changes(dfpr, dfnr)) == pytest.approx(70.71, abs=5e-3)
  # nas2022 constants: no 1/2, no 1/sqrt(2) (applied to the same numbers).
  assert float(cev_from_changes(dfpr, dfnr, None, "nas2022")) == pytest.approx(5000.0)
  assert float(sde_from_changes(dfpr, dfnr, None, "nas2022")) == pytest.approx(100.0)
  # the valid mask drops classes (and ignores whatever is stored there).
  dfpr3 = jnp.array([100.0, 0.0, jnp.nan])
  dfnr3 = jnp.array([0.0, 100.0, 7.0])
  valid = jnp.array([True, True, False])
  assert float(cev_from_changes(dfpr3, dfnr3, valid)) == pytest.approx(2500.0)
  assert float(sde_from_changes(dfpr3, dfnr3, valid)) == pytest.approx(70.7106781, rel=1e-6)


def test_metrics_md_tiny_case_from_predictions():
  labels, ref, cmp = metrics_md_tiny_case()
  r = per_class_rates(labels, ref, 2)
  np.testing.assert_allclose(r.fpr, [0.1, 0.2], rtol=1e-6)
  np.testing.assert_allclose(r.fnr, [0.2, 0.1], rtol=1e-6)
  c = per_class_rates(labels, cmp, 2)
  np.testing.assert_allclose(c.fpr, [0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose(c.fnr, [0.2, 0.2], rtol=1e-6)

  ch = relative_rate_change(labels, ref, cmp, 2)
  assert isinstance(ch, BiasChange)
  np.testing.assert_allclose(ch.dfpr, [100.0, 0.0], atol=1e-4)
  np.testing.assert_allclose(ch.dfnr, [0.0, 100.0], atol=1e-4)
  assert ch.valid.tolist() == [True, True]
  assert int(ch.num_zero_rate_classes) == 0
  assert float(combined_error_variance(labels, ref, cmp, 2)) == pytest.approx(2500.0, rel=1e-5)
  assert float(symmetric_distance_error(labels, ref, cmp, 2)) == pytest.approx(70.7107, rel=1e-5)
  # nas2022: fractions, no 1/2 and no 1/sqrt(2): dFPR=(1,0), dFNR=(0,1)
  kw = dict(convention="nas2022")
  ch = relative_rate_change(labels, ref, cmp, 2, **kw)
  np.testing.assert_allclose(ch.dfpr, [1.0, 0.0], atol=1e-6)
  assert float(combined_error_variance(labels, ref, cmp, 2, **kw)) == pytest.approx(0.5, rel=1e-5)
  assert float(symmetric_distance_error(labels, ref, cmp, 2, **kw)) == pytest.approx(1.0, rel=1e-5)


def zero_fpr_case():
  """C=3; the reference never predicts class 2 wrongly (FPR_2 = 0, FNR_2 = 1/3).

  labels: 0 x4, 1 x4, 2 x3 (n = 11).
  reference: class0 -> [0,0,0,1], class1 -> [1,1,1,0], class2 -> [2,2,0]
    FPR = (2/7, 1/7, 0), FNR = (1/4, 1/4, 1/3)
  compared:  class0 -> [0,0,2,1], class1 -> [1,1,2,0], class2 -> [2,2,0]
    FPR = (2/7, 1/7, 2/8), FNR = (1/2, 1/2, 1/3)
  floor: the denominator of dFPR_2 becomes 1/(FP_2+TN_2) = 1/8, the numerator
    stays 2/8 - 0, so dFPR = (0, 0, 200), dFNR = (100, 100, 0)
    CEV = 1/2 (Var(0,0,200) + Var(100,100,0)) = 1/2 (80000/9 + 20000/9) = 50000/9,
    SDE = mean(100, 100, 200)/sqrt(2) = (400/3)/sqrt(2)
  exclude: class 2 dropped: dFPR = (0, 0), dFNR = (100, 100): CEV = 0, SDE = 100/sqrt(2)
  """
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
  ref = np.array([0, 0, 0, 1, 1, 1, 1, 0, 2, 2, 0])
  cmp = np.array([0, 0, 2, 1, 1, 1, 2, 0, 2, 2, 0])
  return labels, ref, cmp


def test_zero_reference_fpr_floor_and_exclude():
  labels, ref, cmp = zero_fpr_case()
  r = per_class_rates(labels, ref, 3)
  np.testing.assert_allclose(r.fpr, [2 / 7, 1 / 7, 0.0], rtol=1e-6)
  np.testing.assert_allclose(r.fnr, [1 / 4, 1 / 4, 1 / 3], rtol=1e-6)
  neg, pos = rate_denominators(labels, 3)
  np.testing.assert_allclose(neg, [7, 7, 8])
  np.testing.assert_allclose(pos, [4, 4, 3])

  floor = relative_rate_change(labels, ref, cmp, 3, zero_rate="floor")
  np.testing.assert_allclose(floor.dfpr, [0, 0, 200], atol=1e-4)
  np.testing.assert_allclose(floor.dfnr, [100, 100, 0], atol=1e-4)
  assert floor.valid.tolist() == [True, True, True]
  assert int(floor.num_zero_rate_classes) == 1
  assert float(combined_error_variance(labels, ref, cmp, 3)) == pytest.approx(50000 / 9, rel=1e-5)
  assert float(symmetric_distance_error(labels, ref, cmp, 3)) == pytest.approx(
    (400 / 3) / math.sqrt(2), rel=1e-5
  )
  # A model identical to the reference shows no change under the floor rule.
  same = relative_rate_change(labels, ref, ref, 3, zero_rate="floor")
  np.testing.assert_allclose(same.dfpr, 0, atol=1e-6)
  np.testing.assert_allclose(same.dfnr, 0, atol=1e-6)

  excl = relative_rate_change(labels, ref, cmp, 3, zero_rate="exclude")
  assert excl.valid.tolist() == [True, True, False]
  assert int(excl.num_zero_rate_classes) == 1
  assert np.all(np.isfinite(excl.dfpr)) and np.all(np.isfinite(excl.dfnr))
  np.testing.assert_allclose(excl.dfpr[:2], [0, 0], atol=1e-4)
  np.testing.assert_allclose(excl.dfnr[:2], [100, 100], atol=1e-4)
  assert float(combined_error_variance(labels, ref, cmp, 3, zero_rate="exclude")) == pytest.approx(
    0.0, abs=1e-6
  )
  assert float(symmetric_distance_error(labels, ref, cmp, 3, zero_rate="exclude")) == pytest.approx(
    100 / math.sqrt(2), rel=1e-5
  )

  # nas2022 with floor: dFPR = (0,0,2), dFNR = (1,1,0): CEV = 8/9 + 2/9, SDE = mean(1,1,2)
  kw = dict(convention="nas2022")
  assert float(combined_error_variance(labels, ref, cmp, 3, **kw)) == pytest.approx(
    10 / 9, rel=1e-5
  )
  assert float(symmetric_distance_error(labels, ref, cmp, 3, **kw)) == pytest.approx(
    4 / 3, rel=1e-5
  )

  # and the NumPy reference agrees on both rules
  for rule in ("floor", "exclude"):
    d1, d2, v, hits = np_relative_change(labels, ref, cmp, 3, zero_rate=rule)
    ch = relative_rate_change(labels, ref, cmp, 3, zero_rate=rule)
    np.testing.assert_allclose(ch.dfpr, d1, atol=1e-4)
    np.testing.assert_allclose(ch.dfnr, d2, atol=1e-4)
    assert ch.valid.tolist() == v.tolist()
    assert int(ch.num_zero_rate_classes) == hits


# --------------------------------------------------------------------------
# Random cases vs NumPy / scikit-learn
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_vs_sklearn(seed):
  labels, ref, cmp = random_case(seed)
  C = 10
  got = confusion_matrix(labels, cmp, C)
  assert got.shape == (C, C) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), sk_confusion_matrix(labels, cmp, labels=range(C)))
  w = np.random.default_rng(seed).integers(0, 2, size=len(labels))
  np.testing.assert_array_equal(
    np.asarray(confusion_matrix(labels, cmp, C, weights=w)),
    sk_confusion_matrix(labels, cmp, labels=range(C), sample_weight=w),
  )
  # population: leading axis
  pop = np.stack([ref, cmp])
  got2 = confusion_matrix(labels, pop, C)
  assert got2.shape == (2, C, C)
  np.testing.assert_array_equal(np.asarray(got2[0]), np_confusion(labels, ref, C))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("convention", ["simon_says", "nas2022"])
def test_random_single_model_vs_numpy(seed, convention):
  C = 10
  labels, ref, cmp = random_case(seed, acc=0.6 + 0.1 * seed)
  fpr, fnr = per_class_rates(labels, cmp, C)
  efpr, efnr = np_rates(labels, cmp, C)
  np.testing.assert_allclose(fpr, efpr, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fnr, efnr, rtol=1e-5, atol=1e-7)

  d1, d2, v, hits = np_relative_change(labels, ref, cmp, C, convention=convention)
  ch = relative_rate_change(labels, ref, cmp, C, convention=convention)
  scale = 100.0 if convention == "simon_says" else 1.0
  np.testing.assert_allclose(ch.dfpr, d1, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(ch.dfnr, d2, rtol=1e-4, atol=1e-4 * scale)
  assert ch.valid.tolist() == v.tolist()
  cev = float(combined_error_variance(labels, ref, cmp, C, convention=convention))
  sde = float(symmetric_distance_error(labels, ref, cmp, C, convention=convention))
  assert cev == pytest.approx(np_cev(d1, d2, v, convention), rel=1e-4)
  assert sde == pytest.approx(np_sde(d1, d2, v, convention), rel=1e-4)
  assert cev > 0 and sde > 0


@pytest.mark.parametrize("seed", [3, 4])
def test_population_averages_rates_before_relative_change(seed):
  C, K = 10, 3
  labels, ref, pop = random_case(seed, K=K)
  rates = per_class_rates(labels, pop, C)
  assert rates.fpr.shape == (K, C) and rates.fnr.shape == (K, C)
  for k in range(K):
    efpr, efnr = np_rates(labels, pop[k], C)
    np.testing.assert_allclose(rates.fpr[k], efpr, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rates.fnr[k], efnr, rtol=1e-5, atol=1e-7)

  d1, d2, v, _ = np_relative_change(labels, ref, pop, C)
  ch = relative_rate_change(labels, ref, pop, C)
  np.testing.assert_allclose(ch.dfpr, d1, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ch.dfnr, d2, rtol=1e-4, atol=1e-3)
  cev = float(combined_error_variance(labels, ref, pop, C))
  sde = float(symmetric_distance_error(labels, ref, pop, C))
  assert cev == pytest.approx(np_cev(d1, d2, v), rel=1e-4)
  assert sde == pytest.approx(np_sde(d1, d2, v), rel=1e-4)

  # Averaging the per-model CEV gives a different number (not what docs/metrics.md defines).
  per_model = np.mean([float(combined_error_variance(labels, ref, pop[k], C)) for k in range(K)])
  assert abs(per_model - cev) > 1e-2 * cev

  # Reference population: rates averaged the same way.
  ref_pop = np.stack([ref, pop[0]])
  d1, d2, v, _ = np_relative_change(labels, ref_pop, pop[1:], C)
  ch = relative_rate_change(labels, ref_pop, pop[1:], C)
  np.testing.assert_allclose(ch.dfpr, d1, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ch.dfnr, d2, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------
# Weights / padding, degenerate classes, API details
# --------------------------------------------------------------------------


def test_weights_ignore_padded_examples():
  C = 10
  labels, ref, cmp = random_case(7, n=300)
  rng = np.random.default_rng(70)
  pad = 50
  labels_p = np.concatenate([labels, rng.integers(0, C, pad // 2), -np.ones(pad // 2, int)])
  ref_p = np.concatenate([ref, rng.integers(0, C, pad)])
  cmp_p = np.concatenate([cmp, rng.integers(0, C, pad)])
  w = np.concatenate([np.ones(len(labels)), np.zeros(pad)])

  np.testing.assert_array_equal(
    np.asarray(confusion_matrix(labels_p, cmp_p, C, weights=w)), np_confusion(labels, cmp, C)
  )
  a = per_class_rates(labels_p, cmp_p, C, weights=w)
  b = per_class_rates(labels, cmp, C)
  np.testing.assert_allclose(a.fpr, b.fpr, rtol=1e-6)
  np.testing.assert_allclose(a.fnr, b.fnr, rtol=1e-6)
  for x, y in zip(rate_denominators(labels_p, C, weights=w), rate_denominators(labels, C)):
    np.testing.assert_allclose(x, y)
  # padding changes the result when not masked (the test can fail)
  assert not np.allclose(per_class_rates(labels_p[: -pad // 2], cmp_p[: -pad // 2], C).fpr, b.fpr)
  for fn in (combined_error_variance, symmetric_distance_error):
    assert float(fn(labels_p, ref_p, cmp_p, C, weights=w)) == pytest.approx(
      float(fn(labels, ref, cmp, C)), rel=1e-5
    )


def test_rates_never_nan_for_absent_class_and_single_class():
  labels = np.array([0, 0, 1, 1, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0])
  fpr, fnr = per_class_rates(labels, preds, 4)  # class 3 absent
  assert np.all(np.isfinite(fpr)) and np.all(np.isfinite(fnr))
  assert float(fpr[3]) == 0.0 and float(fnr[3]) == 0.0
  # all examples one class: FP+TN = 0 for class 0
  one = np.zeros(5, int)
  fpr, fnr = per_class_rates(one, np.array([0, 0, 1, 0, 1]), 2)
  assert np.all(np.isfinite(fpr)) and np.all(np.isfinite(fnr))
  assert float(fpr[0]) == 0.0
  assert float(fnr[0]) == pytest.approx(0.4)
  # the absent class is never used in CEV/SDE, whatever the rule
  ref = np.array([0, 1, 1, 0, 2, 1])
  for rule in ("floor", "exclude"):
    ch = relative_rate_change(labels, ref, preds, 4, zero_rate=rule)
    assert not bool(ch.valid[3])
    assert np.all(np.isfinite(ch.dfpr)) and np.all(np.isfinite(ch.dfnr))
    assert np.isfinite(float(combined_error_variance(labels, ref, preds, 4, zero_rate=rule)))


def test_class_rates_access():
  labels, ref, _ = metrics_md_tiny_case()
  r = per_class_rates(labels, ref, 2)
  assert isinstance(r, ClassRates)
  np.testing.assert_array_equal(r["fpr"], r.fpr)
  np.testing.assert_array_equal(r["fnr"], r.fnr)
  np.testing.assert_array_equal(r[0], r.fpr)
  np.testing.assert_array_equal(r[-1], r.fnr)
  fpr, fnr = r
  np.testing.assert_array_equal(fnr, r.fnr)
  assert r._fields == ("fpr", "fnr")
  with pytest.raises(KeyError):
    r["tpr"]
  # it is a pytree that survives jit
  out = jax.jit(per_class_rates, static_argnums=2)(labels, ref, 2)
  assert isinstance(out, ClassRates)
  np.testing.assert_allclose(out["fpr"], [0.1, 0.2], rtol=1e-6)


def test_bad_strings_raise_value_error():
  labels, ref, cmp = metrics_md_tiny_case()
  with pytest.raises(ValueError, match=r"zero_rate.*floor.*exclude.*'flor'"):
    relative_rate_change(labels, ref, cmp, 2, zero_rate="flor")
  with pytest.raises(ValueError, match=r"convention.*simon_says.*nas2022.*'simon'"):
    combined_error_variance(labels, ref, cmp, 2, convention="simon")
  with pytest.raises(ValueError, match="'nas'"):
    symmetric_distance_error(labels, ref, cmp, 2, convention="nas")
  with pytest.raises(ValueError, match="'bad'"):
    cev_from_changes(jnp.zeros(2), jnp.zeros(2), None, "bad")
  with pytest.raises(ValueError, match="'bad'"):
    sde_from_changes(jnp.zeros(2), jnp.zeros(2), None, "bad")


def test_jit_matches_eager():
  C = 10
  labels, ref, pop = random_case(11, K=3)
  static = ("num_classes", "zero_rate", "convention")
  for rule, conv in (("floor", "simon_says"), ("exclude", "nas2022")):
    kw = dict(zero_rate=rule, convention=conv)
    for fn in (combined_error_variance, symmetric_distance_error):
      jitted = jax.jit(fn, static_argnames=static)
      assert float(jitted(labels, ref, pop, C, **kw)) == pytest.approx(
        float(fn(labels, ref, pop, C, **kw)), rel=1e-5
      )
  jitted = jax.jit(relative_rate_change, static_argnames=static)
  ch = jitted(labels, ref, pop, num_classes=C, zero_rate="exclude")
  assert isinstance(ch, BiasChange)
  np.testing.assert_allclose(
    ch.dfpr,
    relative_rate_change(labels, ref, pop, C, zero_rate="exclude").dfpr,
    rtol=1e-5,
    atol=1e-4,
  )
  cm = jax.jit(confusion_matrix, static_argnames="num_classes")(labels, ref, num_classes=C)
  np.testing.assert_array_equal(np.asarray(cm), np_confusion(labels, ref, C))


def test_out_of_range_ids_are_ignored_not_wrapped():
  labels = np.array([0, 1, 2, 2, 1])
  preds = np.array([0, 2, 2, 1, 1])
  expected = np_confusion(labels, preds, 3)
  # a -1 (padding) label must not wrap around to the last class
  got = confusion_matrix(np.append(labels, [-1, 3]), np.append(preds, [2, 0]), 3)
  np.testing.assert_array_equal(np.asarray(got), expected)
  got = confusion_matrix(np.append(labels, [0, 1]), np.append(preds, [-1, 5]), 3)
  np.testing.assert_array_equal(np.asarray(got), expected)
  for x, y in zip(rate_denominators(np.append(labels, -1), 3), rate_denominators(labels, 3)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Worked by hand (docs/metrics.md): 4 classes, class 0 has a zero reference FNR but a
# non-zero FPR, class 3 never occurs (its FNR is undefined). Reference rates:
# FPR (0.2, 0.25, 0.2, 0), FNR (0, 2/3, 0.5, -); compared: FPR (0.2, 0.25, 0, 0),
# FNR (0.5, 1/3, 0, -). floor: class 0's FNR denominator is one error, 1/2;
# exclude: class 0 is left out. Class 3 is invalid under both rules and never counted.
ZERO_RATE_LABELS = [0, 0, 1, 1, 2, 2, 1]
ZERO_RATE_REFERENCE = [0, 0, 1, 0, 2, 1, 2]
ZERO_RATE_COMPARED = [0, 1, 1, 1, 2, 2, 0]
ZERO_RATE_EXPECTED = {
  # (rule, convention): (dFPR, dFNR, valid, CEV, SDE)
  ("floor", "simon_says"): (
    [0, 0, -100, 0],
    [100, -50, -100, 0],
    [1, 1, 1, 0],
    42500 / 9,
    50 / math.sqrt(2),
  ),
  ("floor", "nas2022"): ([0, 0, -1, 0], [1, -0.5, -1, 0], [1, 1, 1, 0], 17 / 18, 0.5),
  ("exclude", "simon_says"): (
    [0, 0, -100, 0],
    [0, -50, -100, 0],
    [0, 1, 1, 0],
    1562.5,
    25 / math.sqrt(2),
  ),
  ("exclude", "nas2022"): ([0, 0, -1, 0], [0, -0.5, -1, 0], [0, 1, 1, 0], 0.3125, 0.25),
}


@pytest.mark.parametrize("rule,convention", sorted(ZERO_RATE_EXPECTED))
def test_zero_rate_rules_on_a_hand_worked_case(rule, convention):
  dfpr, dfnr, valid, cev, sde = ZERO_RATE_EXPECTED[rule, convention]
  labels, ref, cmp = (
    jnp.asarray(x) for x in (ZERO_RATE_LABELS, ZERO_RATE_REFERENCE, ZERO_RATE_COMPARED)
  )
  kw = dict(zero_rate=rule, convention=convention)
  change = relative_rate_change(labels, ref, cmp, 4, **kw)
  np.testing.assert_allclose(change.dfpr, dfpr, atol=1e-4)
  np.testing.assert_allclose(change.dfnr, dfnr, atol=1e-4)
  assert np.asarray(change.valid).tolist() == [bool(v) for v in valid]
  assert int(change.num_zero_rate_classes) == 1  # class 0; the absent class 3 is not counted
  assert float(combined_error_variance(labels, ref, cmp, 4, **kw)) == pytest.approx(cev, rel=1e-5)
  assert float(symmetric_distance_error(labels, ref, cmp, 4, **kw)) == pytest.approx(sde, rel=1e-5)


@pytest.mark.parametrize(
  "call,name,value",
  [
    (lambda y: relative_rate_change(y, y, y, 3, convention="paper"), "convention", "paper"),
    (lambda y: relative_rate_change(y, y, y, 3, zero_rate="skip"), "zero_rate", "skip"),
    (lambda y: combined_error_variance(y, y, y, 3, convention="paper"), "convention", "paper"),
    (lambda y: symmetric_distance_error(y, y, y, 3, zero_rate="skip"), "zero_rate", "skip"),
    (lambda y: cev_from_changes(np.ones(3), np.ones(3), convention="paper"), "convention", "paper"),
    (lambda y: sde_from_changes(np.ones(3), np.ones(3), convention="paper"), "convention", "paper"),
  ],
)
def test_a_bad_rule_or_convention_is_refused_by_its_name(call, name, value):
  with pytest.raises(ValueError, match=rf"^{name} must be one of \(.*\), got '{value}'$"):
    call(np.array([0, 1, 2, 1]))


@pytest.mark.parametrize("zero_rate", ["floor", "exclude"])
@pytest.mark.parametrize("convention", ["simon_says", "nas2022"])
def test_changes_from_confusion_counts_equal_those_from_predictions(zero_rate, convention):
  """What the evaluation pass counts gives bit for bit what the predictions give: one model and
  a population of 3 (rates averaged first), with a class the reference never misses (a zero
  reference FNR) and a class absent from the labels."""
  rng = np.random.default_rng(4)
  C, n = 6, 400
  labels = rng.integers(0, C - 1, n)  # class 5 never occurs
  ref = np.where(rng.random(n) < 0.7, labels, rng.integers(0, C, n))
  ref[labels == 0] = 0
  pop = np.where(rng.random((3, n)) < 0.6, labels, rng.integers(0, C, (3, n)))
  for pred in (pop[0], pop):
    want = relative_rate_change(labels, ref, pred, C, zero_rate=zero_rate, convention=convention)
    cm_ref = np.asarray(confusion_matrix(labels, ref, C))
    cm = np.asarray(confusion_matrix(labels, pred, C))
    got = relative_rate_change_from_confusion(
      cm_ref, cm, zero_rate=zero_rate, convention=convention
    )
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(got.num_zero_rate_classes) >= 1


def test_changes_from_confusion_refuse_mismatched_counts():
  with pytest.raises(ValueError, match=r"must be \(\.\.\., C, C\) of one C, got \(3, 3\) and"):
    relative_rate_change_from_confusion(np.ones((3, 3)), np.ones((4, 4)))
  with pytest.raises(ValueError, match="zero_rate must be one of"):
    relative_rate_change_from_confusion(np.ones((3, 3)), np.ones((3, 3)), zero_rate="drop")
