"""Similarity of two models from sums accumulated batch by batch: linear CKA, debiased CKA and
SVCCA without ever holding an ``n x d`` feature matrix.

An evaluation pass adds each batch's features ``x_i`` (model X) and ``y_i`` (model Y) of the
same examples into ``d x d`` sums (``similarity_stats_update``, traceable: it runs inside the
jitted evaluation step), and the metrics are computed once at the end on the host in float64
from those sums alone (``*_from_stats``). Every row ``i`` with weight ``w_i`` in {0, 1}
(padding and examples outside a subset get 0) contributes, with ``x~_i = x_i - shift_x``,
``a_i = ||x~_i||^2`` and ``b_i = ||y~_i||^2``:

    count   = sum w_i              sum_x = sum w_i x~_i          sum_y = sum w_i y~_i
    xx      = sum w_i x~_i x~_i^T  yy    = sum w_i y~_i y~_i^T   xy    = sum w_i x~_i y~_i^T
    sq_x    = sum w_i a_i          sq_y  = sum w_i b_i
    sq_xy   = sum w_i a_i b_i      sq_xx = sum w_i a_i^2         sq_yy = sum w_i b_i^2
    x_by_a  = sum w_i a_i x~_i     x_by_b = sum w_i b_i x~_i
    y_by_a  = sum w_i a_i y~_i     y_by_b = sum w_i b_i y~_i

From them (all sums, so they add over batches, devices and hosts):

* centred (co)variances ``C_xy = xy - sum_x sum_y^T / count`` (and ``C_xx``, ``C_yy``), so
  linear CKA ``= ||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F)``;
* the unbiased HSIC of Song et al. (2012) with ``K = X~ X~^T`` (``~``: zeroed diagonal):
  ``tr(K~ L~) = ||xy||_F^2 - sq_xy``, ``1^T K~ 1 = ||sum_x||^2 - sq_x``,
  ``1^T K~ L~ 1 = sum_x^T xy sum_y - sum_x . y_by_a ... `` (see ``_unbiased_hsic``); HSIC_1 is
  invariant to shifting the features, so the shift changes only the rounding;
* SVCCA: the thin SVD ``X = U S V^T`` has ``S^2`` and ``V`` the eigenpairs of ``X^T X`` (the
  uncentred Gram ``xx + shift sum_x^T + sum_x shift^T + count shift shift^T`` for the anatome
  rule, ``C_xx`` for the centred rule), and the canonical correlations of ``X V_k`` and
  ``Y W_k`` are the singular values of ``Wx^T C_xy Wy``, ``Wx`` whitening ``V_k^T C_xx V_k``.

Numerics. ``shift`` is the first batch's mean, so the sums are of nearly centred rows and
``C = xx - sum sum^T / count`` does not cancel even for features with a large common offset
(a one-pass ``X^T X - n m m^T`` would lose ``log10(|m|^2 / var)`` digits). Each batch's
products are float32 (error at most ``gamma_m sum_i |x~_i||y~_i|`` for ``m`` rows a device
holds); the batch sums are added with Kahan's compensated summation, which keeps the
accumulation error at ``2u sum |terms|`` however many batches there are (plain float32
addition would add ``u`` per batch). The metrics then run in float64. Against a float64
two-pass computation: linear CKA within ``1e-5`` relative, SVCCA within ``2e-5`` on the demo's
features (tests: ``test_metrics_streaming.py``).

Devices. ``partials = P > 1`` keeps one set of sums per device: a batch whose rows are sharded
over ``P`` devices is reshaped to ``(P, m, d)`` and each device adds its own rows, so no
cross-device traffic happens per batch; ``similarity_stats_total`` adds the partials once at
the end (one reduction per sum).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

__all__ = [
  "SimilarityStats",
  "cka_matrix_from_stats",
  "debiased_cka_from_stats",
  "linear_cka_from_stats",
  "similarity_stats",
  "similarity_stats_init",
  "similarity_stats_total",
  "similarity_stats_update",
  "svcca_from_stats",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class SimilaritySums(NamedTuple):
  """The additive sums of the module docstring (a leading axis of partials while streaming)."""

  count: Any
  sum_x: Any
  sum_y: Any
  xx: Any
  yy: Any
  xy: Any
  sq_x: Any
  sq_y: Any
  sq_xy: Any
  sq_xx: Any
  sq_yy: Any
  x_by_a: Any
  x_by_b: Any
  y_by_a: Any
  y_by_b: Any


class SimilarityStats(NamedTuple):
  """Everything the similarity metrics need of a pair of feature streams."""

  shift_x: Any  # (dx,) subtracted from every row of X before it is summed
  shift_y: Any  # (dy,)
  sums: SimilaritySums
  compensation: SimilaritySums  # Kahan's running low-order error of each sum


def _zero_sums(dx: int, dy: int, lead: tuple[int, ...], dtype: Any) -> SimilaritySums:
  z = lambda *shape: jnp.zeros(lead + shape, dtype)
  return SimilaritySums(
    z(), z(dx), z(dy), z(dx, dx), z(dy, dy), z(dx, dy), z(), z(), z(), z(), z(), z(dx), z(dx)
    , z(dy), z(dy)
  )  # fmt: skip


def similarity_stats_init(
  dim_x: int, dim_y: int, partials: int = 1, dtype: Any = jnp.float32
) -> SimilarityStats:
  """Empty sums for features of sizes ``dim_x``, ``dim_y`` (memory ``O((dx + dy)^2)`` per
  partial); ``partials``: one set per device the rows of a batch are sharded over."""
  if partials < 1:
    raise ValueError(f"partials must be at least 1, got {partials}")
  lead = (partials,)
  zeros = _zero_sums(dim_x, dim_y, lead, dtype)
  return SimilarityStats(jnp.zeros(dim_x, dtype), jnp.zeros(dim_y, dtype), zeros, zeros)


def _batch_sums(x: jax.Array, y: jax.Array, w: jax.Array) -> SimilaritySums:
  """The sums of one device's rows: x (m, dx), y (m, dy), w (m,)."""
  a = jnp.sum(x * x, axis=1)
  b = jnp.sum(y * y, axis=1)
  xw, yw = x * w[:, None], y * w[:, None]
  dot = lambda p, q: jnp.matmul(p, q, precision=_HIGHEST)
  return SimilaritySums(
    count=jnp.sum(w),
    sum_x=jnp.sum(xw, axis=0),
    sum_y=jnp.sum(yw, axis=0),
    xx=dot(xw.T, x),
    yy=dot(yw.T, y),
    xy=dot(xw.T, y),
    sq_x=jnp.sum(w * a),
    sq_y=jnp.sum(w * b),
    sq_xy=jnp.sum(w * a * b),
    sq_xx=jnp.sum(w * a * a),
    sq_yy=jnp.sum(w * b * b),
    x_by_a=dot(w * a, x),
    x_by_b=dot(w * b, x),
    y_by_a=dot(w * a, y),
    y_by_b=dot(w * b, y),
  )


