"""Statistics: bootstrap intervals, correlations, class-wise and per-seed significance tests.

See docs/metrics.md ("Class-wise significance", "Bootstrap intervals", "Correlation of
similarity with bias").  Two kinds of code live here:

* **Host code calling SciPy** wherever SciPy computes the statistic itself: the t-tests
  (``scipy.stats.ttest_ind(equal_var=False)``, ``ttest_rel``), the permutation test
  (``scipy.stats.permutation_test``), Benjamini--Hochberg
  (``scipy.stats.false_discovery_control``), the sign test (``binomtest``), the Wilcoxon
  signed-rank test (``wilcoxon``) and the t-interval over seeds (``scipy.stats.t``).  These
  run on a handful of numbers (per-class accuracies of a few models, one value per seed), so
  a reviewer can check them against the SciPy documentation; they take and return NumPy
  (float64) arrays and Python scalars.
* **Jitted jnp** only where a statistic is evaluated on many resamples: the bootstrap
  (:func:`bootstrap_ci`, its BCa jackknife, the correlation and cluster bootstraps).
  Resamples are processed in chunks (``jax.lax.map`` over chunks of ``batch_size``,
  ``jax.vmap`` inside a chunk), so memory grows with ``batch_size``, never with the number
  of resamples, and a statistic such as CEV over 10^4 test examples runs on the accelerator.
  :func:`pearson`, :func:`spearman` and :func:`partial_correlation` are jnp for the same
  reason (they are the bootstrapped statistics); the tests check them against
  ``scipy.stats.pearsonr`` / ``spearmanr``.

Random numbers: bootstrap resample ``b`` is drawn from ``jax.random.fold_in(key, b)``, so
results depend only on ``key`` and the number of resamples -- not on ``batch_size`` -- and
:func:`bootstrap_indices` returns exactly the index sets :func:`bootstrap_ci` uses (and,
with ``num_examples`` = the number of clusters, the clusters a cluster bootstrap draws).
SciPy's random permutations are seeded with a NumPy generator built from
``jax.random.bits(key)``: deterministic in ``key``.

Formulas:

* **Bootstrap** (``B`` resamples with replacement, ``T`` the full-data statistic, ``T*_b``
  the resampled ones, NaN resamples left out, ``alpha = (1 - conf) / 2``):

  - *percentile*: ``[perc_alpha(T*), perc_{1-alpha}(T*)]`` (linear interpolation, NumPy's
    default);
  - *basic*: ``[2 T - perc_{1-alpha}(T*), 2 T - perc_alpha(T*)]``;
  - *BCa* (Efron 1987; as ``scipy.stats.bootstrap(method='BCa')``):
    ``z0 = Phi^-1((#{T*_b < T} + #{T*_b <= T}) / (2 B))`` (ties count half),
    acceleration ``a = sum_g d_g^3 / (6 (sum_g d_g^2)^{3/2})`` with
    ``d_g = mean_h T_(h) - T_(g)`` over jackknife values ``T_(g)`` (the statistic without
    example ``g``, or without group ``g`` of a grouped jackknife when ``n`` is large), and
    the bounds are ``perc_{a1}(T*)``, ``perc_{a2}(T*)`` with
    ``a1 = Phi(z0 + (z0 + z_alpha) / (1 - a (z0 + z_alpha)))``, ``a2`` likewise with
    ``z_{1-alpha}``.

* **Pearson** ``r = sum w dx dy / sqrt(sum w dx^2 sum w dy^2)`` (``dx = x - weighted
  mean``; ``w = 1`` unless a cluster bootstrap weights points by how often their cluster was
  drawn); **Spearman** ``rho`` = Pearson of the average ranks (ties get the mean of the ranks
  they span).  Constant input gives NaN.
* **Partial correlation** ``r_xy.z`` = Pearson of the residuals of ``x`` and ``y`` after
  least squares on ``[1, z]`` (Spearman: ranks of ``x``, ``y`` and each column of ``z``
  first).  For one covariate it equals
  ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))``.
* **Welch's t-test** ``t = (m_a - m_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` (ddof=1),
  Welch--Satterthwaite df; **paired** ``t = mean(d) / (s_d / sqrt(K))``, ``d = a - b``.
* **Permutation test** of ``T = mean(a) - mean(b)`` (independent: re-split the pooled
  values; paired: flip the signs of the pair differences), SciPy's two-sided p-value
  ``p = min(1, 2 min(P(T_perm <= T_obs), P(T_perm >= T_obs)))``: over all splits when
  there are at most ``num_permutations`` of them (exact), otherwise over
  ``num_permutations`` random ones with the observed split counted once,
  ``P(...) = (1 + #{b : ...}) / (1 + num_permutations)``.
* **Benjamini--Hochberg**: with sorted ``p_(1) <= ... <= p_(m)``,
  ``p_adj_(i) = min_{j >= i} min(1, m p_(j) / j)``; hypothesis ``i`` is rejected iff
  ``p_adj_i <= q``.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats

from prunebias_jax.metrics.bias import _check_choice  # one string-option check for all metrics
from prunebias_jax.metrics.confusion import _check_num_classes, _safe_div, confusion_matrix

__all__ = [
  "BOOTSTRAP_METHODS",
  "CORRELATION_METHODS",
  "JACKKNIFE_GROUPS",
  "ClasswiseSignificance",
  "PairedTestResult",
  "benjamini_hochberg",
  "bootstrap_ci",
  "bootstrap_indices",
  "classwise_significance",
  "correlation_ci",
  "min_attainable_permutation_p",
  "partial_correlation",
  "partial_correlation_ci",
  "pearson",
  "per_class_accuracy",
  "per_class_normalized_recall",
  "permutation_test",
  "seed_interval",
  "sign_test",
  "spearman",
  "welch_t_test",
  "wilcoxon_signed_rank",
]

ArrayLike = Any

CORRELATION_METHODS: tuple[str, ...] = ("pearson", "spearman")
BOOTSTRAP_METHODS: tuple[str, ...] = ("percentile", "basic", "bca")
# BCa acceleration: leave-one-out jackknife up to this many examples, beyond it a grouped
# (delete-a-group) jackknife over this many groups (see bootstrap_ci).
JACKKNIFE_GROUPS: int = 2000


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


def _check_q(q: float) -> float:
  q = float(q)
  if not 0.0 < q < 1.0:
    raise ValueError(f"q must lie in (0, 1), got {q!r}")
  return q


def _float(x: ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _host(x: ArrayLike) -> np.ndarray:
  """A float64 NumPy copy (the SciPy-backed tests run on the host)."""
  return np.asarray(x, dtype=np.float64)


def _host_rng(key: jax.Array) -> np.random.Generator:
  """A NumPy generator seeded deterministically from a ``jax.random`` key (raw or typed)."""
  return np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)).tolist())


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
  that :func:`bootstrap_ci` uses with the same ``key`` (and, with ``num_examples`` = the
  number of clusters, the clusters that :func:`correlation_ci` draws with ``clusters``).
  """
  return _bootstrap_indices_jit(
    key,
    _check_positive_int("num_examples", num_examples),
    _check_positive_int("num_resamples", num_resamples),
  )


