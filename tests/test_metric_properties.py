"""Properties every metric must have for any input (Hypothesis, bounded example counts).

Invariances, not values: the hand-worked and library-checked values live in the per-metric
test modules. Shapes are fixed per test so that each jitted kernel compiles once.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prunebias_jax.metrics import (
  combined_error_variance,
  compression_identified_exemplars,
  demographic_parity_difference,
  equalized_odds_difference,
  linear_cka,
  symmetric_distance_error,
)
from prunebias_jax.metrics.stats import bootstrap_ci

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(
  max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
N, C = 40, 5


def _ints(n: int, high: int) -> st.SearchStrategy:
  return st.lists(st.integers(0, high - 1), min_size=n, max_size=n).map(np.asarray)


def _relabel(x: np.ndarray, perm: list[int]) -> np.ndarray:
  return np.asarray(perm)[x]


@pytest.mark.parametrize("convention", ["simon_says", "nas2022"])
@pytest.mark.parametrize("rule", ["floor", "exclude"])
@SETTINGS
@given(labels=_ints(N, C), ref=_ints(N, C), cmp=_ints(N, C), perm=st.permutations(range(C)))
def test_cev_and_sde_do_not_depend_on_class_names(rule, convention, labels, ref, cmp, perm):
  """Renaming the classes (one permutation applied to labels and both models' predictions)
  permutes the per-class changes, which CEV and SDE then average: both unchanged. And a model
  compared with itself changed nothing: CEV = SDE = 0 (NaN, for both namings, when no class
  is usable)."""
  kw = dict(zero_rate=rule, convention=convention)
  renamed = [_relabel(x, perm) for x in (labels, ref, cmp)]
  for metric in (combined_error_variance, symmetric_distance_error):
    value = float(metric(labels, ref, cmp, C, **kw))
    again = float(metric(*renamed, C, **kw))
    if np.isnan(value):  # undefined (no class usable: docs/metrics.md), for both namings
      assert np.isnan(again) and np.isnan(float(metric(labels, ref, ref, C, **kw)))
      continue
    assert again == pytest.approx(value, rel=1e-4, abs=1e-3)
    assert float(metric(labels, ref, ref, C, **kw)) == 0.0


def _features(n: int, d: int) -> st.SearchStrategy:
  return st.lists(
    st.floats(-10, 10, allow_nan=False, width=32), min_size=n * d, max_size=n * d
  ).map(lambda v: np.asarray(v, np.float32).reshape(n, d))


def _centred_norm(x: np.ndarray) -> float:
  return float(np.linalg.norm(x - x.mean(axis=0)))


@SETTINGS
@given(
  x=_features(24, 4),
  y=_features(24, 3),
  seed=st.integers(0, 2**16),
  scale=st.floats(0.1, 10.0),
)
def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_scale(x, y, seed, scale):
  """CKA(X, X) = 1; CKA(X Q a, Y) = CKA(X, Y) for any orthogonal Q and a > 0; symmetric."""
  assume(_centred_norm(x) > 1e-1 and _centred_norm(y) > 1e-1)
  # Well-conditioned features only: float32 Gram products lose the invariance otherwise.
  assume(np.linalg.cond(x - x.mean(0)) < 1e3 and np.linalg.cond(y - y.mean(0)) < 1e3)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(4, 4)))
  base = float(linear_cka(x, y))
  assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-4)
  assert float(linear_cka((x @ q * scale).astype(np.float32), y)) == pytest.approx(base, abs=1e-3)
  assert float(linear_cka(y, x)) == pytest.approx(base, abs=1e-5)
  assert -1e-5 <= base <= 1 + 1e-5


G = 3


@SETTINGS
@given(
  labels=_ints(30, 2),
  predictions=_ints(30, 2),
  groups=_ints(30, G),
  perm=st.permutations(range(G)),
)
def test_group_fairness_does_not_depend_on_group_names(labels, predictions, groups, perm):
  """DPD and EOD (both aggregations) are max − min over groups: renaming groups changes
  nothing."""
  assume(len(np.unique(groups)) >= 2)
  renamed = _relabel(groups, perm)
  dpd = float(demographic_parity_difference(predictions, groups, num_groups=G))
  assert float(demographic_parity_difference(predictions, renamed, num_groups=G)) == pytest.approx(
    dpd, abs=1e-6
  )
  for agg in ("worst_case", "mean"):
    eod = float(equalized_odds_difference(labels, predictions, groups, agg=agg, num_groups=G))
    again = equalized_odds_difference(labels, predictions, renamed, agg=agg, num_groups=G)
    assert np.isnan(eod) == np.isnan(float(again))
    if not np.isnan(eod):
      assert float(again) == pytest.approx(eod, abs=1e-6)


K, M, L = 3, 20, 4


@SETTINGS
@given(
  ref=_ints(K * M, L).map(lambda a: a.reshape(K, M)),
  cmp=_ints(K * M, L).map(lambda a: a.reshape(K, M)),
  perm=st.permutations(range(L)),
)
def test_cie_is_symmetric_in_label_values_and_in_its_two_populations(ref, cmp, perm):
  """Whether the modal label sets of two populations are disjoint depends neither on which
  population is the reference nor on what the labels are called."""
  cie = np.asarray(compression_identified_exemplars(ref, cmp, L))
  assert np.array_equal(np.asarray(compression_identified_exemplars(cmp, ref, L)), cie)
  renamed = compression_identified_exemplars(_relabel(ref, perm), _relabel(cmp, perm), L)
  assert np.array_equal(np.asarray(renamed), cie)
  assert not np.asarray(compression_identified_exemplars(ref, ref, L)).any()


@SETTINGS
@given(data=_features(15, 1).map(lambda a: a[:, 0]), seed=st.integers(0, 2**16))
def test_percentile_bootstrap_interval_of_the_mean_contains_the_mean(data, seed):
  """The bootstrap distribution of a sample mean is centred on it, so the 95% percentile
  interval always contains the estimate."""
  estimate, lo, hi = bootstrap_ci(jnp.mean, data, key=jax.random.key(seed), num_resamples=200)
  tol = 1e-5 * (1 + abs(float(estimate)))
  assert float(lo) - tol <= float(estimate) <= float(hi) + tol