def similarity_stats_update(
  stats: SimilarityStats, x: jax.Array, y: jax.Array, weights: jax.Array | None = None
) -> SimilarityStats:
  """Adds one batch: ``x`` (n, dx) and ``y`` (n, dy) features of the same n examples, optional
  (n,) 0/1 ``weights``. Traceable (call it inside the jitted step). With P partials, n must
  divide by P: row block j of the batch (device j's rows when the batch is sharded over P
  devices in order) goes into partial j."""
  x = x.reshape(x.shape[0], -1).astype(stats.shift_x.dtype) - stats.shift_x
  y = y.reshape(y.shape[0], -1).astype(stats.shift_y.dtype) - stats.shift_y
  n, p = x.shape[0], stats.sums.count.shape[0]
  if n % p:
    raise ValueError(f"a batch of {n} rows does not split over {p} partials")
  w = jnp.ones((n,), x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
  split = lambda a: a.reshape((p, n // p) + a.shape[1:])
  batch = jax.vmap(_batch_sums)(split(x), split(y), split(w))

  def kahan(total, comp, term):
    term = term - comp
    new = total + term
    return new, (new - total) - term

  pairs = [kahan(*t) for t in zip(stats.sums, stats.compensation, batch)]
  return stats._replace(
    sums=SimilaritySums(*(s for s, _ in pairs)),
    compensation=SimilaritySums(*(c for _, c in pairs)),
  )


def with_shift(
  stats: SimilarityStats, x: jax.Array, y: jax.Array, weights: jax.Array | None = None
) -> SimilarityStats:
  """``stats`` with the shifts set to the weighted column means of this batch (of nothing
  added yet: call it on the first batch). Traceable."""
  x = x.reshape(x.shape[0], -1).astype(stats.shift_x.dtype)
  y = y.reshape(y.shape[0], -1).astype(stats.shift_y.dtype)
  w = jnp.ones((x.shape[0],), x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
  total = jnp.maximum(jnp.sum(w), 1.0)
  return stats._replace(shift_x=(w @ x) / total, shift_y=(w @ y) / total)


def similarity_stats_total(stats: SimilarityStats) -> SimilarityStats:
  """The partials added into one (the one cross-device reduction) and the compensations folded
  in: a stats value with no partial axis. Traceable."""
  total = jax.tree.map(lambda s, c: jnp.sum(s, axis=0) - jnp.sum(c, axis=0), *stats[2:])
  zero = jax.tree.map(jnp.zeros_like, total)
  return SimilarityStats(stats.shift_x, stats.shift_y, SimilaritySums(*total), zero)


def similarity_stats(
  features_x: Any,
  features_y: Any,
  batch_size: int = 4096,
  weights: Any | None = None,
  dtype: Any = jnp.float32,
) -> SimilarityStats:
  """The totals of in-memory features streamed in batches of ``batch_size`` rows (the shift
  from the first batch): what an evaluation pass accumulates, for arrays already in memory.
  A JAX array is sliced where it lives (no copy to the host); NumPy rows go to the default
  device one batch at a time."""
  rows = lambda a: a if isinstance(a, jax.Array) else np.asarray(a)
  x, y = rows(features_x), rows(features_y)
  x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"features_x has {x.shape[0]} rows and features_y {y.shape[0]}")
  if x.shape[0] == 0:
    raise ValueError("no examples to compare")
  w = np.ones(x.shape[0], np.float32) if weights is None else rows(weights)
  stats = similarity_stats_init(x.shape[1], y.shape[1], dtype=dtype)
  first = slice(0, batch_size)
  stats = _with_shift_jit(stats, x[first], y[first], w[first])
  for start in range(0, x.shape[0], batch_size):
    batch = slice(start, start + batch_size)
    # Waited for: dispatch is asynchronous, and every queued call would hold its own copy
    # of a NumPy batch (the whole input, for a fast loop).
    stats = jax.block_until_ready(_update_jit(stats, x[batch], y[batch], w[batch]))
  return jax.device_get(_total_jit(stats))


_update_jit = jax.jit(similarity_stats_update)
_with_shift_jit = jax.jit(with_shift)
_total_jit = jax.jit(similarity_stats_total)


# ------------------------------------------------------------------------------ host metrics
def _f64(stats: SimilarityStats) -> tuple[np.ndarray, np.ndarray, SimilaritySums]:
  """(shift_x, shift_y, sums) in float64 NumPy; the stats must be totals (no partial axis)."""
  if np.ndim(stats.sums.count):
    raise ValueError("stats still have a partial axis: use similarity_stats_total first")
  to = lambda a: np.asarray(a, np.float64)
  return to(stats.shift_x), to(stats.shift_y), SimilaritySums(*(to(s) for s in stats.sums))


def _centred(s: SimilaritySums) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(C_xx, C_yy, C_xy): the centred (co)variance sums."""
  n = s.count
  return (
    s.xx - np.outer(s.sum_x, s.sum_x) / n,
    s.yy - np.outer(s.sum_y, s.sum_y) / n,
    s.xy - np.outer(s.sum_x, s.sum_y) / n,
  )


def linear_cka_from_stats(stats: SimilarityStats) -> float:
  """Linear CKA ``||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F)`` (0.0 when either side is constant,
  as ``linear_cka``)."""
  _, _, s = _f64(stats)
  if s.count <= 0:
    return float("nan")
  cxx, cyy, cxy = _centred(s)
  tx, ty = np.trace(cxx), np.trace(cyy)  # scale first (CKA is scale-free) against overflow
  if not (tx > 0 and ty > 0):
    return 0.0
  cxx, cyy, cxy = cxx / tx, cyy / ty, cxy / np.sqrt(tx * ty)
  denominator = np.linalg.norm(cxx) * np.linalg.norm(cyy)
  return float(np.sum(cxy * cxy) / denominator) if denominator > 0 else 0.0


def cka_matrix_from_stats(
  stats: SimilarityStats, dims_x: list[int], dims_y: list[int]
) -> np.ndarray:
  """Linear CKA of every pair of layers, ``(len(dims_x), len(dims_y))``, from the sums of the
  concatenated layers ``X = [X_1 ... X_a]`` (widths ``dims_x``) and ``Y = [Y_1 ... Y_b]``: entry
  ``(i, j)`` is ``||C_{x_i y_j}||_F^2 / (||C_{x_i x_i}||_F ||C_{y_j y_j}||_F)`` from the blocks
  of the centred (co)variances (0.0 where a layer is constant, as ``linear_cka``)."""
  _, _, s = _f64(stats)
  if sum(dims_x) != s.xx.shape[0] or sum(dims_y) != s.yy.shape[0]:
    raise ValueError(f"layer widths {dims_x}, {dims_y} do not add up to {s.xy.shape}")
  cxx, cyy, cxy = _centred(s)
  edges = lambda dims: np.concatenate([[0], np.cumsum(dims)]).astype(int)
  ex, ey = edges(dims_x), edges(dims_y)
  bx = [slice(ex[i], ex[i + 1]) for i in range(len(dims_x))]
  by = [slice(ey[j], ey[j + 1]) for j in range(len(dims_y))]
  scale_x = [np.trace(cxx[b, b]) for b in bx]  # scale each layer first (CKA is scale-free)
  scale_y = [np.trace(cyy[b, b]) for b in by]
  norm_x = [np.linalg.norm(cxx[b, b]) / t if t > 0 else 0.0 for b, t in zip(bx, scale_x)]
  norm_y = [np.linalg.norm(cyy[b, b]) / t if t > 0 else 0.0 for b, t in zip(by, scale_y)]
  out = np.zeros((len(bx), len(by)))
  for i, (b1, t1, n1) in enumerate(zip(bx, scale_x, norm_x)):
    for j, (b2, t2, n2) in enumerate(zip(by, scale_y, norm_y)):
      if n1 > 0 and n2 > 0:
        block = cxy[b1, b2] / np.sqrt(t1 * t2)
        out[i, j] = np.sum(block * block) / (n1 * n2)
  return out


# Relative size (in float32 epsilons: the sums are float32) below which an unbiased self-HSIC
# is rounding noise, not signal (as `debiased_linear_cka` in float32).
_CANCEL_TOL = 64.0 * float(np.finfo(np.float32).eps)


def _unbiased_hsic(
  xy_sq: float, s_ab: float, sx: np.ndarray, sy: np.ndarray, sa: float, sb: float,
  sx_xy_sy: float, sx_yb: float, sy_xa: float, n: float,
) -> tuple[float, float]:  # fmt: skip
  """``(n (n-3) HSIC_1, the summed size of its terms)`` from sums (see the module docstring):

      n (n-3) HSIC_1 = tr(K~L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1

  with ``tr(K~ L~) = ||X^T Y||_F^2 - sum a b``, ``1^T K~ 1 = ||s_x||^2 - sum a`` and
  ``1^T K~ L~ 1 = s_x^T X^T Y s_y - s_x . sum_i b_i x_i - s_y . sum_i a_i y_i + sum a b``
  (``s_x^T X^T Y s_y`` etc. passed in precomputed)."""
  trace = xy_sq - s_ab
  k1 = float(sx @ sx) - sa
  l1 = float(sy @ sy) - sb
  kl1 = sx_xy_sy - sx_yb - sy_xa + s_ab
  t2 = k1 * l1 / ((n - 1.0) * (n - 2.0))
  t3 = 2.0 / (n - 2.0) * kl1
  return trace + t2 - t3, abs(xy_sq) + abs(s_ab) + abs(t2) + abs(t3)


def debiased_cka_from_stats(stats: SimilarityStats) -> float:
  """Debiased linear CKA ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` (the estimator of
  ``debiased_linear_cka``): NaN below 4 examples or when a self-HSIC is not positive beyond
  rounding noise, 0.0 when either side is constant."""
  _, _, s = _f64(stats)
  n = float(s.count)
  if n < 4:
    return float("nan")
  cxx, cyy, _ = _centred(s)
  if not (np.trace(cxx) > 0 and np.trace(cyy) > 0):
    return 0.0
  sx, sy = s.sum_x, s.sum_y
  h_xy, _ = _unbiased_hsic(
    float(np.sum(s.xy * s.xy)), float(s.sq_xy), sx, sy, float(s.sq_x), float(s.sq_y),
    float(sx @ s.xy @ sy), float(sx @ s.x_by_b), float(sy @ s.y_by_a), n,
  )  # fmt: skip
  h_xx, m_xx = _unbiased_hsic(
    float(np.sum(s.xx * s.xx)), float(s.sq_xx), sx, sx, float(s.sq_x), float(s.sq_x),
    float(sx @ s.xx @ sx), float(sx @ s.x_by_a), float(sx @ s.x_by_a), n,
  )  # fmt: skip
  h_yy, m_yy = _unbiased_hsic(
    float(np.sum(s.yy * s.yy)), float(s.sq_yy), sy, sy, float(s.sq_y), float(s.sq_y),
    float(sy @ s.yy @ sy), float(sy @ s.y_by_b), float(sy @ s.y_by_b), n,
  )  # fmt: skip
  if not (h_xx > _CANCEL_TOL * m_xx and h_yy > _CANCEL_TOL * m_yy):
    return float("nan")
  return float(h_xy / np.sqrt(h_xx * h_yy))


_EPS32 = float(np.finfo(np.float32).eps)


def _keep_count(s: np.ndarray, threshold: float, anatome_compat: bool, tol: float) -> int:
  """The SVCCA keep rule of ``similarity._keep_count`` on descending singular values."""
  total = s.sum()
  ratio = np.cumsum(s) / (total if total > 0 else 1.0)
  below = int(np.sum(ratio < threshold))
  k = below if anatome_compat else below + 1
  rank = int(np.sum(s > tol))
  return int(np.clip(k, 1, max(rank, 1)))


def _descending_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigenpairs of the symmetric ``a``, largest first, eigenvalues clipped at 0 and square-
  rooted (the singular values of the matrix whose Gram ``a`` is)."""
  lam, vec = np.linalg.eigh((a + a.T) / 2.0)
  return np.sqrt(np.clip(lam[::-1], 0.0, None)), vec[:, ::-1]


def _whitening(
  gram: np.ndarray, cov: np.ndarray, n: float, threshold: float, anatome_compat: bool
) -> tuple[np.ndarray, int]:
  """``(W, k)``: ``X_c W`` is an orthonormal basis of the centred, SVD-reduced features (the
  basis ``similarity._reduced_basis`` builds from the data matrix), and the kept count k."""
  d = cov.shape[0]
  s, v = _descending_eigh(gram if anatome_compat else cov)
  tol = s[0] * max(n, d) * _EPS32
  k = _keep_count(s, threshold, anatome_compat, tol)
  vk = v[:, :k]
  if not anatome_compat:  # X_c V_k = U_k S_k: whiten by 1/S_k
    keep = s[:k] > 0
    return vk[:, keep] / s[:k][keep], k
  # anatome: reduce the uncentred X to X V_k, then centre it for CCA and whiten that.
  s2, e = _descending_eigh(vk.T @ cov @ vk)
  keep = s2 > s2[0] * max(n, d) * _EPS32
  return vk @ e[:, keep] / s2[keep], k


def svcca_from_stats(
  stats: SimilarityStats, *, threshold: float = 0.99, anatome_compat: bool = False
) -> float:
  """SVCCA distance ``1 - mean of the min(k_x, k_y) leading canonical correlations`` of the
  SVD-reduced features (``svcca_distance`` from the data matrices, here from the sums): NaN when
  either side has no centred variance or fewer than 2 examples."""
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  shift_x, shift_y, s = _f64(stats)
  n = float(s.count)
  cxx, cyy, cxy = _centred(s)
  if n < 2 or not (np.trace(cxx) > 0 and np.trace(cyy) > 0):
    return float("nan")

  def gram(xx, total, shift):  # the uncentred X^T X from the shifted sums
    return xx + np.outer(shift, total) + np.outer(total, shift) + n * np.outer(shift, shift)

  # One BLAS thread: LAPACK's results depend on its thread count (see similarity.py).
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    wx, kx = _whitening(gram(s.xx, s.sum_x, shift_x), cxx, n, threshold, anatome_compat)
    wy, ky = _whitening(gram(s.yy, s.sum_y, shift_y), cyy, n, threshold, anatome_compat)
    corr = np.linalg.svd(wx.T @ cxy @ wy, compute_uv=False)
  m = min(kx, ky)
  return float(1.0 - np.sum(np.clip(corr[:m], 0.0, 1.0)) / m)