def _bootstrap_indices_jit(key, num_examples, num_resamples):
  return _resample_indices(key, jnp.arange(num_resamples), num_examples)


# jax.jit by assignment, not as a decorator: mutation testing reaches only undecorated
# bodies (docs/mutation.md).
_bootstrap_indices_jit = jax.jit(
  _bootstrap_indices_jit, static_argnames=("num_examples", "num_resamples")
)


def _chunked(fn: Callable[[jax.Array], jax.Array], total: int, batch_size: int) -> jax.Array:
  """``fn(ids)`` for ``ids = 0..total-1`` in chunks of ``batch_size`` (lax.map over chunks).

  ``fn`` maps a ``(batch,)`` int array of ids to a pytree-free array with
  leading axis ``batch``; the result is ``(total, ...)``.
  """
  batch = min(batch_size, total)
  num_chunks = -(-total // batch)
  out = jax.lax.map(lambda c: fn(c * batch + jnp.arange(batch)), jnp.arange(num_chunks))
  return out.reshape((num_chunks * batch,) + out.shape[2:])[:total]


def _take_all(arrays, axes, idx):
  return tuple(jnp.take(a, idx, axis=ax) for a, ax in zip(arrays, axes))


def _bootstrap_distribution_jit(
  statistic_fn, arrays, key, num_resamples, batch_size, axes, num_examples
) -> tuple[jax.Array, jax.Array]:
  estimate = jnp.asarray(statistic_fn(*arrays))

  def stat_of(idx):
    return jnp.asarray(statistic_fn(*_take_all(arrays, axes, idx)))

  def chunk(ids):
    return jax.vmap(stat_of)(_resample_indices(key, ids, num_examples))

  return estimate, _chunked(chunk, num_resamples, batch_size)


_bootstrap_distribution_jit = jax.jit(
  _bootstrap_distribution_jit,
  static_argnames=("statistic_fn", "num_resamples", "batch_size", "axes", "num_examples"),
)


def _jackknife_jit(statistic_fn, arrays, batch_size, axes, num_examples, num_groups) -> jax.Array:
  """``(G, ...)`` statistics with group ``g = {i : i mod G = g}`` left out (``G = n``: LOO).

  The ``n - |g|`` kept positions of group ``g`` are, for ``k = 0 .. n-|g|-1``,
  ``i = (k // (G-1)) G + r + [r >= g]`` with ``r = k mod (G-1)`` (the other ``G - 1``
  residues of each block of ``G``): no mask, no loop.  Groups ``0 .. n mod G - 1`` hold one
  example more than the rest, so the two sizes are two vmapped passes.
  """
  n, g_total = num_examples, num_groups
  small, extra = divmod(n, g_total)

  def pass_for(first, count, size):
    k = jnp.arange(n - size)
    block, rem = k // (g_total - 1), k % (g_total - 1)

    def stat_without(g):
      idx = block * g_total + rem + (rem >= g)
      return jnp.asarray(statistic_fn(*_take_all(arrays, axes, idx)))

    return _chunked(lambda ids: jax.vmap(stat_without)(first + ids), count, batch_size)

  parts = [pass_for(extra, g_total - extra, small)]
  if extra:
    parts.insert(0, pass_for(0, extra, small + 1))
  return jnp.concatenate(parts, axis=0)


_jackknife_jit = jax.jit(
  _jackknife_jit,
  static_argnames=("statistic_fn", "batch_size", "axes", "num_examples", "num_groups"),
)


def _percentile_interval(samples: jax.Array, confidence: float) -> tuple[jax.Array, jax.Array]:
  alpha = 100.0 * (1.0 - confidence) / 2.0
  low = jnp.nanpercentile(samples, alpha, axis=0)
  high = jnp.nanpercentile(samples, 100.0 - alpha, axis=0)
  return low, high


def _nan_quantile(samples: jax.Array, probs: jax.Array) -> jax.Array:
  """Per-component quantile ``probs[...]`` (in [0, 1]) of the finite ``samples[:, ...]``.

  NumPy's default ('linear') rule on the non-NaN entries: position ``p (B_f - 1)`` in the
  sorted values, linear interpolation.  NaN where ``probs`` is NaN or no entry is finite.
  """
  ordered = jnp.sort(samples, axis=0)  # NaN sorts last
  num_finite = jnp.sum(~jnp.isnan(samples), axis=0)
  pos = jnp.clip(probs, 0.0, 1.0) * jnp.maximum(num_finite - 1, 0)
  pos = jnp.where(jnp.isnan(pos), 0.0, pos)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(num_finite - 1, 0))
  v_lo = jnp.take_along_axis(ordered, lo[None], axis=0)[0]
  v_hi = jnp.take_along_axis(ordered, hi[None], axis=0)[0]
  out = v_lo + (pos - lo) * (v_hi - v_lo)
  return jnp.where((num_finite > 0) & ~jnp.isnan(probs), out, jnp.nan)


def _bca_interval(estimate, samples, jackknife, confidence):
  """BCa bounds from the bootstrap and jackknife distributions (Efron & Tibshirani, 14.3)."""
  dtype = samples.dtype
  finite = ~jnp.isnan(samples)
  num_finite = finite.sum(axis=0)
  below = jnp.sum(finite & (samples < estimate), axis=0)
  at_or_below = jnp.sum(finite & (samples <= estimate), axis=0)
  frac = (below + at_or_below) / (2.0 * jnp.maximum(num_finite, 1))
  # All resamples on one side of the estimate: z0 = +-inf, no BCa interval.
  z0 = jnp.where((frac > 0) & (frac < 1), jax.scipy.special.ndtri(frac), jnp.nan)

  jk_ok = ~jnp.isnan(jackknife)
  jk_mean = jnp.nanmean(jackknife, axis=0)
  d = jnp.where(jk_ok, jk_mean - jackknife, 0.0)
  num = jnp.sum(d**3, axis=0)
  den = jnp.sum(d**2, axis=0)
  # A statistic the jackknife does not move has no measurable skewness: a = 0.
  accel = jnp.where(den > 0, num / (6.0 * jnp.where(den > 0, den, 1.0) ** 1.5), 0.0)

  z_alpha = float(scipy.special.ndtri((1.0 - confidence) / 2.0))  # static: host
  probs = []
  for z in (z_alpha, -z_alpha):
    s = z0 + z
    probs.append(jax.scipy.special.ndtr(z0 + s / (1.0 - accel * s)).astype(dtype))
  return _nan_quantile(samples, probs[0]), _nan_quantile(samples, probs[1])


