"""Statistics: bootstrap intervals, correlations and class-wise significance tests.

See docs/metrics.md ("Significance of class-wise changes", "Correlation of
similarity with bias").  Everything is vectorised with ``jax.vmap`` / array
ops; resamples and permutations are processed in chunks (``jax.lax.map`` over
chunks of ``batch_size``, ``jax.vmap`` inside a chunk), so memory grows with
``batch_size``, never with the total number of resamples.

Random numbers: resample (or permutation) ``b`` is drawn from
``jax.random.fold_in(key, b)``, so results depend only on ``key`` and the number
of resamples -- not on ``batch_size`` -- and :func:`bootstrap_indices` returns
exactly the index sets :func:`bootstrap_ci` uses.

* **Bootstrap percentile interval**: statistic ``T`` on the full data is the
  estimate; ``T*_b`` on ``B`` resamples drawn with replacement; the interval is
  the ``(1-conf)/2`` and ``(1+conf)/2`` percentiles of ``T*`` (linear
  interpolation, NumPy's default).  Resamples whose statistic is NaN are left
  out (``nanpercentile``).  Optionally the basic interval ``2 T - (those
  percentiles, swapped)`` for statistics biased under resampling (CEV, max
  over classes).
* **Pearson** ``r = sum dx dy / sqrt(sum dx^2 sum dy^2)`` with ``dx = x - mean(x)``;
  **Spearman** ``rho`` = Pearson of the average ranks (ties get the mean of the
  ranks they span).  Constant input gives NaN.
* **Welch's t-test**: ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)``
  (sample variances, ddof=1), Welch--Satterthwaite
  ``df = (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))``,
  two-sided ``p = 2 P(T_df > |t|) = I_{df/(df+t^2)}(df/2, 1/2)`` (regularised
  incomplete beta).
* **Permutation test** (difference of means, two-sided):
  ``p = (1 + #{b : |T_b| >= |T_obs|}) / (1 + P)``.
* **Benjamini--Hochberg**: with sorted ``p_(1) <= ... <= p_(m)``,
  ``p_adj_(i) = min_{j >= i} min(1, m p_(j) / j)``; hypothesis ``i`` is rejected
  iff ``p_adj_i <= q`` (identical to the step-up rule "reject the ``k``
  smallest, ``k = max{i : p_(i) <= i q / m}``").
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prunebias_jax.metrics.bias import _check_choice  # one string-option check for all metrics
from prunebias_jax.metrics.confusion import _check_num_classes, _safe_div, confusion_matrix

__all__ = [
  "CORRELATION_METHODS",
  "INTERVALS",
  "ClasswiseSignificance",
  "benjamini_hochberg",
  "bootstrap_ci",
  "bootstrap_indices",
  "classwise_significance",
  "correlation_ci",
  "pearson",
  "per_class_accuracy",
  "permutation_test",
  "spearman",
  "welch_t_test",
]

ArrayLike = Any

CORRELATION_METHODS: tuple[str, ...] = ("pearson", "spearman")
INTERVALS: tuple[str, ...] = ("percentile", "basic")


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
  try:
    out = operator.index(value)
  except TypeError as err:
    raise TypeError(f"{name} must be a Python int, got {value!r}") from err
  if isinstance(value, bool) or out < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return out


def _check_confidence(confidence: float) -> float:
  c = float(confidence)
  if not 0.0 < c < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
  return c


def _float(x: ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


# --------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------


def _resample_indices(key: jax.Array, ids: jax.Array, num_examples: int) -> jax.Array:
  """``(len(ids), n)`` int32 indices; row ``b`` drawn from ``fold_in(key, ids[b])``."""

  def one(i):
    return jax.random.randint(
      jax.random.fold_in(key, i), (num_examples,), 0, num_examples, dtype=jnp.int32
    )

  return jax.vmap(one)(ids)


def bootstrap_indices(key: jax.Array, num_examples: int, num_resamples: int) -> jax.Array:
  """``(B, n)`` int32 indices of ``B`` bootstrap resamples (uniform, with replacement).

  Row ``b`` is drawn from ``jax.random.fold_in(key, b)``: the same index sets
  that :func:`bootstrap_ci` uses with the same ``key``.
  """
  return _bootstrap_indices_jit(
    key,
    _check_positive_int("num_examples", num_examples),
    _check_positive_int("num_resamples", num_resamples),
  )


@functools.partial(jax.jit, static_argnames=("num_examples", "num_resamples"))
def _bootstrap_indices_jit(key, num_examples, num_resamples):
  return _resample_indices(key, jnp.arange(num_resamples), num_examples)


def _chunked(fn: Callable[[jax.Array], jax.Array], total: int, batch_size: int) -> jax.Array:
  """``fn(ids)`` for ``ids = 0..total-1`` in chunks of ``batch_size`` (lax.map over chunks).

  ``fn`` maps a ``(batch,)`` int array of ids to a pytree-free array with
  leading axis ``batch``; the result is ``(total, ...)``.
  """
  batch = min(batch_size, total)
  num_chunks = -(-total // batch)
  out = jax.lax.map(lambda c: fn(c * batch + jnp.arange(batch)), jnp.arange(num_chunks))
  return out.reshape((num_chunks * batch,) + out.shape[2:])[:total]


@functools.partial(
  jax.jit, static_argnames=("statistic_fn", "num_resamples", "batch_size", "axes", "num_examples")
)
def _bootstrap_distribution_jit(
  statistic_fn, arrays, key, num_resamples, batch_size, axes, num_examples
) -> tuple[jax.Array, jax.Array]:
  estimate = jnp.asarray(statistic_fn(*arrays))

  def stat_of(idx):
    return jnp.asarray(statistic_fn(*(jnp.take(a, idx, axis=ax) for a, ax in zip(arrays, axes))))

  def chunk(ids):
    return jax.vmap(stat_of)(_resample_indices(key, ids, num_examples))

  return estimate, _chunked(chunk, num_resamples, batch_size)


def _percentile_interval(samples: jax.Array, confidence: float) -> tuple[jax.Array, jax.Array]:
  alpha = 100.0 * (1.0 - confidence) / 2.0
  low = jnp.nanpercentile(samples, alpha, axis=0)
  high = jnp.nanpercentile(samples, 100.0 - alpha, axis=0)
  return low, high


def bootstrap_ci(
  statistic_fn: Callable[..., jax.Array],
  *arrays: ArrayLike,
  key: jax.Array,
  num_resamples: int = 1000,
  confidence: float = 0.95,
  batch_size: int = 32,
  axes: int | Sequence[int] = 0,
  interval: str = "percentile",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bootstrap percentile confidence interval of ``statistic_fn(*arrays)``.

  Examples are resampled with replacement (the same indices for every
  array, so pairs stay paired); ``T*_b = statistic_fn(*(a[idx_b] for a in
  arrays))`` is evaluated with ``jax.vmap`` over ``batch_size`` resamples at a
  time and ``jax.lax.map`` over the chunks, so at most ``batch_size``
  resampled copies of the data (and of ``statistic_fn``'s intermediates) are
  alive at once.  The interval is ``[perc_{(1-conf)/2}(T*), perc_{(1+conf)/2}(T*)]``.
  Resamples whose statistic is NaN are ignored (``nanpercentile``); if all
  are NaN the bounds are NaN.

  ``interval='basic'`` gives the basic (reverse-percentile) interval
  ``[2 T - perc_{(1+conf)/2}(T*), 2 T - perc_{(1-conf)/2}(T*)]`` instead.  It
  corrects a shift of the bootstrap distribution: statistics such as CEV (a
  variance of noisy per-class changes) or a max over classes are biased
  upward under resampling, so their percentile interval can lie entirely
  above the full-data estimate.

  ``statistic_fn`` must be traceable (it runs under ``jit``/``vmap``) and
  hashable (it is a static argument: pass the *same* object to reuse the
  compiled code).  Bind keyword-only options and static sizes with
  ``functools.partial``, e.g.
  ``functools.partial(combined_error_variance, num_classes=C, zero_rate='floor')``
  for ``bootstrap_ci(cev, labels, ref_preds, preds, key=key)``, or
  ``functools.partial(demographic_parity_difference, num_groups=G)``
  (``num_groups`` cannot be inferred under vmap).

  Args:
    statistic_fn: maps the per-example arrays to an array (normally a scalar).
    *arrays: arrays sharing the number of examples ``n`` along their
      example axis.
    key: ``jax.random`` key.
    num_resamples: ``B``.
    confidence: in ``(0, 1)``, e.g. 0.95.
    batch_size: resamples evaluated at once (memory ~ ``batch_size`` copies).
    axes: example axis of each array (one int for all, or one per array);
      e.g. ``1`` for ``(K, n)`` population predictions.
    interval: ``'percentile'`` (default) or ``'basic'``.

  Returns:
    ``(estimate, low, high)``: the statistic on the full data and the interval
    bounds, each with the statistic's shape.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one data array")
  arrays = tuple(jnp.asarray(a) for a in arrays)
  if isinstance(axes, int):
    axes_t = (axes,) * len(arrays)
  else:
    axes_t = tuple(int(a) for a in axes)
    if len(axes_t) != len(arrays):
      raise ValueError(f"axes must have one entry per array ({len(arrays)}), got {axes!r}")
  axes_t = tuple(ax % a.ndim if a.ndim else ax for a, ax in zip(arrays, axes_t))
  sizes = {a.shape[ax] for a, ax in zip(arrays, axes_t) if a.ndim > ax}
  if len(sizes) != 1 or any(a.ndim <= ax for a, ax in zip(arrays, axes_t)):
    raise ValueError(
      "all arrays must share the number of examples along their example axis; got shapes "
      f"{[a.shape for a in arrays]} with axes {axes_t}"
    )
  (n,) = sizes
  confidence = _check_confidence(confidence)
  _check_choice("interval", interval, INTERVALS)
  estimate, samples = _bootstrap_distribution_jit(
    statistic_fn,
    arrays,
    key,
    _check_positive_int("num_resamples", num_resamples),
    _check_positive_int("batch_size", batch_size),
    axes_t,
    _check_positive_int("num_examples", n),
  )
  low, high = _percentile_interval(samples, confidence)
  if interval == "basic":
    low, high = 2 * estimate - high, 2 * estimate - low
  return estimate, low, high


# --------------------------------------------------------------------------
# Correlation
# --------------------------------------------------------------------------


def pearson(x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Pearson ``r = sum dx dy / sqrt(sum dx^2 sum dy^2)`` along the last axis.

  ``x`` and ``y`` have shape ``(..., n)``; returns ``(...)``.  NaN if either is
  constant (0/0).  The result is clipped to ``[-1, 1]``.
  """
  x = _float(x)
  y = _float(y).astype(x.dtype)
  if x.shape != y.shape or x.ndim < 1:
    raise ValueError(f"x and y must have the same shape (..., n), got {x.shape} and {y.shape}")
  return _pearson_jit(x, y)


