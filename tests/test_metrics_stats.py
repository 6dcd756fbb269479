"""Tests for prunebias_jax.metrics.stats.

References: scipy.stats called directly (pearsonr, spearmanr, rankdata, ttest_ind,
ttest_rel, permutation_test, false_discovery_control, binomtest, wilcoxon, t, bootstrap),
float64 NumPy re-implementations (BCa formulas, cluster resampling by concatenation,
least-squares residuals), hand-enumerated exact p-values, and analytic facts about the
bootstrap.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st

from prunebias_jax.metrics.bias import combined_error_variance, symmetric_distance_error
from prunebias_jax.metrics.fairness import equalized_odds_difference_multiclass
from prunebias_jax.metrics.stats import (
  ClasswiseSignificance,
  benjamini_hochberg,
  bootstrap_ci,
  bootstrap_indices,
  classwise_significance,
  correlation_ci,
  min_attainable_permutation_p,
  partial_correlation,
  partial_correlation_ci,
  pearson,
  per_class_accuracy,
  per_class_normalized_recall,
  permutation_test,
  seed_interval,
  sign_test,
  spearman,
  welch_t_test,
  wilcoxon_signed_rank,
)

KEY = jax.random.PRNGKey(0)


# --------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------


def test_bootstrap_indices_shape_range_and_seed():
  idx = bootstrap_indices(KEY, 50, 7)
  assert idx.shape == (7, 50) and idx.dtype == jnp.int32
  assert int(idx.min()) >= 0 and int(idx.max()) < 50
  np.testing.assert_array_equal(idx, bootstrap_indices(KEY, 50, 7))
  assert not np.array_equal(idx, bootstrap_indices(jax.random.PRNGKey(1), 50, 7))
  # resamples are genuinely random draws with replacement (some repeats, some left out)
  assert all(len(np.unique(row)) < 50 for row in np.asarray(idx))


def test_bootstrap_ci_mean_of_normal():
  n = 2000
  x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
  x = x - x.mean()  # sample mean exactly ~0, so the interval must cover 0
  est, lo, hi = bootstrap_ci(jnp.mean, x, key=KEY, num_resamples=4000, batch_size=500)
  assert float(est) == pytest.approx(float(np.mean(x)), abs=1e-6)
  assert float(lo) < 0.0 < float(hi)
  width = float(hi - lo)
  expected = 2 * 1.959964 * x.std() / math.sqrt(n)
  assert width == pytest.approx(expected, rel=0.15)


def test_bootstrap_ci_matches_numpy_on_same_indices_and_batch_invariance():
  x = np.random.default_rng(1).exponential(size=400).astype(np.float32)
  B = 24  # same (n, B) as the CEV test below: bootstrap_indices compiles once
  est, lo, hi = bootstrap_ci(jnp.median, x, key=KEY, num_resamples=B, batch_size=7, confidence=0.9)
  idx = np.asarray(bootstrap_indices(KEY, x.size, B))
  ref = np.median(x[idx], axis=1)
  np.testing.assert_allclose([lo, hi], np.percentile(ref, [5, 95]), rtol=1e-5)
  assert float(est) == pytest.approx(float(np.median(x)))
  out2 = bootstrap_ci(jnp.median, x, key=KEY, num_resamples=B, batch_size=1000, confidence=0.9)
  np.testing.assert_allclose(out2, (est, lo, hi), rtol=1e-6)
  _, blo, bhi = bootstrap_ci(
    jnp.median, x, key=KEY, num_resamples=B, batch_size=7, confidence=0.9, method="basic"
  )
  np.testing.assert_allclose([blo, bhi], [2 * est - hi, 2 * est - lo], rtol=1e-6)
  # 'bca' is a method now (tests below); an unknown name is still refused
  with pytest.raises(ValueError, match="'studentized'"):
    bootstrap_ci(jnp.median, x, key=KEY, method="studentized")


def _cls_data(seed, n=400, C=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, n)
  ref = np.where(rng.random(n) < 0.7, labels, rng.integers(0, C, n))
  preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, C, n))
  return labels, ref, preds


C_CLS = 5
_CEV = functools.partial(combined_error_variance, num_classes=C_CLS, zero_rate="floor")
_SDE = functools.partial(symmetric_distance_error, num_classes=C_CLS, convention="nas2022")


def _cev_and_sde(labels, ref, preds):
  """A vector-valued statistic: (CEV, SDE) of one resample."""
  return jnp.stack([_CEV(labels, ref, preds), _SDE(labels, ref, preds)])


def test_bootstrap_ci_with_cev_sde_vmapped_and_deterministic():
  labels, ref, preds = _cls_data(0, C=C_CLS)
  B = 24
  est, lo, hi = bootstrap_ci(
    _cev_and_sde, labels, ref, preds, key=KEY, num_resamples=B, batch_size=8
  )
  assert est.shape == lo.shape == hi.shape == (2,)
  assert float(est[0]) == pytest.approx(float(_CEV(labels, ref, preds)), rel=1e-6)
  assert float(est[1]) == pytest.approx(float(_SDE(labels, ref, preds)), rel=1e-6)
  assert np.isfinite([lo, hi]).all() and (np.asarray(lo) <= np.asarray(hi)).all()
  # same resamples, CEV computed one by one on the host, then NumPy percentiles
  idx = np.asarray(bootstrap_indices(KEY, labels.size, B))
  vals = np.array([float(_CEV(labels[i], ref[i], preds[i])) for i in idx])
  np.testing.assert_allclose([lo[0], hi[0]], np.percentile(vals, [2.5, 97.5]), rtol=1e-4)
  again = bootstrap_ci(_cev_and_sde, labels, ref, preds, key=KEY, num_resamples=B, batch_size=8)
  np.testing.assert_array_equal(np.stack(again), np.stack((est, lo, hi)))
  other = bootstrap_ci(
    _cev_and_sde, labels, ref, preds, key=jax.random.PRNGKey(3), num_resamples=B, batch_size=8
  )
  assert float(other[1][0]) != float(lo[0])


_EOD = functools.partial(equalized_odds_difference_multiclass, num_classes=C_CLS, num_groups=3)


def _pop_cev_and_eod(labels, ref, pop, groups):
  """CEV of a (K, n) population (example axis 1) and the EOD of its first model."""
  return jnp.stack([_CEV(labels, ref, pop), _EOD(labels, pop[0], groups)])


def test_bootstrap_ci_population_axis_and_fairness():
  labels, ref, preds = _cls_data(2, C=C_CLS)
  pop = np.stack([preds, np.roll(preds, 3)])  # (K, n): examples along axis 1
  groups = np.random.default_rng(0).integers(0, 3, labels.size)
  B = 24
  est, lo, hi = bootstrap_ci(
    _pop_cev_and_eod,
    labels,
    ref,
    pop,
    groups,
    key=KEY,
    num_resamples=B,
    batch_size=8,
    axes=(0, 0, 1, 0),
  )
  assert float(est[0]) == pytest.approx(float(_CEV(labels, ref, pop)), rel=1e-6)
  assert float(est[1]) == pytest.approx(float(_EOD(labels, preds, groups)), abs=1e-6)
  assert 0.0 <= float(lo[1]) <= float(hi[1]) <= 1.0
  # the same resamples by hand, population resampled along axis 1
  idx = np.asarray(bootstrap_indices(KEY, labels.size, B))
  vals = np.array(
    [
      [float(_CEV(labels[i], ref[i], pop[:, i])), float(_EOD(labels[i], pop[0, i], groups[i]))]
      for i in idx
    ]
  )
  np.testing.assert_allclose(lo, np.percentile(vals, 2.5, axis=0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(hi, np.percentile(vals, 97.5, axis=0), rtol=1e-4, atol=1e-6)


def test_bootstrap_ci_bad_arguments():
  x = np.ones(5, np.float32)
  with pytest.raises(ValueError, match="confidence"):
    bootstrap_ci(jnp.mean, x, key=KEY, confidence=1.5)
  with pytest.raises(ValueError, match="examples"):
    bootstrap_ci(lambda a, b: a.mean() + b.mean(), x, np.ones(6), key=KEY)


# --------------------------------------------------------------------------
# Correlation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_spearman_match_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(40)
  y = 0.5 * x + rng.standard_normal(40)
  assert float(pearson(x, y)) == pytest.approx(st.pearsonr(x, y)[0], abs=1e-5)
  assert float(spearman(x, y)) == pytest.approx(st.spearmanr(x, y)[0], abs=1e-5)
  # heavy ties
  xt = rng.integers(0, 4, 50).astype(float)
  yt = np.round(xt + rng.standard_normal(50)).astype(float)
  assert float(spearman(xt, yt)) == pytest.approx(st.spearmanr(xt, yt)[0], abs=1e-5)
  assert float(pearson(xt, yt)) == pytest.approx(st.pearsonr(xt, yt)[0], abs=1e-5)


def test_spearman_ties_hand_case_and_constant():
  x = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
  y = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
  assert float(spearman(x, y)) == pytest.approx(st.spearmanr(x, y)[0], abs=1e-6)
  assert np.isnan(float(pearson(np.ones(5), np.arange(5.0))))
  assert np.isnan(float(spearman(np.ones(5), np.arange(5.0))))


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_ci_contains_r(method):
  rng = np.random.default_rng(4)
  x = rng.standard_normal(30)
  y = 0.6 * x + 0.8 * rng.standard_normal(30)
  r, lo, hi = correlation_ci(x, y, method=method, key=KEY, num_resamples=500)
  ref = st.pearsonr(x, y)[0] if method == "pearson" else st.spearmanr(x, y)[0]
  assert float(r) == pytest.approx(ref, abs=1e-5)
  assert float(lo) < float(r) < float(hi)
  assert -1.0 <= float(lo) and float(hi) <= 1.0


def test_correlation_ci_degenerate_resamples_are_ignored():
  rng = np.random.default_rng(5)
  x = np.zeros(30)
  x[:3] = 1.0  # P(resample constant in x) = 0.9**30 ~ 4%: NaN resamples occur
  y = x + 0.3 * rng.standard_normal(30)
  r, lo, hi = correlation_ci(x, y, key=KEY, num_resamples=500)
  assert np.isfinite([r, lo, hi]).all()
  with pytest.raises(ValueError, match="'kendall'"):
    correlation_ci(x, y, method="kendall", key=KEY)


# --------------------------------------------------------------------------
# Welch, permutation, BH
# --------------------------------------------------------------------------


def test_welch_matches_scipy():
  rng = np.random.default_rng(0)
  C = 12
  a = rng.normal(0.7, 0.05, size=(C, 8)) + rng.normal(0, 0.03, size=(C, 1))
  b = rng.normal(0.7, 0.1, size=(C, 5))
  t, p = welch_t_test(a, b)
  ref = st.ttest_ind(a, b, axis=-1, equal_var=False)
  np.testing.assert_allclose(t, ref.statistic, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p, ref.pvalue, atol=1e-5)
  assert t.shape == (C,) and p.shape == (C,)


@pytest.mark.filterwarnings("ignore:Precision loss")
def test_welch_zero_variance():
  a = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3]])
  b = np.array([[0.5, 0.5], [0.7, 0.7], [0.2, 0.2]])
  t, p = welch_t_test(a, b)
  assert float(t[0]) == 0.0 and float(p[0]) == 1.0
  assert float(t[1]) == -np.inf and float(p[1]) == 0.0
  ref = st.ttest_ind(a[2], b[2], equal_var=False)  # one sample constant: usual formula
  assert float(t[2]) == pytest.approx(ref.statistic, abs=1e-5)
  assert float(p[2]) == pytest.approx(ref.pvalue, abs=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    welch_t_test(np.ones((3, 1)), np.ones((3, 4)))


def test_permutation_test_matches_scipy_exact():
  rng = np.random.default_rng(1)
  C, K = 4, 7
  shift = np.array([0.0, 0.03, 0.06, 0.1])[:, None]
  a = rng.normal(0.6, 0.05, (C, K)) + shift
  b = rng.normal(0.6, 0.05, (C, K))
  P = 10000
  ours = np.asarray(permutation_test(a, b, key=KEY, num_permutations=P, batch_size=2000))
  ref = st.permutation_test(
    (a, b),
    lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
    permutation_type="independent",
    vectorized=True,
    n_resamples=np.inf,  # exact: all C(14, 7) splits
    alternative="two-sided",
    axis=-1,
  ).pvalue
  # C(14, 7) = 3432 <= P splits: the test is now exact (it was Monte Carlo), so it equals SciPy
  np.testing.assert_allclose(ours, ref, rtol=1e-12)
  assert ours.shape == (C,) and (ours > 0).all()
  # the same permutations whatever the chunking
  again = permutation_test(a, b, key=KEY, num_permutations=P, batch_size=10000)
  np.testing.assert_array_equal(ours, again)
  # identical samples: T_obs = 0 and every permutation ties -> p = 1
  same = np.tile(rng.random(K), (C, 1))
  np.testing.assert_allclose(
    permutation_test(same, same, key=KEY, num_permutations=P, batch_size=2000), 1.0
  )


def test_benjamini_hochberg_matches_scipy():
  rng = np.random.default_rng(2)
  for m in (1, 7, 40):
    p = np.concatenate([rng.uniform(0, 0.01, m // 3), rng.uniform(0, 1, m - m // 3)])
    rng.shuffle(p)
    rej, adj = benjamini_hochberg(p, q=0.05)
    ref = st.false_discovery_control(p, method="bh")
    np.testing.assert_allclose(adj, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(rej, ref <= 0.05)
    # step-up definition: reject the k smallest, k = max{i : p_(i) <= i q / m}
    ps = np.sort(p)
    ok = np.nonzero(ps <= np.arange(1, m + 1) * 0.05 / m)[0]
    k = ok[-1] + 1 if ok.size else 0
    assert int(np.asarray(rej).sum()) == k
  # batched over a leading axis
  P = rng.uniform(0, 0.2, (3, 9))
  _, adj = benjamini_hochberg(P)
  np.testing.assert_allclose(adj, np.stack([st.false_discovery_control(r) for r in P]), rtol=1e-5)
  with pytest.raises(ValueError, match="q"):
    benjamini_hochberg(p, q=0.0)


# --------------------------------------------------------------------------
# Per-class accuracy and class-wise significance
# --------------------------------------------------------------------------


def test_per_class_accuracy():
  rng = np.random.default_rng(0)
  C, K, n = 4, 3, 200
  labels = rng.integers(0, C, n)
  preds = np.where(rng.random((K, n)) < 0.7, labels, rng.integers(0, C, (K, n)))
  acc = per_class_accuracy(labels, preds, C)
  assert acc.shape == (K, C)
  ref = np.array([[np.mean(preds[k][labels == c] == c) for c in range(C)] for k in range(K)])
  np.testing.assert_allclose(acc, ref, atol=1e-6)
  assert per_class_accuracy(labels, preds[0], C).shape == (C,)


def test_classwise_significance_detects_shifted_classes():
  rng = np.random.default_rng(3)
  C, K = 10, 8
  ref = rng.normal(0.8, 0.02, (K, C))
  cmp = rng.normal(0.8, 0.02, (K, C))
  shifted = np.array([1, 4, 7])
  cmp[:, shifted] -= 0.15  # large effect (7.5 sd)
  res = classwise_significance(ref, cmp, key=KEY, q=0.05, num_permutations=5000)
  assert isinstance(res, ClasswiseSignificance)
  np.testing.assert_array_equal(np.nonzero(np.asarray(res.welch_rejected))[0], shifted)
  np.testing.assert_array_equal(np.nonzero(np.asarray(res.permutation_rejected))[0], shifted)
  assert float(res.fraction_significant_welch) == pytest.approx(0.3)
  assert float(res["fraction_significant_permutation"]) == pytest.approx(0.3)
  assert (np.asarray(res.welch_t)[shifted] < 0).all()
  ref_t = st.ttest_ind(cmp, ref, axis=0, equal_var=False)
  np.testing.assert_allclose(res.welch_p, ref_t.pvalue, atol=1e-5)
  np.testing.assert_allclose(
    res.welch_p_adjusted, st.false_discovery_control(ref_t.pvalue), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(res.mean_difference, cmp.mean(0) - ref.mean(0), atol=1e-6)


# --------------------------------------------------------------------------
# BCa bootstrap
# --------------------------------------------------------------------------


def _bca_reference(theta_hat, theta_b, theta_jack, confidence):
  """BCa bounds by the textbook formulas in float64 NumPy (Efron & Tibshirani 14.3, 14.15)."""
  from scipy.special import ndtr, ndtri

  frac = (np.sum(theta_b < theta_hat) + np.sum(theta_b <= theta_hat)) / (2 * theta_b.size)
  z0 = ndtri(frac)
  d = theta_jack.mean() - theta_jack
  a = np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)
  z = ndtri((1 - confidence) / 2)
  a1 = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
  a2 = ndtr(z0 + (z0 - z) / (1 - a * (z0 - z)))
  return np.percentile(theta_b, [100 * a1, 100 * a2])


def _var_and_mean(x):
  return jnp.stack([jnp.var(x), jnp.mean(x)])


def test_bootstrap_bca_matches_textbook_formula_on_same_resamples():
  x = np.random.default_rng(11).exponential(size=300).astype(np.float32)
  B = 2000
  est, lo, hi = bootstrap_ci(
    _var_and_mean, x, key=KEY, num_resamples=B, batch_size=250, method="bca", confidence=0.9
  )
  idx = np.asarray(bootstrap_indices(KEY, x.size, B))
  x64 = x.astype(np.float64)
  for j, fn in enumerate((np.var, np.mean)):
    theta_b = fn(x64[idx], axis=1)
    jack = np.array([fn(np.delete(x64, i)) for i in range(x.size)])  # leave-one-out
    ref = _bca_reference(fn(x64), theta_b, jack, 0.9)
    np.testing.assert_allclose([lo[j], hi[j]], ref, rtol=2e-4)
    assert float(est[j]) == pytest.approx(fn(x64), rel=1e-5)
  # skewed statistic: BCa moves the interval away from the percentile one
  _, plo, phi = bootstrap_ci(_var_and_mean, x, key=KEY, num_resamples=B, confidence=0.9)
  assert float(hi[0]) > float(phi[0]) and float(lo[0]) > float(plo[0])


def test_bootstrap_bca_agrees_with_scipy_on_skewed_statistic():
  """The variance of lognormal data: strongly skewed, BCa far from percentile.

  SciPy uses its own random resamples, so the intervals agree up to Monte Carlo error.
  Tolerance: 2% of the interval width for the lower bound and 4% for the upper (the upper
  percentile sits in the long tail; its Monte Carlo sd at B = 5e4 is about 1% of the width).
  """
  x = np.random.default_rng(7).lognormal(0.0, 1.0, 150).astype(np.float32)
  _, lo, hi = bootstrap_ci(jnp.var, x, key=KEY, num_resamples=50000, batch_size=5000, method="bca")
  ref = st.bootstrap(
    (x.astype(np.float64),),
    np.var,
    n_resamples=200000,
    method="BCa",
    rng=np.random.default_rng(0),
  ).confidence_interval
  width = ref.high - ref.low
  assert abs(float(lo) - ref.low) <= 0.02 * width
  assert abs(float(hi) - ref.high) <= 0.04 * width
  # the tolerance is tight enough to tell BCa from the percentile interval
  _, plo, phi = bootstrap_ci(jnp.var, x, key=KEY, num_resamples=50000, batch_size=5000)
  assert abs(float(plo) - ref.low) > 0.02 * width
  assert abs(float(phi) - ref.high) > 0.04 * width


def test_bootstrap_bca_grouped_jackknife():
  from prunebias_jax.metrics.stats import _jackknife_jit

  # strided groups {i : i mod G = g}, unequal sizes (103 = 10 * 10 + 3): exact values
  x = np.random.default_rng(2).standard_normal(103).astype(np.float32)
  jack = np.asarray(_jackknife_jit(jnp.sum, (jnp.asarray(x),), 4, (0,), 103, 10))
  ref = [x[np.arange(103) % 10 != g].sum() for g in range(10)]
  np.testing.assert_allclose(jack, ref, rtol=1e-5, atol=1e-5)
  # the grouped jackknife estimates the same acceleration: with G = 200 groups of 3 the
  # interval stays within 1% of its width of leave-one-out (percentile: 5% away)
  y = np.random.default_rng(3).exponential(size=600).astype(np.float32)
  kw = dict(key=KEY, num_resamples=4000, batch_size=500)
  _, lo1, hi1 = bootstrap_ci(jnp.var, y, method="bca", **kw)  # n = 600 <= 2000: leave-one-out
  _, lo2, hi2 = bootstrap_ci(jnp.var, y, method="bca", jackknife_groups=200, **kw)
  _, plo, phi = bootstrap_ci(jnp.var, y, **kw)
  width = float(hi1 - lo1)
  assert abs(float(lo2 - lo1)) < 0.01 * width and abs(float(hi2 - hi1)) < 0.01 * width
  assert abs(float(plo - lo1)) > 0.03 * width and abs(float(phi - hi1)) > 0.03 * width
  with pytest.raises(ValueError, match="n >= 2"):
    bootstrap_ci(jnp.var, y[:1], key=KEY, method="bca")


# --------------------------------------------------------------------------
# Partial correlation and the cluster bootstrap
# --------------------------------------------------------------------------


def _closed_form_partial(x, y, z):
  rxy, rxz, ryz = st.pearsonr(x, y)[0], st.pearsonr(x, z)[0], st.pearsonr(y, z)[0]
  return (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))


def _residual_partial(x, y, z):
  """Partial Pearson by explicit least squares on [1, z] in float64 (several covariates)."""
  a = np.column_stack([np.ones(len(x)), z])
  rx = x - a @ np.linalg.lstsq(a, x, rcond=None)[0]
  ry = y - a @ np.linalg.lstsq(a, y, rcond=None)[0]
  return st.pearsonr(rx, ry)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_partial_correlation_matches_closed_form(seed):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal(60)
  x = 0.8 * z + rng.standard_normal(60)
  y = 0.6 * z + 0.3 * x + rng.standard_normal(60)
  ref = _closed_form_partial(x, y, z)
  assert float(partial_correlation(x, y, z)) == pytest.approx(ref, abs=1e-5)
  # Spearman: the same closed form on ranks (with ties)
  xt, yt, zt = np.round(x), np.round(y), np.round(2 * z)
  ranks = [st.rankdata(v) for v in (xt, yt, zt)]
  assert float(partial_correlation(xt, yt, zt, method="spearman")) == pytest.approx(
    _closed_form_partial(*ranks), abs=1e-5
  )
  # two covariates against explicit least squares
  z2 = np.column_stack([z, rng.standard_normal(60)])
  assert float(partial_correlation(x, y, z2)) == pytest.approx(
    _residual_partial(x, y, z2), abs=1e-5
  )


def test_partial_correlation_degenerate():
  z = np.arange(10.0)
  y = np.random.default_rng(0).standard_normal(10)
  assert np.isnan(float(partial_correlation(2 * z + 1, y, z)))  # x explained by z
  assert np.isnan(float(partial_correlation(np.ones(10), y, z)))  # constant x
  # a constant covariate explains nothing: the plain correlation
  x = y + np.random.default_rng(1).standard_normal(10)
  assert float(partial_correlation(x, y, np.ones(10))) == pytest.approx(
    st.pearsonr(x, y)[0], abs=1e-5
  )


def _cluster_resample_reference(fn, arrays, clusters, B, confidence=0.95):
  """Hand cluster bootstrap: concatenate the points of the drawn clusters, scipy statistic."""
  uniq = np.unique(clusters)
  members = [np.nonzero(clusters == c)[0] for c in uniq]
  draws = np.asarray(bootstrap_indices(KEY, len(uniq), B))  # the cluster draws of resample b
  vals = []
  for row in draws:
    idx = np.concatenate([members[g] for g in row])
    vals.append(fn(*(a[idx] for a in arrays)))
  vals = np.array(vals, dtype=float)
  alpha = 100 * (1 - confidence) / 2
  return np.nanpercentile(vals, [alpha, 100 - alpha])


def test_correlation_ci_cluster_bootstrap_matches_hand_resampling():
  rng = np.random.default_rng(8)
  sizes = [3, 5, 2, 6, 4, 4, 3, 5, 2, 6]
  clusters = np.repeat(np.array([7, 2, 9, 4, 0, 5, 1, 8, 3, 6]) * 10, sizes)  # arbitrary ids
  centre = rng.standard_normal(len(sizes))
  x = np.repeat(centre, sizes) + 0.3 * rng.standard_normal(clusters.size)
  y = 0.7 * x + 0.5 * rng.standard_normal(clusters.size)
  B = 200
  for method, ref_fn in (
    ("pearson", lambda a, b: st.pearsonr(a, b)[0]),
    ("spearman", lambda a, b: st.spearmanr(a, b)[0]),
  ):
    r, lo, hi = correlation_ci(x, y, method=method, key=KEY, num_resamples=B, clusters=clusters)
    assert float(r) == pytest.approx(ref_fn(x, y), abs=1e-5)
    ref = _cluster_resample_reference(ref_fn, (x, y), clusters, B)
    np.testing.assert_allclose([lo, hi], ref, atol=1e-5)
  # partial correlation, clusters resampled the same way
  z = np.repeat(rng.standard_normal(len(sizes)), sizes) + rng.standard_normal(clusters.size)
  r, lo, hi = partial_correlation_ci(x, y, z, key=KEY, num_resamples=B, clusters=clusters)
  assert float(r) == pytest.approx(_closed_form_partial(x, y, z), abs=1e-5)
  ref = _cluster_resample_reference(_closed_form_partial, (x, y, z), clusters, B)
  np.testing.assert_allclose([lo, hi], ref, atol=1e-4)
  with pytest.raises(ValueError, match="clusters"):
    correlation_ci(x, y, key=KEY, clusters=clusters[:-1])


def test_cluster_bootstrap_on_duplicated_points():
  """Clusters of identical points carry the information of one point each."""
  rng = np.random.default_rng(9)
  x15 = rng.standard_normal(15)
  y15 = 0.5 * x15 + rng.standard_normal(15)
  x, y = np.repeat(x15, 8), np.repeat(y15, 8)
  ids = np.repeat(np.arange(15), 8)
  kw = dict(key=KEY, num_resamples=1000)
  for method in ("pearson", "spearman"):
    _, plo, phi = correlation_ci(x, y, method=method, **kw)
    _, clo, chi = correlation_ci(x, y, method=method, clusters=ids, **kw)
    assert float(phi - plo) < 0.6 * float(chi - clo)  # points: ~1/sqrt(8) of the width
    # resampling the 15 clusters = resampling the 15 distinct points (same draws)
    _, lo15, hi15 = correlation_ci(x15, y15, method=method, **kw)
    np.testing.assert_allclose([clo, chi], [lo15, hi15], atol=1e-5)
  z = rng.standard_normal(15)
  _, plo, phi = partial_correlation_ci(x, y, np.repeat(z, 8), **kw)
  _, clo, chi = partial_correlation_ci(x, y, np.repeat(z, 8), clusters=ids, **kw)
  assert float(phi - plo) < 0.6 * float(chi - clo)


# --------------------------------------------------------------------------
# Normalised recall, exactness of the permutation test, paired tests
# --------------------------------------------------------------------------


def test_per_class_normalized_recall():
  rng = np.random.default_rng(4)
  C, K, n = 5, 3, 300
  labels = rng.integers(0, C - 1, n)  # class C-1 absent
  preds = np.where(rng.random((K, n)) < 0.6, labels, rng.integers(0, C, (K, n)))
  out = np.asarray(per_class_normalized_recall(labels, preds, C))
  assert out.shape == (K, C)
  for k in range(K):
    overall = np.mean(preds[k] == labels)
    for c in range(C - 1):
      assert out[k, c] == pytest.approx(np.mean(preds[k][labels == c] == c) - overall, abs=1e-6)
  np.testing.assert_array_equal(out[:, C - 1], 0.0)
  assert per_class_normalized_recall(labels, preds[0], C).shape == (C,)


@pytest.mark.parametrize(
  "k, k_ref, paired, expected",
  [
    (2, 2, False, 1 / 3),  # 2 / C(4, 2)
    (3, 3, False, 1 / 10),  # 2 / C(6, 3)
    (4, 4, False, 1 / 35),  # 2 / C(8, 4)
    (2, 3, False, 1 / 5),  # 2 / C(5, 2)
    (3, 3, True, 1 / 4),  # 2 / 2^3
    (4, 4, True, 1 / 8),  # 2 / 2^4
  ],
)
def test_min_attainable_p_is_attained_exactly(k, k_ref, paired, expected):
  min_p, exact = min_attainable_permutation_p(k, k_ref, num_permutations=1000, paired=paired)
  assert exact and min_p == pytest.approx(expected, rel=1e-12)
  # perfectly separated samples reach it (and the lower side too)
  a = 1.0 + np.arange(k) / 10
  b = np.arange(k_ref) / 10
  for sign in (1, -1):
    p = permutation_test(sign * a, sign * b, key=KEY, num_permutations=1000, paired=paired)
    assert float(p) == pytest.approx(expected, rel=1e-12)


def test_min_attainable_p_random_case():
  # C(16, 8) = 12870 > 1000 splits: random, floor 2 / (P + 1)
  min_p, exact = min_attainable_permutation_p(8, 8, num_permutations=1000)
  assert not exact and min_p == pytest.approx(2 / 1001)
  a = 1.0 + np.arange(8.0)
  p = permutation_test(a, -a, key=KEY, num_permutations=1000)
  assert float(p) == pytest.approx(2 / 1001)
  assert min_attainable_permutation_p(1, 1, num_permutations=10)[0] == 1.0
  with pytest.raises(ValueError, match="paired"):
    min_attainable_permutation_p(3, 4, num_permutations=10, paired=True)


def test_permutation_test_hand_enumerated():
  # a = (3, 5), b = (1, 2, 4): T = sum_a / 2 - (15 - sum_a) / 3.  Of the 10 splits, sum_a >= 8
  # for {3,5}, {4,5} (P_greater = 2/10) and <= 8 for 9 of them: p = 2 * 2/10 = 0.4.
  p = permutation_test([3.0, 5.0], [1.0, 2.0, 4.0], key=KEY, num_permutations=100)
  assert float(p) == pytest.approx(0.4, rel=1e-12)
  # paired, differences d = (1, -2, 4): sign-flip sums are +-1 +-2 +-4 = 7, 5, 3, 1, -1, -3, -5,
  # -7; observed 3: P_greater = 3/8, P_less = 6/8, p = 0.75.
  p = permutation_test([1.0, 0.0, 4.0], [0.0, 2.0, 0.0], key=KEY, num_permutations=100, paired=True)
  assert float(p) == pytest.approx(0.75, rel=1e-12)
  # ties are not broken by rounding: 0.1 + 0.2 vs 0.3 + 0.0 is a zero difference
  p = permutation_test([0.1, 0.2], [0.3, 0.0], key=KEY, num_permutations=100)
  assert float(p) == 1.0


def test_permutation_test_random_is_deterministic_and_close_to_exact():
  rng = np.random.default_rng(5)
  a = rng.normal(0.62, 0.05, (3, 8))
  b = rng.normal(0.6, 0.05, (3, 8))
  P = 4000  # < C(16, 8): random splits
  p1 = permutation_test(a, b, key=KEY, num_permutations=P)
  np.testing.assert_array_equal(p1, permutation_test(a, b, key=KEY, num_permutations=P))
  np.testing.assert_array_equal(
    p1,
    permutation_test(a, b, key=jax.random.key(0), num_permutations=P),  # typed key
  )
  assert not np.array_equal(
    p1, permutation_test(a, b, key=jax.random.PRNGKey(1), num_permutations=P)
  )
  exact = st.permutation_test(
    (a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), n_resamples=np.inf, axis=-1
  ).pvalue
  assert np.all(np.abs(p1 - exact) <= 4 * np.sqrt(exact * (1 - exact) / P) + 2 / P)


def test_classwise_significance_paired_matches_scipy():
  rng = np.random.default_rng(6)
  C, K = 6, 5
  seed_effect = rng.normal(0, 0.05, (K, 1))  # shared by the pair of seed k
  ref = 0.8 + seed_effect + rng.normal(0, 0.01, (K, C))
  cmp = ref + rng.normal(0, 0.01, (K, C))
  cmp[:, 2] -= 0.05
  res = classwise_significance(ref, cmp, key=KEY, num_permutations=1000, paired=True)
  tr = st.ttest_rel(cmp, ref, axis=0)
  np.testing.assert_allclose(res.welch_t, tr.statistic, rtol=1e-10)
  np.testing.assert_allclose(res.welch_p, tr.pvalue, rtol=1e-10)
  perm = st.permutation_test(
    (cmp.T, ref.T),
    lambda x, y, axis: np.mean(x - y, axis=axis),
    permutation_type="samples",
    n_resamples=np.inf,
    axis=-1,
  ).pvalue
  np.testing.assert_allclose(res.permutation_p, perm, rtol=1e-12)
  np.testing.assert_allclose(res.permutation_p_adjusted, st.false_discovery_control(perm))
  assert res.exact and res.min_attainable_p == pytest.approx(2 / 32)
  assert res.can_reject == (2 / 32 <= 0.05)  # False: 1/16 > 0.05
  assert not res.permutation_rejected.any()
  assert bool(res.welch_rejected[2])  # the paired t-test sees the shift
  with pytest.raises(ValueError, match="paired"):
    classwise_significance(ref, cmp[:4], key=KEY, paired=True)


def test_classwise_significance_small_populations_cannot_reject():
  rng = np.random.default_rng(7)
  ref = rng.normal(0.8, 0.01, (2, 4))
  cmp = ref - 0.3  # every class far lower
  res = classwise_significance(ref, cmp, key=KEY)
  assert res.exact and res.min_attainable_p == pytest.approx(1 / 3) and not res.can_reject
  np.testing.assert_allclose(res.permutation_p, 1 / 3)
  assert not res.permutation_rejected.any()
  ref4 = rng.normal(0.8, 0.01, (4, 4))
  res = classwise_significance(ref4, ref4[:, ::-1] - 0.3, key=KEY)
  assert res.can_reject and res.min_attainable_p == pytest.approx(1 / 35)
  # all 4 classes at the minimum: adjusted p = 4 (1/35) / 4 = 1/35 <= 0.05
  np.testing.assert_allclose(res.permutation_p_adjusted, 1 / 35)
  assert res.permutation_rejected.all() and res.fraction_significant_permutation == 1.0


@pytest.mark.filterwarnings("ignore:Precision loss")  # the scipy reference call only
def test_classwise_significance_constant_samples_without_warnings():
  ref = np.array([[0.5, 0.9, 0.7], [0.5, 0.9, 0.6], [0.5, 0.9, 0.8]])
  cmp = np.array([[0.5, 0.7, 0.7], [0.5, 0.7, 0.7], [0.5, 0.7, 0.7]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    res = classwise_significance(ref, cmp, key=KEY)
  # class 0: equal constants; class 1: different constants; class 2: one constant sample
  assert res.welch_t[0] == 0.0 and res.welch_p[0] == 1.0 and res.permutation_p[0] == 1.0
  assert res.welch_t[1] == -np.inf and res.welch_p[1] == 0.0
  assert res.permutation_p[1] == pytest.approx(res.min_attainable_p) == pytest.approx(0.1)
  ref_t = st.ttest_ind(cmp[:, 2], ref[:, 2], equal_var=False)
  assert res.welch_p[2] == pytest.approx(ref_t.pvalue, rel=1e-10)
  assert np.isfinite(res.welch_p_adjusted).all() and np.isfinite(res.permutation_p).all()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    t, p = welch_t_test(np.full((1, 3), 0.7), np.full((1, 4), 0.7))
  assert float(t[0]) == 0.0 and float(p[0]) == 1.0


def test_sign_test_against_binomtest_and_by_hand():
  d = np.array([1.0, 2.0, 3.0, 0.0, -1.0])  # zero dropped: 3 of 4 positive
  res = sign_test(d)
  assert res.num_nonzero == 4 and res.statistic == 3
  assert res.pvalue == pytest.approx(0.625)  # 2 * (C(4,3) + C(4,4)) / 16
  rng = np.random.default_rng(0)
  d = rng.normal(0.3, 1.0, 15)
  k = int((d > 0).sum())
  assert sign_test(d).pvalue == pytest.approx(st.binomtest(k, 15).pvalue, rel=1e-12)
  assert np.isnan(sign_test(np.zeros(4)).pvalue) and sign_test(np.zeros(4)).num_nonzero == 0
  with pytest.raises(ValueError, match="finite"):
    sign_test([1.0, np.nan])


def test_wilcoxon_signed_rank_against_scipy_and_by_hand():
  # all 5 differences positive: W- = 0, exact p = 2 / 2^5
  res = wilcoxon_signed_rank([1.0, 2.0, 3.0, 4.0, 5.0])
  assert res.statistic == 0.0 and res.pvalue == pytest.approx(0.0625)
  assert wilcoxon_signed_rank([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).pvalue == pytest.approx(0.0625)
  d = np.random.default_rng(1).normal(0.4, 1.0, 12)
  ref = st.wilcoxon(d)
  res = wilcoxon_signed_rank(d)
  assert res.statistic == ref.statistic and res.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
  assert wilcoxon_signed_rank([0.0, 0.7]).pvalue == 1.0
  assert np.isnan(wilcoxon_signed_rank([0.0, 0.0]).pvalue)


def test_seed_interval_against_scipy_t():
  v = np.array([0.71, 0.69, 0.74, 0.70, 0.72])
  mean, lo, hi = seed_interval(v, 0.9)
  ref = st.t.interval(0.9, 4, loc=v.mean(), scale=st.sem(v))
  assert mean == pytest.approx(v.mean()) and (lo, hi) == pytest.approx(ref, rel=1e-12)
  m1, lo1, hi1 = seed_interval([0.5])
  assert m1 == 0.5 and np.isnan(lo1) and np.isnan(hi1)
  assert all(np.isnan(seed_interval([])))


def _distinct_count(x):
  """Distinct values of the sample: a resample of n >= 30 values almost never has all n."""
  return 1.0 + jnp.sum(jnp.diff(jnp.sort(x)) > 0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bca_has_no_interval_when_every_resample_is_on_one_side(sign):
  """Every resample strictly below (sign=1) or above (-1) the estimate: z0 = -+inf, so BCa
  has no interval (NaN), while the percentile interval exists."""
  x = jnp.arange(40.0)
  fn = lambda v: sign * _distinct_count(v)
  idx = np.asarray(bootstrap_indices(KEY, 40, 64))
  assert all(len(set(row.tolist())) < 40 for row in idx)  # strictly one side, on these resamples
  est, lo, hi = bootstrap_ci(fn, x, key=KEY, num_resamples=64, method="bca")
  assert float(est) == sign * 40.0 and np.isnan(float(lo)) and np.isnan(float(hi))
  _, plo, phi = bootstrap_ci(fn, x, key=KEY, num_resamples=64, method="percentile")
  assert np.isfinite(float(plo)) and np.isfinite(float(phi))


@pytest.mark.parametrize(
  "test", [welch_t_test, lambda a, b: permutation_test(a, b, key=KEY, num_permutations=10)]
)
def test_two_sample_tests_refuse_a_scalar_sample_by_name(test):
  for a, b in ((1.0, [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], 1.0)):
    with pytest.raises(ValueError, match=r"must have shapes \(\.\.\., Ka\)"):
      test(a, b)


def test_classwise_significance_indexes_by_position_and_name():
  rng = np.random.default_rng(0)
  out = classwise_significance(rng.random((4, 3)), rng.random((4, 3)), key=KEY, num_permutations=50)
  for i, field in enumerate(out._fields):
    assert out[i] is getattr(out, field) and out[field] is getattr(out, field)
  assert out[-1] is out.can_reject and len(out[:2]) == 2
  with pytest.raises(KeyError, match="'p' is not a field of ClasswiseSignificance"):
    out["p"]


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(k_compared=0, k_reference=3, num_permutations=10), "k_compared"),
    (dict(k_compared=3, k_reference=0, num_permutations=10), "k_reference"),
    (dict(k_compared=3, k_reference=3, num_permutations=0), "num_permutations"),
  ],
)
def test_min_attainable_p_names_the_bad_argument(kwargs, name):
  with pytest.raises(ValueError, match=f"^{name} must be a positive int, got 0$"):
    min_attainable_permutation_p(kwargs.pop("k_compared"), kwargs.pop("k_reference"), **kwargs)


def test_per_class_accuracy_weights_drop_examples():
  labels = np.array([0, 0, 0, 1, 1, 2])
  pred = np.array([0, 1, 1, 1, 0, 2])
  weights = np.array([1, 1, 0, 1, 0, 1])  # drops one wrong 0 and the wrong 1
  np.testing.assert_allclose(per_class_accuracy(labels, pred, 3), [1 / 3, 1 / 2, 1.0], rtol=1e-6)
  np.testing.assert_allclose(
    per_class_accuracy(labels, pred, 3, weights), [1 / 2, 1.0, 1.0], rtol=1e-6
  )


def test_partial_correlation_is_undefined_when_x_is_a_linear_function_of_z():
  """x = 3 z + 1 in float32: the residual of x on z is rounding noise, not signal, so the
  partial correlation is NaN (plain and cluster-bootstrap estimate) instead of noise."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 1)).astype(np.float32)
  x = (3 * z[:, 0] + 1).astype(np.float32)
  y = rng.normal(size=50).astype(np.float32)
  assert np.isnan(float(partial_correlation(x, y, z)))
  est, _, _ = partial_correlation_ci(x, y, z, key=KEY, num_resamples=8, clusters=np.arange(50) // 2)
  assert np.isnan(float(est))
  # the guard is relative: a genuinely partial relation is still measured
  assert np.isfinite(float(partial_correlation(x + rng.normal(size=50).astype(np.float32), y, z)))


def test_correlation_ci_names_a_bad_batch_size():
  x = np.arange(10.0)
  for clusters in (None, np.arange(10) // 2):  # the plain and the cluster bootstrap
    with pytest.raises(ValueError, match="^batch_size must be a positive int, got 0$"):
      correlation_ci(x, x[::-1], key=KEY, num_resamples=8, batch_size=0, clusters=clusters)