_bca_interval = jax.jit(_bca_interval, static_argnames=("confidence",))


def bootstrap_ci(
  statistic_fn: Callable[..., jax.Array],
  *arrays: ArrayLike,
  key: jax.Array,
  num_resamples: int = 1000,
  confidence: float = 0.95,
  batch_size: int = 32,
  axes: int | Sequence[int] = 0,
  method: str = "percentile",
  jackknife_groups: int = JACKKNIFE_GROUPS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bootstrap confidence interval of ``statistic_fn(*arrays)`` (percentile, basic or BCa).

  Examples are resampled with replacement (the same indices for every
  array, so pairs stay paired); ``T*_b = statistic_fn(*(a[idx_b] for a in
  arrays))`` is evaluated with ``jax.vmap`` over ``batch_size`` resamples at a
  time and ``jax.lax.map`` over the chunks, so at most ``batch_size``
  resampled copies of the data (and of ``statistic_fn``'s intermediates) are
  alive at once.  Resamples whose statistic is NaN are ignored; if all are NaN the
  bounds are NaN.  With ``alpha = (1 - conf) / 2``:

  * ``method='percentile'`` (default): ``[perc_alpha(T*), perc_{1-alpha}(T*)]``.
  * ``method='basic'`` (reverse percentile):
    ``[2 T - perc_{1-alpha}(T*), 2 T - perc_alpha(T*)]``.  It corrects a shift of the
    bootstrap distribution: statistics such as CEV (a variance of noisy per-class
    changes) or a max over classes are biased upward under resampling, so their
    percentile interval can lie entirely above the full-data estimate.
  * ``method='bca'`` (bias-corrected and accelerated, Efron 1987; the rule of
    ``scipy.stats.bootstrap(method='BCa')``): percentiles ``a1``, ``a2`` of ``T*`` with
    ``a1,2 = Phi(z0 + (z0 + z) / (1 - a (z0 + z)))``, ``z = z_alpha, z_{1-alpha}``.
    Bias correction ``z0 = Phi^-1(F)`` with ``F`` the fraction of (non-NaN) resamples
    below ``T``, ties counted half (SciPy's rule); ``z0`` is undefined, and the bounds
    NaN, when every resample lies on one side of ``T``.  Acceleration
    ``a = sum d^3 / (6 (sum d^2)^{3/2})``, ``d_g = mean(T_(.)) - T_(g)``, from a
    jackknife computed with the same jitted, vmapped and chunked machinery: for
    ``n <= jackknife_groups`` leave-one-out (``n`` evaluations, SciPy's jackknife);
    for larger ``n`` a grouped (delete-a-group) jackknife over ``G = jackknife_groups``
    groups ``{i : i mod G = g}``, each evaluation leaving out about ``n / G`` examples.
    The ratio defining ``a`` is scale-free, so the grouped jackknife estimates the same
    acceleration (for the mean both give ``skewness / (6 sqrt(n))``), with a sampling
    error that grows as ``G`` shrinks (``G = 2000`` keeps it near leave-one-out's); it
    caps the cost at ``G`` evaluations (leave-one-out on ``10^4`` test examples would be ``10^4``
    evaluations of ``n`` examples each).  The groups are strided, not random: on a test
    set stored class by class each group is a near-stratified sample, and the choice
    does not depend on ``key``.  NaN jackknife values are left out; ``a = 0`` if the
    jackknife values are all equal.  BCa needs ``n >= 2``.

  ``statistic_fn`` must be traceable (it runs under ``jit``/``vmap``) and
  hashable (it is a static argument: pass the *same* object to reuse the
  compiled code).  For ``'bca'`` it must also accept ``n - 1`` (or ``n - n/G``)
  examples.  Bind keyword-only options and static sizes with
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
    batch_size: resamples (and jackknife evaluations) evaluated at once (memory ~
      ``batch_size`` copies).
    axes: example axis of each array (one int for all, or one per array);
      e.g. ``1`` for ``(K, n)`` population predictions.
    method: ``'percentile'`` (default), ``'basic'`` or ``'bca'``.
    jackknife_groups: ``'bca'`` only: leave-one-out jackknife up to this many examples,
      a grouped jackknife over this many groups beyond (default
      :data:`JACKKNIFE_GROUPS` = 2000; at least 2).

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
  _check_choice("method", method, BOOTSTRAP_METHODS)
  batch_size = _check_positive_int("batch_size", batch_size)
  groups = _check_positive_int("jackknife_groups", jackknife_groups)
  if method == "bca" and (n < 2 or groups < 2):
    raise ValueError(
      f"method='bca' needs n >= 2 examples and jackknife_groups >= 2, got {n} and {groups}"
    )
  estimate, samples = _bootstrap_distribution_jit(
    statistic_fn,
    arrays,
    key,
    _check_positive_int("num_resamples", num_resamples),
    batch_size,
    axes_t,
    _check_positive_int("num_examples", n),
  )
  if method == "bca":
    jack = _jackknife_jit(statistic_fn, arrays, batch_size, axes_t, n, min(n, groups))
    low, high = _bca_interval(estimate, samples, jack, confidence)
    return estimate, low, high
  low, high = _percentile_interval(samples, confidence)
  if method == "basic":
    low, high = 2 * estimate - high, 2 * estimate - low
  return estimate, low, high


# --------------------------------------------------------------------------
# Correlation
# --------------------------------------------------------------------------


def _check_xy(x: ArrayLike, y: ArrayLike) -> tuple[jax.Array, jax.Array]:
  x = _float(x)
  y = _float(y).astype(x.dtype)
  if x.shape != y.shape or x.ndim < 1:
    raise ValueError(f"x and y must have the same shape (..., n), got {x.shape} and {y.shape}")
  return x, y


def pearson(x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Pearson ``r = sum dx dy / sqrt(sum dx^2 sum dy^2)`` along the last axis.

  ``x`` and ``y`` have shape ``(..., n)``; returns ``(...)``.  NaN if either is
  constant.  The result is clipped to ``[-1, 1]``.  Equals ``scipy.stats.pearsonr``'s
  statistic (checked in the tests); jnp because :func:`correlation_ci` evaluates it on
  every bootstrap resample.
  """
  return _pearson_jit(*_check_xy(x, y))


def _pearson_jit(x, y):
  return _weighted_pearson(x, y, jnp.ones_like(x))


_pearson_jit = jax.jit(_pearson_jit)


def _weighted_pearson(x, y, w):
  """Pearson of the points weighted by ``w >= 0`` (= Pearson of ``w_i`` copies of point i).

  NaN if ``x`` or ``y`` is constant over the points of positive weight (tested exactly:
  the float mean of equal values can be off by one ulp, which would give a spurious r).
  """
  sw = jnp.sum(w, axis=-1, keepdims=True)
  mx = jnp.sum(w * x, axis=-1, keepdims=True) / sw
  my = jnp.sum(w * y, axis=-1, keepdims=True) / sw
  dx = x - mx
  dy = y - my
  # Normalise each first: the products cannot overflow.
  nx = jnp.sqrt(jnp.sum(w * dx * dx, axis=-1, keepdims=True))
  ny = jnp.sqrt(jnp.sum(w * dy * dy, axis=-1, keepdims=True))
  r = jnp.sum(w * (dx / nx) * (dy / ny), axis=-1)
  return jnp.where(_constant(x, w) | _constant(y, w), jnp.nan, jnp.clip(r, -1.0, 1.0))


def _constant(x, w):
  """Whether ``x`` takes one value over the entries of positive weight (last axis)."""
  live = w > 0
  hi = jnp.max(jnp.where(live, x, -jnp.inf), axis=-1)
  lo = jnp.min(jnp.where(live, x, jnp.inf), axis=-1)
  return hi <= lo


def _weighted_ranks(x, w):
  """Average ranks along the last axis of ``w_i`` copies of each ``x_i``.

  With ``L`` the weight of entries ``< v`` and ``R`` of entries ``<= v``, the copies of
  ``v`` occupy ranks ``L+1 .. R``: mean ``(L + R + 1) / 2``.  ``L`` and ``R`` come from
  cumulative weights at two ``searchsorted`` positions of the sorted values.  ``w = 1``
  gives the usual average ranks (``scipy.stats.rankdata``).
  """

  def one(v, wv):
    order = jnp.argsort(v)
    s = v[order]
    cum = jnp.concatenate([jnp.zeros((1,), wv.dtype), jnp.cumsum(wv[order])])
    left = cum[jnp.searchsorted(s, v, side="left")]
    right = cum[jnp.searchsorted(s, v, side="right")]
    return (left + right + 1.0) / 2.0

  shape = x.shape
  w = jnp.broadcast_to(w, shape).astype(x.dtype)
  flat = jax.vmap(one)(x.reshape((-1, shape[-1])), w.reshape((-1, shape[-1])))
  return flat.reshape(shape)


def _average_ranks(x: jax.Array) -> jax.Array:
  """1-based ranks along the last axis, ties replaced by the mean rank of their run."""
  return _weighted_ranks(x, jnp.ones_like(x))


def spearman(x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Spearman ``rho`` = Pearson correlation of the average ranks (ties averaged).

  Along the last axis of ``(..., n)`` arrays; NaN if either is constant.  Equals
  ``scipy.stats.spearmanr``'s statistic; jnp for the bootstrap, like :func:`pearson`.
  """
  return _spearman_jit(*_check_xy(x, y))


def _spearman_jit(x, y):
  return _pearson_jit(_average_ranks(x), _average_ranks(y))


_spearman_jit = jax.jit(_spearman_jit)


# Weighted statistics of the cluster bootstrap: fn(*arrays, w) with w (n,) point weights.
def _w_pearson(x, y, w):
  return _weighted_pearson(x, y, w)


def _w_spearman(x, y, w):
  return _weighted_pearson(_weighted_ranks(x, w), _weighted_ranks(y, w), w)


def _w_partial(x, y, z, w, rank: bool):
  """Partial correlation of ``x, y`` given the columns of ``z`` (n, p), points weighted by w.

  Weighted least squares on ``[1, z]``: centring on the weighted means removes the
  intercept, the slopes solve the centred problem with rows scaled by ``sqrt(w)``
  (``lstsq``, so a rank-deficient ``z`` is fine).  A column of ``z`` constant over the
  live points is set to exactly zero (it explains nothing; rounding would otherwise leave
  a noise column).
  """
  if rank:
    x = _weighted_ranks(x, w)
    y = _weighted_ranks(y, w)
    z = _weighted_ranks(z.T, w).T
  sw = jnp.sum(w)
  zc = z - (w @ z) / sw
  zc = jnp.where(jax.vmap(_constant, in_axes=(1, None))(z, w)[None, :], 0.0, zc)
  xy = jnp.stack([x, y], axis=1)
  xyc = xy - (w @ xy) / sw
  sq = jnp.sqrt(w)[:, None]
  beta = jnp.linalg.lstsq(sq * zc, sq * xyc)[0]
  resid = xyc - zc @ beta
  r = _weighted_pearson(resid[:, 0], resid[:, 1], w)
  # x or y (numerically) a linear function of z: the residual is rounding noise.
  tol = 100 * jnp.finfo(x.dtype).eps
  explained = jnp.sqrt(w @ resid**2) <= tol * jnp.sqrt(w @ xyc**2)
  undefined = _constant(x, w) | _constant(y, w) | jnp.any(explained)
  return jnp.where(undefined, jnp.nan, r)


def _w_partial_pearson(x, y, z, w):
  return _w_partial(x, y, z, w, rank=False)


def _w_partial_spearman(x, y, z, w):
  return _w_partial(x, y, z, w, rank=True)


def _partial_pearson(x, y, z):
  return _w_partial(x, y, z, jnp.ones_like(x), rank=False)


def _partial_spearman(x, y, z):
  return _w_partial(x, y, z, jnp.ones_like(x), rank=True)


_PARTIAL = {"pearson": (_partial_pearson, _w_partial_pearson)}
_PARTIAL["spearman"] = (_partial_spearman, _w_partial_spearman)
_PARTIAL_JIT = {name: jax.jit(fns[0]) for name, fns in _PARTIAL.items()}
_CORR = {"pearson": (pearson, _w_pearson), "spearman": (spearman, _w_spearman)}


def _check_clusters(clusters: ArrayLike, n: int) -> tuple[jax.Array, int]:
  """Cluster ids (any ints) -> ``(inverse (n,) in 0..G-1 by sorted id, G)``."""
  ids = np.asarray(clusters)
  if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"clusters must be ({n},) integer ids, got {ids.dtype} {ids.shape}")
  uniq, inverse = np.unique(ids, return_inverse=True)
  return jnp.asarray(inverse.reshape(n), jnp.int32), int(uniq.size)


def _cluster_bootstrap_jit(
  statistic_fn, arrays, inverse, key, num_resamples, batch_size, num_clusters
) -> tuple[jax.Array, jax.Array]:
  """Cluster bootstrap: resample ``b`` draws ``G`` clusters with replacement.

  The draws of resample ``b`` are ``bootstrap_indices(key, G, B)[b]``; a point's weight
  is the number of times its cluster was drawn, which for these statistics equals
  evaluating them on the concatenation of the drawn clusters.
  """
  dtype = arrays[0].dtype
  estimate = statistic_fn(*arrays, jnp.ones(inverse.shape, dtype))

  def chunk(ids):
    draws = _resample_indices(key, ids, num_clusters)  # (batch, G)
    counts = jax.vmap(lambda d: jnp.zeros((num_clusters,), dtype).at[d].add(1.0))(draws)
    return jax.vmap(lambda c: statistic_fn(*arrays, c[inverse]))(counts)

  return estimate, _chunked(chunk, num_resamples, batch_size)


_cluster_bootstrap_jit = jax.jit(
  _cluster_bootstrap_jit,
  static_argnames=("statistic_fn", "num_resamples", "batch_size", "num_clusters"),
)


def _correlation_bootstrap(
  fns, arrays, clusters, key, num_resamples, confidence, batch_size
) -> tuple[jax.Array, jax.Array, jax.Array]:
  point_fn, weighted_fn = fns
  if clusters is None:
    return bootstrap_ci(
      point_fn,
      *arrays,
      key=key,
      num_resamples=num_resamples,
      confidence=confidence,
      batch_size=batch_size,
    )
  inverse, num_clusters = _check_clusters(clusters, arrays[0].shape[0])
  estimate, samples = _cluster_bootstrap_jit(
    weighted_fn,
    arrays,
    inverse,
    key,
    _check_positive_int("num_resamples", num_resamples),
    _check_positive_int("batch_size", batch_size),
    num_clusters,
  )
  low, high = _percentile_interval(samples, _check_confidence(confidence))
  return estimate, low, high


def correlation_ci(
  x: ArrayLike,
  y: ArrayLike,
  *,
  method: str = "pearson",
  key: jax.Array,
  num_resamples: int = 2000,
  confidence: float = 0.95,
  batch_size: int = 256,
  clusters: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Correlation of paired points ``(x_i, y_i)`` with a bootstrap percentile interval.

  Without ``clusters`` the ``n`` pairs are resampled with replacement
  (:func:`bootstrap_ci`).  With ``clusters`` (one integer id per point, e.g. the cell of
  each model) the bootstrap resamples whole clusters: each resample draws ``G`` of the
  ``G`` clusters with replacement and keeps all points of each drawn cluster (the
  correlation is evaluated with each point weighted by its cluster's draw count, the same
  as on the concatenated points).  Points of one cell share masks and sparsity, so they
  are not independent; resampling points then understates the uncertainty.

  A resample in which ``x`` or ``y`` is constant (likely for small ``n`` or few clusters)
  has an undefined correlation (NaN) and is left out of the percentiles
  (``nanpercentile``), so the interval is conditional on non-degenerate resamples.

  Args:
    x, y: ``(n,)`` paired values (e.g. CKA and CEV of each compared model).
    method: ``'pearson'`` or ``'spearman'``.
    key: ``jax.random`` key.
    num_resamples: ``B``.
    confidence: in ``(0, 1)``.
    batch_size: resamples evaluated at once.
    clusters: optional ``(n,)`` integer cluster ids.

  Returns:
    ``(r, low, high)``.
  """
  _check_choice("method", method, CORRELATION_METHODS)
  x = _float(x)
  y = _float(y).astype(x.dtype)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
  return _correlation_bootstrap(
    _CORR[method], (x, y), clusters, key, num_resamples, confidence, batch_size
  )


def _check_xyz(x, y, z) -> tuple[jax.Array, jax.Array, jax.Array]:
  x = _float(x)
  y = _float(y).astype(x.dtype)
  z = _float(z).astype(x.dtype)
  if z.ndim == 1:
    z = z[:, None]
  if x.ndim != 1 or x.shape != y.shape or z.ndim != 2 or z.shape[0] != x.shape[0]:
    raise ValueError(
      f"x, y must be (n,) and z (n,) or (n, p); got {x.shape}, {y.shape} and {z.shape}"
    )
  return x, y, z


def partial_correlation(
  x: ArrayLike, y: ArrayLike, z: ArrayLike, method: str = "pearson"
) -> jax.Array:
  """Partial correlation ``r_xy.z`` of ``x`` and ``y`` controlling for ``z``.

  The residuals of ``x`` and of ``y`` after least squares on ``[1, z]``, then their
  Pearson correlation.  ``method='spearman'`` replaces ``x``, ``y`` and each column of
  ``z`` by their average ranks first (partial Spearman).  For one covariate this equals
  ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))``.  Use it to ask whether
  similarity relates to bias beyond what accuracy explains (``z`` = accuracy).  NaN if
  ``x`` or ``y`` is constant, or if either is a linear function of ``z`` (residual norm
  below ``100 eps`` times the centred norm).

  Args:
    x, y: ``(n,)``.
    z: ``(n,)`` or ``(n, p)`` covariates.
    method: ``'pearson'`` or ``'spearman'``.

  Returns:
    A scalar jax array.
  """
  _check_choice("method", method, CORRELATION_METHODS)
  return _PARTIAL_JIT[method](*_check_xyz(x, y, z))


def partial_correlation_ci(
  x: ArrayLike,
  y: ArrayLike,
  z: ArrayLike,
  *,
  method: str = "pearson",
  key: jax.Array,
  num_resamples: int = 2000,
  confidence: float = 0.95,
  batch_size: int = 256,
  clusters: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`partial_correlation` with a bootstrap percentile interval.

  Points (or, with ``clusters``, whole clusters) are resampled exactly as in
  :func:`correlation_ci`; ``(x_i, y_i, z_i)`` stay together.

  Returns:
    ``(r, low, high)``.
  """
  _check_choice("method", method, CORRELATION_METHODS)
  return _correlation_bootstrap(
    _PARTIAL[method], _check_xyz(x, y, z), clusters, key, num_resamples, confidence, batch_size
  )


# --------------------------------------------------------------------------
# Tests for class-wise changes (host, SciPy)
# --------------------------------------------------------------------------


def _host_pair(a: ArrayLike, b: ArrayLike, min_size: int, paired: bool = False):
  a = _host(a)
  b = _host(b)
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
  if paired and a.shape[-1] != b.shape[-1]:
    raise ValueError(
      f"paired samples need the same number of values (pairs), got {a.shape[-1]} and {b.shape[-1]}"
    )
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ValueError("a and b must be finite")
  return a, b


def _t_test(a: np.ndarray, b: np.ndarray, paired: bool) -> tuple[np.ndarray, np.ndarray]:
  """Welch (``ttest_ind(equal_var=False)``) or paired (``ttest_rel``) t-test, last axis.

  Degenerate rows (both samples constant, or constant pair differences; tested exactly)
  are decided here -- ``t = 0, p = 1`` for a zero difference, ``t = +-inf, p = 0``
  otherwise -- and the rest go to SciPy.  Rows where one sample is constant get SciPy's
  usual result; its "Precision loss" warning (a mean of equal floats off by one ulp) is
  silenced for those rows only.
  """
  lead = a.shape[:-1]
  a2 = a.reshape((-1, a.shape[-1]))
  b2 = b.reshape((-1, b.shape[-1]))
  const_a = np.all(a2 == a2[:, :1], axis=-1)
  const_b = np.all(b2 == b2[:, :1], axis=-1)
  if paired:
    d = a2 - b2
    degenerate = np.all(d == d[:, :1], axis=-1)
    diff = d[:, 0]
    one_constant = (const_a | const_b) & ~degenerate
  else:
    degenerate = const_a & const_b
    diff = a2[:, 0] - b2[:, 0]
    one_constant = (const_a | const_b) & ~degenerate
  t = np.where(diff == 0, 0.0, np.copysign(np.inf, diff))
  p = np.where(diff == 0, 1.0, 0.0)
  test = (
    scipy.stats.ttest_rel if paired else functools.partial(scipy.stats.ttest_ind, equal_var=False)
  )
  for rows, quiet in ((~degenerate & ~one_constant, False), (one_constant, True)):
    if not rows.any():
      continue
    with warnings.catch_warnings():
      if quiet:
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
      res = test(a2[rows], b2[rows], axis=-1)
    t[rows] = res.statistic
    p[rows] = res.pvalue
  return t.reshape(lead), p.reshape(lead)


def welch_t_test(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """Two-sided Welch's t-test of ``mean(a) != mean(b)`` along the last axis (SciPy).

  ``scipy.stats.ttest_ind(a, b, axis=-1, equal_var=False)``:
  ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` with sample variances
  (ddof=1), Welch--Satterthwaite degrees of freedom, ``p = 2 P(T_df > |t|)``.

  **Zero variance in both samples** (each sample constant, detected exactly; SciPy would
  return NaN for equal constants): ``t = 0, p = 1`` if the two constants are equal,
  ``t = +-inf, p = 0`` otherwise (the limit of the formula; with 2--3 models per side a
  "significant" difference between two constant samples is fragile evidence).  If only
  one sample has zero variance the usual formulas apply.

  Args:
    a: ``(..., Ka)`` values, e.g. ``(C, Ka)`` per-class accuracies of ``Ka`` models.
    b: ``(..., Kb)`` with the same leading axes; ``Ka, Kb >= 2``.

  Returns:
    ``(t, p)``, float64 NumPy arrays of shape ``(...)``.
  """
  a, b = _host_pair(a, b, 2)
  return _t_test(a, b, paired=False)


def _tie_safe_mean_difference(scale: np.ndarray, paired: bool):
  """``mean(x) - mean(y)`` (vectorised, SciPy's ``axis`` convention), rounded to
  ``1e-9 scale`` so that splits with mathematically equal statistics compare equal."""

  def statistic(x, y, axis):
    t = np.mean(x - y, axis=axis) if paired else np.mean(x, axis=axis) - np.mean(y, axis=axis)
    return np.round(t / scale, 9) * scale

  return statistic


def permutation_test(
  a: ArrayLike,
  b: ArrayLike,
  *,
  key: jax.Array,
  num_permutations: int = 10000,
  batch_size: int = 512,
  paired: bool = False,
) -> np.ndarray:
  """Two-sided permutation test of the difference of means along the last axis (SciPy).

  ``scipy.stats.permutation_test`` with ``T = mean(a) - mean(b)``,
  ``alternative='two-sided'`` and ``n_resamples=num_permutations``:

  * independent (``permutation_type='independent'``): the ``Ka + Kb`` pooled values are
    re-split into samples of sizes ``Ka`` and ``Kb``;
  * ``paired=True`` (``permutation_type='samples'``, ``Ka == Kb``, the ``k``-th values
    form a pair): the two values of each pair are swapped, i.e. the signs of the pair
    differences are flipped.

  SciPy enumerates all distinct splits (``C(Ka+Kb, Ka)``, or ``2^K`` sign patterns) when
  there are at most ``num_permutations`` of them -- the exact p-value -- and otherwise
  draws ``num_permutations`` random ones (seeded from ``key``, deterministic; the same for
  every leading index, i.e. every class).  Its two-sided p-value is
  ``min(1, 2 min(P_less, P_greater))`` with ``P_less = #{T_perm <= T_obs} / N`` (exact,
  ``N`` splits) or ``(1 + #{...}) / (1 + num_permutations)`` (random).  See
  :func:`min_attainable_permutation_p` for the smallest value this can take.

  The statistic is rounded to ``1e-9`` times the spread of the pooled values (per leading
  index), so two splits with mathematically equal means never differ by rounding.  Equal
  samples (all pooled values equal) give ``p = 1``.

  Args:
    a: ``(..., Ka)`` (e.g. ``(C, Ka)``), b: ``(..., Kb)``; ``Ka, Kb >= 1``.
    key: ``jax.random`` key (used only when the test is not exact).
    num_permutations: ``P``.
    batch_size: permutations SciPy evaluates at once (``batch``).
    paired: sign-flip test of paired samples.

  Returns:
    float64 p-values of shape ``(...)``.
  """
  a, b = _host_pair(a, b, 1, paired=paired)
  num_permutations = _check_positive_int("num_permutations", num_permutations)
  pooled = np.concatenate([a, b], axis=-1)
  centre = pooled.mean(axis=-1, keepdims=True)  # T is shift-invariant: centre for rounding
  a, b = a - centre, b - centre
  scale = np.abs(pooled - centre).max(axis=-1)
  scale = np.where(scale > 0, scale, 1.0)
  res = scipy.stats.permutation_test(
    (a, b),
    _tie_safe_mean_difference(scale, paired),
    permutation_type="samples" if paired else "independent",
    vectorized=True,
    n_resamples=num_permutations,
    batch=_check_positive_int("batch_size", batch_size),
    alternative="two-sided",
    axis=-1,
    rng=_host_rng(key),
  )
  return np.asarray(res.pvalue, dtype=np.float64)


def min_attainable_permutation_p(
  k_compared: int, k_reference: int, *, num_permutations: int, paired: bool = False
) -> tuple[float, bool]:
  """Smallest two-sided p-value :func:`permutation_test` can return, and whether it is exact.

  * Exact (all ``N`` splits enumerated, ``N <= num_permutations``): ``2 / N``, the observed
    split being the single most extreme one (distinct values), with
    ``N = C(K + K_ref, K)`` -- 1/3 for 2 vs 2, 1/10 for 3 vs 3, 1/35 for 4 vs 4 -- or
    ``N = 2^K`` paired -- 1/2 for K = 2, 1/4 for K = 3, 1/8 for K = 4.
  * Random: SciPy counts the observed statistic among the resamples, so
    ``P_less, P_greater >= 1 / (1 + P)`` and ``p >= 2 / (1 + P)`` (reached when no random
    split is as extreme as the observed one); here ``N > P`` so this is ``>= 2 / N``.

  Capped at 1.  Ties make the attainable minimum larger, never smaller.

  Returns:
    ``(min_p, exact)``.
  """
  k_a = _check_positive_int("k_compared", k_compared)
  k_b = _check_positive_int("k_reference", k_reference)
  num_permutations = _check_positive_int("num_permutations", num_permutations)
  if paired and k_a != k_b:
    raise ValueError(f"paired samples need k_compared == k_reference, got {k_a} and {k_b}")
  total = 2**k_a if paired else math.comb(k_a + k_b, k_a)
  exact = total <= num_permutations
  return min(1.0, 2.0 / (total if exact else num_permutations + 1)), exact


def benjamini_hochberg(p_values: ArrayLike, q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
  """Benjamini--Hochberg step-up FDR control along the last axis (SciPy).

  ``p_adj = scipy.stats.false_discovery_control(p, axis=-1, method='bh')``, i.e.
  ``p_adj_(i) = min_{j >= i} min(1, m p_(j) / j)`` on the ascending-sorted p-values;
  ``rejected = p_adj <= q`` (the same as the step-up rule "reject the ``k`` smallest,
  ``k = max{i : p_(i) <= i q / m}``").

  Args:
    p_values: ``(..., m)`` p-values in ``[0, 1]`` (no NaN).
    q: target false discovery rate in ``(0, 1)``.

  Returns:
    ``(rejected, p_adjusted)``: bool and float64 NumPy arrays of shape ``(..., m)``.
  """
  q = _check_q(q)
  p = _host(p_values)
  if p.ndim < 1:
    raise ValueError(f"p_values must have at least one axis, got shape {p.shape}")
  adjusted = np.asarray(scipy.stats.false_discovery_control(p, axis=-1, method="bh"))
  return adjusted <= q, adjusted


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


def per_class_normalized_recall(
  labels: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Per-class recall minus the model's overall accuracy (Hooker et al.'s normalisation).

  ``r_c - acc`` with ``r_c = M[c, c] / sum_j M[c, j]`` and ``acc = sum_c M[c, c] /
  sum M``, per model.  A uniform accuracy drop leaves it unchanged, so a class-wise test
  on it asks whether a class changed *disproportionately*, not merely with the overall
  drop.  A class absent from the labels gets 0.0 (no recall to compare).

  Args:
    labels: ``(n,)`` true classes.
    predictions: ``(n,)`` or ``(K, n)``.
    num_classes: ``C`` (static).
    weights: optional ``(n,)`` 0/1 example weights.

  Returns:
    ``(C,)`` or ``(K, C)`` float32.
  """
  cm = confusion_matrix(labels, predictions, _check_num_classes(num_classes), weights)
  support = cm.sum(axis=-1)
  correct = jnp.diagonal(cm, axis1=-2, axis2=-1)
  recall = _safe_div(correct, support)
  overall = _safe_div(correct.sum(axis=-1), support.sum(axis=-1))
  return jnp.where(support > 0, recall - overall[..., None], 0.0)


class ClasswiseSignificance(NamedTuple):
  """Per-class tests of ``compared`` vs ``reference`` values (all ``(C,)`` unless noted).

  Attributes:
    mean_difference: ``mean_k compared - mean_k reference``.
    welch_t, welch_p: t statistic (positive = compared higher) and p-value: Welch's
      test, or the paired t-test when ``paired=True`` (the names are kept for records).
    welch_p_adjusted, welch_rejected: Benjamini--Hochberg over the ``C`` classes.
    permutation_p: two-sided permutation-test p-values.
    permutation_p_adjusted, permutation_rejected: Benjamini--Hochberg on those.
    fraction_significant_welch, fraction_significant_permutation: floats,
      fraction of classes rejected at level ``q``.
    min_attainable_p: float, the smallest p-value the permutation test can give at
      these sizes (:func:`min_attainable_permutation_p`).
    exact: bool, whether the permutation test enumerated all splits.
    can_reject: bool, whether BH at ``q`` could reject any class with the permutation
      test at all (``min_attainable_p <= q``, see :func:`classwise_significance`).

  String keys work too: ``result['welch_p']``.  Arrays are float64/bool NumPy arrays.
  """

  mean_difference: np.ndarray
  welch_t: np.ndarray
  welch_p: np.ndarray
  welch_p_adjusted: np.ndarray
  welch_rejected: np.ndarray
  permutation_p: np.ndarray
  permutation_p_adjusted: np.ndarray
  permutation_rejected: np.ndarray
  fraction_significant_welch: float
  fraction_significant_permutation: float
  min_attainable_p: float
  exact: bool
  can_reject: bool

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
  paired: bool = False,
) -> ClasswiseSignificance:
  """Which classes' accuracy changed significantly between two seed populations.

  Per class ``c``, on ``compared_acc[:, c]`` vs ``reference_acc[:, c]`` (docs/metrics.md,
  "Class-wise significance"):

  * a t-test: Welch's (``scipy.stats.ttest_ind(equal_var=False)``), or with
    ``paired=True`` the paired t-test (``scipy.stats.ttest_rel``; ``K_ref == K``, row
    ``k`` of both arrays is a pair, e.g. a student and the dense model of the same seed);
  * a permutation test of the difference of means (:func:`permutation_test`:
    ``scipy.stats.permutation_test``, independent re-splits or paired sign flips, exact
    when there are at most ``num_permutations`` splits, otherwise random splits seeded
    from ``key``);
  * each followed by Benjamini--Hochberg over the ``C`` classes at FDR ``q``
    (``scipy.stats.false_discovery_control``).

  **Can the permutation test reject at all?**  Every permutation p-value is at least
  ``m = min_attainable_p``.  The BH-adjusted p-values are ``min_{j >= i} C p_(j) / j >=
  p_(1) >= m``, and they equal ``m`` when all ``C`` classes reach ``m`` (``C m / C``).
  So the rule is ``can_reject = (m <= q)``: if ``m > q`` no class can ever be rejected
  whatever the data (with 2 vs 2 models ``m = 1/3``, with 3 vs 3 ``m = 1/10``); if
  ``m <= q`` a rejection is possible in the best case.  A *single* class changing while
  the other ``C - 1`` do not needs ``C m <= q`` (its adjusted p is ``C p_(1)``), which is
  far stricter: 4 vs 4 models (``m = 1/35``) pass ``q = 0.05`` only when at least
  ``C m / q ~ 0.57 C`` classes are at the minimum.

  Constant samples: see :func:`welch_t_test` (``p = 1`` for equal constants, ``p = 0``
  for different ones) and :func:`permutation_test` (``p = 1`` when all values are equal;
  two different constant samples give the most extreme split, ``p = min_attainable_p``
  when exact).

  Args:
    reference_acc: ``(K_ref, C)`` per-model per-class values of the reference population
      (e.g. from :func:`per_class_accuracy` or :func:`per_class_normalized_recall`),
      ``K_ref >= 2``.
    compared_acc: ``(K, C)`` of the compared population, ``K >= 2``.
    key: ``jax.random`` key for the permutation test (unused when it is exact).
    q: FDR level in ``(0, 1)``.
    num_permutations: permutations per class (``n_resamples``).
    paired: paired tests (``K_ref == K``).

  Returns:
    :class:`ClasswiseSignificance`.
  """
  ref = _host(reference_acc)
  cmp = _host(compared_acc)
  if ref.ndim != 2 or cmp.ndim != 2 or ref.shape[1] != cmp.shape[1]:
    raise ValueError(
      f"reference_acc and compared_acc must be (K_ref, C) and (K, C), got {ref.shape} "
      f"and {cmp.shape}"
    )
  q = _check_q(q)
  a, b = _host_pair(cmp.T, ref.T, 2, paired=paired)  # (C, K), (C, K_ref)
  t, p = _t_test(a, b, paired=paired)
  w_rej, w_adj = benjamini_hochberg(p, q)
  perm_p = permutation_test(a, b, key=key, num_permutations=num_permutations, paired=paired)
  p_rej, p_adj = benjamini_hochberg(perm_p, q)
  min_p, exact = min_attainable_permutation_p(
    a.shape[1], b.shape[1], num_permutations=num_permutations, paired=paired
  )
  return ClasswiseSignificance(
    mean_difference=a.mean(axis=-1) - b.mean(axis=-1),
    welch_t=t,
    welch_p=p,
    welch_p_adjusted=w_adj,
    welch_rejected=w_rej,
    permutation_p=perm_p,
    permutation_p_adjusted=p_adj,
    permutation_rejected=p_rej,
    fraction_significant_welch=float(w_rej.mean()),
    fraction_significant_permutation=float(p_rej.mean()),
    min_attainable_p=min_p,
    exact=exact,
    can_reject=bool(min_p <= q),
  )


# --------------------------------------------------------------------------
# Per-seed tests (host, SciPy): paired differences over seeds, intervals over seeds
# --------------------------------------------------------------------------


class PairedTestResult(NamedTuple):
  """A two-sided test of paired differences.

  Attributes:
    statistic: :func:`sign_test`: the number of positive differences;
      :func:`wilcoxon_signed_rank`: SciPy's two-sided statistic ``min(W+, W-)``.
    pvalue: two-sided p-value (NaN without a non-zero difference).
    num_nonzero: differences left after dropping zeros.
  """

  statistic: float
  pvalue: float
  num_nonzero: int


def _nonzero_differences(differences: ArrayLike) -> np.ndarray:
  d = _host(differences)
  if d.ndim != 1:
    raise ValueError(f"differences must be 1-D (one per seed), got shape {d.shape}")
  if not np.isfinite(d).all():
    raise ValueError("differences must be finite (drop seeds whose value is undefined first)")
  return d[d != 0]


def sign_test(differences: ArrayLike) -> PairedTestResult:
  """Two-sided exact sign test of paired differences (e.g. CE - KD CEV per seed).

  Zeros are dropped; with ``n`` non-zero differences of which ``k`` are positive,
  ``p = scipy.stats.binomtest(k, n, 0.5, alternative='two-sided').pvalue`` (exact
  binomial; SciPy's two-sided rule sums the outcomes no more likely than ``k``).  The
  smallest attainable p is ``2 / 2^n``.  NaN p-value when every difference is zero.
  """
  d = _nonzero_differences(differences)
  n = int(d.size)
  if n == 0:
    return PairedTestResult(float("nan"), float("nan"), 0)
  k = int(np.sum(d > 0))
  res = scipy.stats.binomtest(k, n, 0.5, alternative="two-sided")
  return PairedTestResult(float(k), float(res.pvalue), n)


def wilcoxon_signed_rank(differences: ArrayLike) -> PairedTestResult:
  """Two-sided Wilcoxon signed-rank test of paired differences (SciPy).

  Zeros are dropped first (Wilcoxon's rule), then
  ``scipy.stats.wilcoxon(d, alternative='two-sided', method='auto')``: SciPy's exact null
  distribution for up to 50 differences without ties, an exact enumeration of the
  ``2^n`` sign flips for up to 13 with ties, the normal approximation otherwise.  With a
  single non-zero difference ``p = 1``; with none the p-value is NaN (SciPy would raise).
  """
  d = _nonzero_differences(differences)
  n = int(d.size)
  if n == 0:
    return PairedTestResult(float("nan"), float("nan"), 0)
  res = scipy.stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
  return PairedTestResult(float(res.statistic), float(res.pvalue), n)


def seed_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
  """Mean over seeds with its Student-t interval ``mean +- t_{(1+conf)/2, n-1} s / sqrt(n)``.

  ``s`` is the sample standard deviation (ddof=1) and the quantile
  ``scipy.stats.t.ppf``; the same as ``scipy.stats.t.interval(conf, n - 1, mean,
  s / sqrt(n))``.  This measures seed-to-seed variability (unlike the bootstrap over test
  examples).  With fewer than 2 values the bounds are NaN (and the mean too with none).

  Args:
    values: ``(n,)`` finite values, one per seed.
    confidence: in ``(0, 1)``.

  Returns:
    ``(mean, low, high)`` as floats.
  """
  confidence = _check_confidence(confidence)
  v = _host(values)
  if v.ndim != 1:
    raise ValueError(f"values must be 1-D (one per seed), got shape {v.shape}")
  if not np.isfinite(v).all():
    raise ValueError("values must be finite (drop seeds whose value is undefined first)")
  n = int(v.size)
  if n == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(v.mean())
  if n < 2:
    return mean, float("nan"), float("nan")
  half = float(scipy.stats.t.ppf((1.0 + confidence) / 2.0, n - 1) * v.std(ddof=1) / math.sqrt(n))
  return mean, mean - half, mean + half