@jax.jit
def _pearson_jit(x, y):
  dx = x - x.mean(axis=-1, keepdims=True)
  dy = y - y.mean(axis=-1, keepdims=True)
  # Normalise each first: the products cannot overflow and 0/0 stays NaN.
  nx = jnp.sqrt(jnp.sum(dx * dx, axis=-1, keepdims=True))
  ny = jnp.sqrt(jnp.sum(dy * dy, axis=-1, keepdims=True))
  r = jnp.sum((dx / nx) * (dy / ny), axis=-1)
  return jnp.clip(r, -1.0, 1.0)


def _average_ranks(x: jax.Array) -> jax.Array:
  """1-based ranks along the last axis, ties replaced by the mean rank of their run.

  For value ``v`` with ``L`` entries ``< v`` and ``R`` entries ``<= v`` the tied
  run occupies ranks ``L+1 .. R``: mean ``(L + R + 1) / 2``.  ``L`` and ``R`` are
  two ``searchsorted`` calls on the sorted array (no loops).
  """

  def one(v):
    s = jnp.sort(v)
    left = jnp.searchsorted(s, v, side="left")
    right = jnp.searchsorted(s, v, side="right")
    return (left + right + 1).astype(x.dtype) / 2.0

  flat = x.reshape((-1, x.shape[-1]))
  return jax.vmap(one)(flat).reshape(x.shape)


