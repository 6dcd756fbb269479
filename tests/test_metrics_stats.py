"""Tests for prunebias_jax.metrics.stats.

References: scipy.stats (pearsonr, spearmanr, ttest_ind, permutation_test,
false_discovery_control), plain NumPy, and analytic facts about the bootstrap.
"""

from __future__ import annotations

import functools
import math

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
  pearson,
  per_class_accuracy,
  permutation_test,
  spearman,
  welch_t_test,
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
    jnp.median, x, key=KEY, num_resamples=B, batch_size=7, confidence=0.9, interval="basic"
  )
  np.testing.assert_allclose([blo, bhi], [2 * est - hi, 2 * est - lo], rtol=1e-6)
  with pytest.raises(ValueError, match="'bca'"):
    bootstrap_ci(jnp.median, x, key=KEY, interval="bca")


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
  se = np.sqrt(ref * (1 - ref) / P)
  assert np.all(np.abs(ours - ref) <= 4 * se + 2e-3), (ours, ref)
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
