"""Tests for prunebias_jax.metrics.fairness.

References: fairlearn (binary DPD/EOD) and plain NumPy loops over classes and
groups written here (multiclass one-vs-rest), following docs/metrics.md.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference as fl_dpd
from fairlearn.metrics import equalized_odds_difference as fl_eod

from prunebias_jax.metrics.fairness import (
  GroupRates,
  demographic_parity_difference,
  demographic_parity_difference_multiclass,
  equalized_odds_difference,
  equalized_odds_difference_multiclass,
  group_rates,
)

# --------------------------------------------------------------------------
# Independent NumPy reference (loops over classes and groups)
# --------------------------------------------------------------------------


def _rate(num, den):
  return num / den if den > 0 else 0.0  # fairlearn / sklearn: 0/0 -> 0


def np_ovr_gaps(labels, preds, groups, C):
  """Per-class (DPD_c, TPR gap_c, FPR gap_c) by explicit loops."""
  labels, preds, groups = map(np.asarray, (labels, preds, groups))
  present = np.unique(groups)
  dpd, tpr_gap, fpr_gap = np.zeros(C), np.zeros(C), np.zeros(C)
  for c in range(C):
    sr, tpr, fpr = [], [], []
    for a in present:
      m = groups == a
      y = labels[m] == c
      p = preds[m] == c
      sr.append(p.mean())
      tpr.append(_rate((y & p).sum(), y.sum()))
      fpr.append(_rate((~y & p).sum(), (~y).sum()))
    dpd[c] = max(sr) - min(sr)
    tpr_gap[c] = max(tpr) - min(tpr)
    fpr_gap[c] = max(fpr) - min(fpr)
  return dpd, tpr_gap, fpr_gap


def _binary_case(seed, num_groups):
  rng = np.random.default_rng(seed)
  n = 120  # one shape for all cases: fewer recompilations
  probs = rng.dirichlet(np.ones(num_groups) * 0.7)  # unbalanced group sizes
  groups = rng.choice(num_groups, size=n, p=probs)
  groups[:num_groups] = np.arange(num_groups)  # every group present
  base = rng.uniform(0.2, 0.8, size=num_groups)
  labels = (rng.random(n) < base[groups]).astype(np.int64)
  flip = rng.random(n) < rng.uniform(0.1, 0.4)
  preds = np.where(flip, 1 - labels, labels)
  preds = np.where(rng.random(n) < 0.15 * groups, 1, preds)  # group-dependent bias
  return labels, preds, groups


CASES = [(seed, g) for seed, g in zip(range(8), [2, 3, 2, 3, 2, 3, 3, 2])]


@pytest.mark.parametrize("seed,num_groups", CASES)
def test_binary_matches_fairlearn(seed, num_groups):
  labels, preds, groups = _binary_case(seed, num_groups)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref_dpd = fl_dpd(labels, preds, sensitive_features=groups)
    ref_wc = fl_eod(labels, preds, sensitive_features=groups, agg="worst_case")
    ref_mean = fl_eod(labels, preds, sensitive_features=groups, agg="mean")
  np.testing.assert_allclose(demographic_parity_difference(preds, groups), ref_dpd, atol=1e-6)
  np.testing.assert_allclose(equalized_odds_difference(labels, preds, groups), ref_wc, atol=1e-6)
  np.testing.assert_allclose(
    equalized_odds_difference(labels, preds, groups, agg="mean"), ref_mean, atol=1e-6
  )


def test_group_without_positives_follows_fairlearn():
  # group 0 has no positive label: fairlearn gives it TPR 0 (kept in the max/min)
  labels = np.array([0, 0, 0, 1, 1, 0, 1, 0])
  preds = np.array([1, 0, 1, 1, 0, 0, 1, 1])
  groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for agg in ("worst_case", "mean"):
      ref = fl_eod(labels, preds, sensitive_features=groups, agg=agg)
      got = equalized_odds_difference(labels, preds, groups, agg=agg)
      np.testing.assert_allclose(got, ref, atol=1e-6)
  # TPR per group (0, 1/2, 1): gap 1; FPR (2/3, 0, 1): gap 1.
  rates = group_rates(labels, preds, groups, 3, 2)
  np.testing.assert_allclose(rates.tpr[:, 1], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(rates.fpr[:, 1], [2 / 3, 0.0, 1.0], atol=1e-6)


def test_hand_computed_tiny_case():
  # group 0: y = 1 1 0 0, yhat = 1 0 1 0 -> SR 1/2, TPR 1/2, FPR 1/2
  # group 1: y = 1 0,     yhat = 1 1     -> SR 1,   TPR 1,   FPR 1
  labels = [1, 1, 0, 0, 1, 0]
  preds = [1, 0, 1, 0, 1, 1]
  groups = [0, 0, 0, 0, 1, 1]
  assert float(demographic_parity_difference(preds, groups)) == pytest.approx(0.5)
  assert float(equalized_odds_difference(labels, preds, groups)) == pytest.approx(0.5)
  assert float(equalized_odds_difference(labels, preds, groups, agg="mean")) == pytest.approx(0.5)
  # group 1 now predicts y exactly: TPR 1, FPR 0 -> gaps 1/2 and 1/2
  preds2 = [1, 0, 1, 0, 1, 0]
  assert float(equalized_odds_difference(labels, preds2, groups)) == pytest.approx(0.5)
  # group 0: TPR 1/2, FPR 1/2; group 1: TPR 1, FPR 0 -> gaps 0.5, 0.5; DPD |1/2 - 1/2| = 0
  assert float(demographic_parity_difference(preds2, groups)) == pytest.approx(0.0)
  # asymmetric gaps: group 1 TPR 0, FPR 0 -> TPR gap 1/2, FPR gap 1/2; make FPR gap differ
  preds3 = [1, 1, 1, 0, 0, 0]  # g0: TPR 1, FPR 1/2; g1: TPR 0, FPR 0
  assert float(equalized_odds_difference(labels, preds3, groups)) == pytest.approx(1.0)
  assert float(equalized_odds_difference(labels, preds3, groups, agg="mean")) == pytest.approx(0.75)


def _multiclass_case(seed, C=4, G=3, n=150):
  rng = np.random.default_rng(seed)
  groups = rng.choice(G, size=n, p=[0.6, 0.3, 0.1][:G] if G == 3 else None)
  groups[:G] = np.arange(G)
  labels = rng.integers(0, C, size=n)
  preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, C, size=n))
  preds = np.where((groups == 2) & (rng.random(n) < 0.3), 0, preds)
  return labels, preds, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_matches_numpy_loops(seed):
  C = 4
  labels, preds, groups = _multiclass_case(seed, C=C)
  dpd, tg, fg = np_ovr_gaps(labels, preds, groups, C)
  wc = np.maximum(tg, fg)
  mean = 0.5 * (tg + fg)
  got = lambda **kw: float(equalized_odds_difference_multiclass(labels, preds, groups, C, **kw))
  assert got() == pytest.approx(wc.max(), abs=1e-6)
  assert got(aggregate="mean") == pytest.approx(wc.mean(), abs=1e-6)
  assert got(agg="mean") == pytest.approx(mean.max(), abs=1e-6)
  assert got(agg="mean", aggregate="mean") == pytest.approx(mean.mean(), abs=1e-6)
  d = lambda **kw: float(demographic_parity_difference_multiclass(preds, groups, C, **kw))
  assert d() == pytest.approx(dpd.max(), abs=1e-6)
  assert d(aggregate="mean") == pytest.approx(dpd.mean(), abs=1e-6)


def test_group_rates_matches_loops():
  C, G = 4, 3
  labels, preds, groups = _multiclass_case(5, C=C, G=G)
  rates = group_rates(labels, preds, groups, G, C)
  assert isinstance(rates, GroupRates)
  assert rates.tpr.shape == (G, C) and rates["fpr"].shape == (G, C)
  for g in range(G):
    m = groups == g
    assert float(rates.count[g]) == m.sum()
    for c in range(C):
      y, p = labels[m] == c, preds[m] == c
      assert float(rates.selection_rate[g, c]) == pytest.approx(p.mean(), abs=1e-6)
      assert float(rates.tpr[g, c]) == pytest.approx(_rate((y & p).sum(), y.sum()), abs=1e-6)
      assert float(rates.fpr[g, c]) == pytest.approx(_rate((~y & p).sum(), (~y).sum()), abs=1e-6)


def test_binary_equals_multiclass_positive_class():
  labels, preds, groups = _binary_case(11, 3)
  _, tg, fg = np_ovr_gaps(labels, preds, groups, 2)
  assert float(equalized_odds_difference(labels, preds, groups)) == pytest.approx(
    max(tg[1], fg[1]), abs=1e-6
  )


def test_weights_ignore_padded_rows_and_empty_groups():
  labels, preds, groups = _binary_case(3, 3)
  n = len(labels)
  rng = np.random.default_rng(0)
  pad = 37
  # padded rows: random values, including a group id (3) that only padding uses
  lp = np.concatenate([labels, rng.integers(0, 2, pad)])
  pp = np.concatenate([preds, rng.integers(0, 2, pad)])
  gp = np.concatenate([groups, rng.integers(0, 4, pad)])
  w = np.concatenate([np.ones(n), np.zeros(pad)])
  assert float(demographic_parity_difference(pp, gp, weights=w)) == pytest.approx(
    float(demographic_parity_difference(preds, groups)), abs=1e-6
  )
  for agg in ("worst_case", "mean"):
    assert float(equalized_odds_difference(lp, pp, gp, agg=agg, weights=w)) == pytest.approx(
      float(equalized_odds_difference(labels, preds, groups, agg=agg)), abs=1e-6
    )
  # without the weights the padding changes the answer (the test can fail)
  assert float(demographic_parity_difference(pp, gp)) != pytest.approx(
    float(demographic_parity_difference(preds, groups)), abs=1e-6
  )
  # multiclass, with -1 padding labels/groups dropped as well
  C = 4
  ml, mp, mg = _multiclass_case(4, C=C)
  m = len(ml)
  ml2 = np.concatenate([ml, rng.integers(0, C, pad)])
  mp2 = np.concatenate([mp, rng.integers(0, C, pad)])
  mg2 = np.concatenate([mg, rng.integers(0, 3, pad)])
  w2 = np.concatenate([np.ones(m), np.zeros(pad)])
  for aggregate in ("max", "mean"):
    a = equalized_odds_difference_multiclass(
      ml2, mp2, mg2, C, aggregate=aggregate, weights=w2, num_groups=5
    )
    b = equalized_odds_difference_multiclass(ml, mp, mg, C, aggregate=aggregate)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    a = demographic_parity_difference_multiclass(mp2, mg2, C, aggregate=aggregate, weights=w2)
    b = demographic_parity_difference_multiclass(mp, mg, C, aggregate=aggregate)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
  # -1 padding (no weights needed): dropped
  neg = np.full(pad, -1)
  a = equalized_odds_difference_multiclass(
    np.concatenate([ml, neg]), np.concatenate([mp, neg]), np.concatenate([mg, neg]), C
  )
  assert float(a) == pytest.approx(
    float(equalized_odds_difference_multiclass(ml, mp, mg, C)), abs=1e-6
  )


def test_vmap_and_jit_with_static_num_groups():
  labels, preds, groups = _binary_case(7, 3)
  batch = np.stack([preds, 1 - preds, labels])
  got = jax.vmap(lambda p: demographic_parity_difference(p, groups, num_groups=3))(batch)
  want = [float(demographic_parity_difference(p, groups)) for p in batch]
  np.testing.assert_allclose(got, want, atol=1e-6)
  f = jax.jit(lambda y, p, g: equalized_odds_difference(y, p, g, num_groups=3))
  assert float(f(labels, preds, groups)) == pytest.approx(
    float(equalized_odds_difference(labels, preds, groups)), abs=1e-6
  )
  with pytest.raises(ValueError, match="num_groups"):
    jax.jit(lambda p, g: demographic_parity_difference(p, g))(preds, groups)


def test_bad_options_raise():
  labels, preds, groups = _binary_case(0, 2)
  with pytest.raises(ValueError, match="worst"):
    equalized_odds_difference(labels, preds, groups, agg="max")
  with pytest.raises(ValueError, match="'median'"):
    equalized_odds_difference_multiclass(labels, preds, groups, 2, aggregate="median")
  with pytest.raises(ValueError, match="'bad'"):
    demographic_parity_difference_multiclass(preds, groups, 2, aggregate="bad")
  with pytest.raises(ValueError, match="num_groups"):
    group_rates(labels, preds, groups, 0, 2)
  with pytest.raises(TypeError):
    group_rates(labels, preds, groups.astype(np.float32), 2, 2)
  with pytest.raises(ValueError, match="shape"):
    demographic_parity_difference(preds, groups[:-1], num_groups=2)


def test_no_groups_present_is_nan():
  out = demographic_parity_difference(jnp.array([1, 0]), jnp.array([0, 1]), weights=jnp.zeros(2))
  assert np.isnan(float(out))


def test_group_rates_index_by_position_and_name_and_name_a_bad_dtype():
  y = np.array([0, 1, 1, 0, 1, 0], np.int32)
  p = np.array([0, 1, 0, 0, 1, 1], np.int32)
  g = np.array([0, 0, 0, 1, 1, 1], np.int32)
  rates = group_rates(y, p, g, num_groups=2, num_classes=2)
  for i, field in enumerate(rates._fields):  # a NamedTuple: position i is field i
    np.testing.assert_array_equal(rates[i], getattr(rates, field))
    np.testing.assert_array_equal(rates[field], getattr(rates, field))
  assert len(rates[1:]) == len(rates._fields) - 1
  with pytest.raises(KeyError, match="'tpr_x' is not a field of GroupRates"):
    rates["tpr_x"]
  for name, args in (
    ("labels", (y.astype(np.float32), p, g)),
    ("predictions", (y, p.astype(np.float32), g)),
    ("groups", (y, p, g.astype(np.float32))),
  ):
    with pytest.raises(TypeError, match=f"^{name} must hold integer ids, got dtype float32"):
      group_rates(*args, num_groups=2, num_classes=2)


@pytest.mark.parametrize(
  "call,name",
  [
    (
      lambda y, p, g: demographic_parity_difference_multiclass(p, g, 3, aggregate="sum"),
      "aggregate",
    ),
    (
      lambda y, p, g: equalized_odds_difference_multiclass(y, p, g, 3, aggregate="sum"),
      "aggregate",
    ),
    (lambda y, p, g: equalized_odds_difference_multiclass(y, p, g, 3, agg="sum"), "agg"),
    (lambda y, p, g: equalized_odds_difference(y % 2, p % 2, g, agg="sum"), "agg"),
  ],
)
def test_a_bad_option_is_refused_by_its_name(call, name):
  y, p, g = np.array([0, 1, 2, 1]), np.array([0, 2, 2, 1]), np.array([0, 0, 1, 1])
  with pytest.raises(
    ValueError, match=rf"^{name} must be one of \('[a-z_]+', '[a-z_]+'\), got 'sum'$"
  ):
    call(y, p, g)


def test_binary_metrics_drop_rows_whose_values_are_not_0_or_1():
  """A -1 padding label or a prediction of 2 (any value but 0/1) drops its row: each metric
  equals fairlearn's on the remaining rows."""
  rng = np.random.default_rng(5)
  y, p, g = rng.integers(0, 2, 60), rng.integers(0, 2, 60), rng.integers(0, 3, 60)
  y[:5], p[5:10] = -1, 2
  by_p = p != 2  # DPD reads the predictions only
  both = by_p & (y != -1)
  assert float(demographic_parity_difference(p, g, num_groups=3)) == pytest.approx(
    fl_dpd(y[by_p], p[by_p], sensitive_features=g[by_p]), abs=1e-6
  )
  assert float(equalized_odds_difference(y, p, g, num_groups=3)) == pytest.approx(
    fl_eod(y[both], p[both], sensitive_features=g[both]), abs=1e-6
  )