def spearman(x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Spearman ``rho`` = Pearson correlation of the average ranks (ties averaged).

  Along the last axis of ``(..., n)`` arrays; NaN if either is constant.
  """
  x = _float(x)
  y = _float(y).astype(x.dtype)
  if x.shape != y.shape or x.ndim < 1:
    raise ValueError(f"x and y must have the same shape (..., n), got {x.shape} and {y.shape}")
  return _spearman_jit(x, y)


@jax.jit
def _spearman_jit(x, y):
  return _pearson_jit(_average_ranks(x), _average_ranks(y))


def correlation_ci(
  x: ArrayLike,
  y: ArrayLike,
  *,
  method: str = "pearson",
  key: jax.Array,
  num_resamples: int = 2000,
  confidence: float = 0.95,
  batch_size: int = 256,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Correlation of paired points ``(x_i, y_i)`` with a bootstrap percentile interval.

  The ``n`` pairs are resampled with replacement (:func:`bootstrap_ci`).  A
  resample in which ``x`` or ``y`` is constant (likely for small ``n``) has an
  undefined correlation (NaN) and is left out of the percentiles
  (``nanpercentile``), so the interval is conditional on non-degenerate
  resamples.

  Args:
    x, y: ``(n,)`` paired values (e.g. CKA and CEV of each compared model).
    method: ``'pearson'`` or ``'spearman'``.
    key: ``jax.random`` key.
    num_resamples: ``B``.
    confidence: in ``(0, 1)``.
    batch_size: resamples evaluated at once.

  Returns:
    ``(r, low, high)``.
  """
  _check_choice("method", method, CORRELATION_METHODS)
  fn = pearson if method == "pearson" else spearman
  x = _float(x)
  y = _float(y)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
  return bootstrap_ci(
    fn,
    x,
    y,
    key=key,
    num_resamples=num_resamples,
    confidence=confidence,
    batch_size=batch_size,
  )


# --------------------------------------------------------------------------
# Tests for class-wise changes
# --------------------------------------------------------------------------


def _check_pair(a: ArrayLike, b: ArrayLike, min_size: int) -> tuple[jax.Array, jax.Array]:
  a = _float(a)
  b = _float(b).astype(a.dtype)
  if a.ndim < 1 or b.ndim < 1 or a.shape[:-1] != b.shape[:-1]:
    raise ValueError(
      f"a and b must have shapes (..., Ka) and (..., Kb) with equal leading axes, "
      f"got {a.shape} and {b.shape}"
    )
  if a.shape[-1] < min_size or b.shape[-1] < min_size:
    raise ValueError(
      f"each sample needs at least {min_size} values along the last axis, "
      f"got {a.shape[-1]} and {b.shape[-1]}"
    )
  return a, b


def welch_t_test(a: ArrayLike, b: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Two-sided Welch's t-test of ``mean(a) != mean(b)`` along the last axis.

  ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` with sample variances
  (ddof=1), Welch--Satterthwaite degrees of freedom, and
  ``p = I_{df/(df+t^2)}(df/2, 1/2)`` (= ``2 P(T_df > |t|)``, via
  ``jax.scipy.special.betainc``).  Equals
  ``scipy.stats.ttest_ind(a, b, axis=-1, equal_var=False)``.

  **Zero variance in both samples** (each sample constant, detected exactly):
  ``t = 0, p = 1`` if the two constants are equal (scipy returns NaN there),
  ``t = +-inf, p = 0`` otherwise.
  If only one sample has zero variance the usual formulas apply.

  Args:
    a: ``(..., Ka)`` values, e.g. ``(C, Ka)`` per-class accuracies of ``Ka`` models.
    b: ``(..., Kb)`` with the same leading axes; ``Ka, Kb >= 2``.

  Returns:
    ``(t, p)``, each of shape ``(...)``.
  """
  a, b = _check_pair(a, b, 2)
  return _welch_jit(a, b)


@jax.jit
def _welch_jit(a, b):
  na = a.shape[-1]
  nb = b.shape[-1]
  # A constant sample gets its value as exact mean and exactly zero variance (a
  # float32 mean of equal values can be off by one ulp, which would turn 0/0 into inf).
  const_a = jnp.all(a == a[..., :1], axis=-1)
  const_b = jnp.all(b == b[..., :1], axis=-1)
  ma = jnp.where(const_a, a[..., 0], a.mean(axis=-1))
  mb = jnp.where(const_b, b[..., 0], b.mean(axis=-1))
  va = jnp.where(const_a, 0.0, a.var(axis=-1, ddof=1) / na)
  vb = jnp.where(const_b, 0.0, b.var(axis=-1, ddof=1) / nb)
  se2 = va + vb
  diff = ma - mb
  degenerate = se2 <= 0
  safe_se2 = jnp.where(degenerate, 1.0, se2)
  t = jnp.where(
    degenerate,
    jnp.where(diff == 0, 0.0, jnp.sign(diff) * jnp.inf),
    diff / jnp.sqrt(safe_se2),
  )
  df_den = va**2 / (na - 1) + vb**2 / (nb - 1)
  df = jnp.where(degenerate, 1.0, safe_se2**2 / jnp.where(degenerate, 1.0, df_den))
  t_fin = jnp.where(degenerate, 0.0, t)
  p = jax.scipy.special.betainc(0.5 * df, 0.5, df / (df + t_fin**2))
  p = jnp.where(degenerate, jnp.where(diff == 0, 1.0, 0.0), jnp.clip(p, 0.0, 1.0))
  return t, p


def permutation_test(
  a: ArrayLike,
  b: ArrayLike,
  *,
  key: jax.Array,
  num_permutations: int = 10000,
  batch_size: int = 512,
) -> jax.Array:
  """Two-sided Monte Carlo permutation test of the difference of means, along the last axis.

  Statistic ``T = mean(a) - mean(b)``.  The ``Ka + Kb`` pooled values are
  randomly re-split ``P`` times (permutation ``b`` from
  ``jax.random.fold_in(key, b)``, the same split for every leading index, i.e.
  every class); ``p = (1 + #{b : |T_b| >= |T_obs|}) / (1 + P)``, so ``p > 0``.
  Float ties are counted with a tolerance of ``1e-5 (|T_obs| + max|z - mean(z)|)``
  (``z`` the pooled values), so rounding never breaks an exact tie.
  Permutations are processed ``batch_size`` at a time (vmapped, ``lax.map``
  over chunks); each chunk is one ``(..., K) @ (K, batch)`` product.

  Args:
    a: ``(..., Ka)`` (e.g. ``(C, Ka)``), b: ``(..., Kb)``; ``Ka, Kb >= 1``.
    key: ``jax.random`` key.
    num_permutations: ``P``.
    batch_size: permutations evaluated at once.

  Returns:
    p-values of shape ``(...)``.
  """
  a, b = _check_pair(a, b, 1)
  return _permutation_jit(
    a,
    b,
    key,
    _check_positive_int("num_permutations", num_permutations),
    _check_positive_int("batch_size", batch_size),
  )


@functools.partial(jax.jit, static_argnames=("num_permutations", "batch_size"))
def _permutation_jit(a, b, key, num_permutations, batch_size):
  na = a.shape[-1]
  nb = b.shape[-1]
  k = na + nb
  pooled = jnp.concatenate([a, b], axis=-1)  # (..., K)
  # The statistic is shift-invariant (coefficients sum to 0): centre for less rounding.
  pooled = pooled - pooled.mean(axis=-1, keepdims=True)
  # Per permutation, coefficient +1/na for the first na slots, -1/nb for the rest.
  base = jnp.concatenate([jnp.full((na,), 1.0 / na), jnp.full((nb,), -1.0 / nb)]).astype(a.dtype)
  observed = jnp.abs(jnp.einsum("...k,k->...", pooled, base, precision=jax.lax.Precision.HIGHEST))
  # Equal statistics may differ by rounding: count |T_b| >= |T_obs| - tol.
  tol = 1e-5 * (observed + jnp.abs(pooled).max(axis=-1))
  threshold = observed - tol

  def chunk(ids):
    def coeffs(i):
      # A uniformly random split: the na pooled values with the smallest
      # uniform draws form sample a (rank = argsort of argsort).
      u = jax.random.uniform(jax.random.fold_in(key, i), (k,))
      rank = jnp.argsort(jnp.argsort(u))
      return base[rank]

    cmat = jax.vmap(coeffs)(ids)  # (batch, K)
    stats = jnp.einsum("...k,bk->b...", pooled, cmat, precision=jax.lax.Precision.HIGHEST)
    return (jnp.abs(stats) >= threshold).astype(jnp.int32)  # (batch, ...)

  hits = _chunked(chunk, num_permutations, batch_size).sum(axis=0)
  return (1.0 + hits) / (1.0 + num_permutations)


def benjamini_hochberg(p_values: ArrayLike, q: float = 0.05) -> tuple[jax.Array, jax.Array]:
  """Benjamini--Hochberg step-up FDR control along the last axis.

  ``p_adj_(i) = min_{j >= i} min(1, m p_(j) / j)`` on the ascending-sorted
  p-values (sort, scale, reverse cumulative min, unsort); ``rejected = p_adj <= q``.
  Equals ``scipy.stats.false_discovery_control(p, method='bh')``.

  Args:
    p_values: ``(..., m)`` p-values (no NaN: a NaN would propagate through the
      cumulative minimum; the tests in this module never return NaN).
    q: target false discovery rate in ``(0, 1)``.

  Returns:
    ``(rejected, p_adjusted)``: bool and float arrays of shape ``(..., m)``.
  """
  q = float(q)
  if not 0.0 < q < 1.0:
    raise ValueError(f"q must lie in (0, 1), got {q!r}")
  p = _float(p_values)
  if p.ndim < 1:
    raise ValueError(f"p_values must have at least one axis, got shape {p.shape}")
  adjusted = _bh_jit(p)
  return adjusted <= q, adjusted


@jax.jit
def _bh_jit(p):
  m = p.shape[-1]
  order = jnp.argsort(p, axis=-1)
  sorted_p = jnp.take_along_axis(p, order, axis=-1)
  scaled = sorted_p * m / jnp.arange(1, m + 1, dtype=p.dtype)
  adj_sorted = jnp.minimum(jax.lax.cummin(scaled, axis=p.ndim - 1, reverse=True), 1.0)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(adj_sorted, inverse, axis=-1)


def per_class_accuracy(
  labels: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Per-class accuracy (recall) ``acc_c = M[c, c] / sum_j M[c, j]`` of each model.

  Args:
    labels: ``(n,)`` true classes.
    predictions: ``(n,)`` or ``(K, n)`` (a population of K models).
    num_classes: ``C`` (static).
    weights: optional ``(n,)`` 0/1 example weights.

  Returns:
    ``(C,)`` or ``(K, C)`` float32; a class absent from the labels gets 0.0
    (the confusion module's zero-denominator rule).
  """
  cm = confusion_matrix(labels, predictions, _check_num_classes(num_classes), weights)
  return _safe_div(jnp.diagonal(cm, axis1=-2, axis2=-1), cm.sum(axis=-1))


class ClasswiseSignificance(NamedTuple):
  """Per-class tests of ``compared`` vs ``reference`` accuracies (all ``(C,)`` unless noted).

  Attributes:
    mean_difference: ``mean_k acc_compared - mean_k acc_reference``.
    welch_t, welch_p: Welch's t statistic (positive = compared higher) and p-value.
    welch_p_adjusted, welch_rejected: Benjamini--Hochberg over the ``C`` classes.
    permutation_p: two-sided permutation-test p-values.
    permutation_p_adjusted, permutation_rejected: Benjamini--Hochberg on those.
    fraction_significant_welch, fraction_significant_permutation: scalars,
      fraction of classes rejected at level ``q``.

  String keys work too: ``result['welch_p']``.
  """

  mean_difference: jax.Array
  welch_t: jax.Array
  welch_p: jax.Array
  welch_p_adjusted: jax.Array
  welch_rejected: jax.Array
  permutation_p: jax.Array
  permutation_p_adjusted: jax.Array
  permutation_rejected: jax.Array
  fraction_significant_welch: jax.Array
  fraction_significant_permutation: jax.Array

  def __getitem__(self, key):  # type: ignore[override]
    if isinstance(key, str):
      if key not in self._fields:
        raise KeyError(
          f"{key!r} is not a field of ClasswiseSignificance; fields are {self._fields}"
        )
      return getattr(self, key)
    return tuple.__getitem__(self, key)


def classwise_significance(
  reference_acc: ArrayLike,
  compared_acc: ArrayLike,
  *,
  key: jax.Array,
  q: float = 0.05,
  num_permutations: int = 10000,
) -> ClasswiseSignificance:
  """Which classes' accuracy changed significantly between two seed populations.

  Per class ``c``: Welch's t-test and a permutation test (difference of means)
  of ``compared_acc[:, c]`` vs ``reference_acc[:, c]``, each followed by
  Benjamini--Hochberg over the ``C`` classes at FDR ``q``
  (docs/metrics.md, "Significance of class-wise changes").

  Args:
    reference_acc: ``(K_ref, C)`` per-model per-class accuracies of the
      reference population (e.g. from :func:`per_class_accuracy`), ``K_ref >= 2``.
    compared_acc: ``(K, C)`` of the compared population, ``K >= 2``.
    key: ``jax.random`` key for the permutation test.
    q: FDR level.
    num_permutations: permutations per class.

  Returns:
    :class:`ClasswiseSignificance`.
  """
  ref = _float(reference_acc)
  cmp = _float(compared_acc).astype(ref.dtype)
  if ref.ndim != 2 or cmp.ndim != 2 or ref.shape[1] != cmp.shape[1]:
    raise ValueError(
      f"reference_acc and compared_acc must be (K_ref, C) and (K, C), got {ref.shape} "
      f"and {cmp.shape}"
    )
  a, b = cmp.T, ref.T  # (C, K), (C, K_ref)
  t, p = welch_t_test(a, b)
  w_rej, w_adj = benjamini_hochberg(p, q)
  perm_p = permutation_test(a, b, key=key, num_permutations=num_permutations)
  p_rej, p_adj = benjamini_hochberg(perm_p, q)
  return ClasswiseSignificance(
    mean_difference=a.mean(axis=-1) - b.mean(axis=-1),
    welch_t=t,
    welch_p=p,
    welch_p_adjusted=w_adj,
    welch_rejected=w_rej,
    permutation_p=perm_p,
    permutation_p_adjusted=p_adj,
    permutation_rejected=p_rej,
    fraction_significant_welch=w_rej.mean(),
    fraction_significant_permutation=p_rej.mean(),
  )
