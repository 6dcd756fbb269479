"""Similarity between two models: (debiased) CKA, SVCCA and prediction agreement.

Linear CKA (Kornblith et al. 2019) in its feature-space form: with the columns
of ``X`` (n x d1) and ``Y`` (n x d2) centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),

computed with d x d matrices only (O(n d^2) time, O(d^2) memory; the n x n Gram
matrix is never formed).

Also here (see docs/metrics.md, "Model similarity"):

* :func:`debiased_linear_cka` -- HSIC replaced by the unbiased U-statistic of
  Song et al. (2012), evaluated in feature space;
* :func:`cka_matrix` -- layer x layer (debiased) linear CKA;
* :func:`streaming_linear_cka` and ``streaming_linear_cka_init/update/result``
  -- exact linear CKA from streamed batches, equal to :func:`linear_cka` on the
  concatenated data in O(d^2) memory (for evaluation sets that do not fit);
* :func:`svcca_distance` and :func:`svcca_conv_distance` -- SVCCA as used by the
  Simon Says authors (via the ``anatome`` library).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from prunebias_jax.metrics import streaming

__all__ = [
  "StreamingCKAState",
  "cka_matrix",
  "debiased_linear_cka",
  "linear_cka",
  "prediction_agreement",
  "streaming_linear_cka",
  "streaming_linear_cka_init",
  "streaming_linear_cka_result",
  "streaming_linear_cka_update",
  "svcca_conv_distance",
  "svcca_distance",
]

ArrayLike = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def _compute_dtype() -> Any:
  """float64 when ``jax_enable_x64`` is on, float32 otherwise."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _centred_unit(features: jax.Array, sqrt_w: jax.Array | None, w: jax.Array | None):
  """Weighted column-centred features scaled to unit Frobenius norm, and that norm."""
  if w is None:
    centred = features - features.mean(axis=0, keepdims=True)
  else:
    total = jnp.maximum(w.sum(), jnp.finfo(features.dtype).tiny)
    mean = (w[:, None] * features).sum(axis=0, keepdims=True) / total
    centred = (features - mean) * sqrt_w[:, None]
  # CKA is invariant to isotropic scaling: normalise first so the d x d
  # products cannot overflow for large activations.
  norm = jnp.sqrt(jnp.sum(centred * centred))
  unit = centred / jnp.where(norm > 0, norm, 1.0)
  return unit, norm


def linear_cka(
  features_x: ArrayLike,
  features_y: ArrayLike,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Linear CKA ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features.

  Args:
    features_x: ``(n, ...)`` features of model/layer X; trailing dims are
      flattened to ``(n, d1)``.
    features_y: ``(n, ...)`` features of Y (same ``n``), flattened to ``(n, d2)``.
    weights: optional ``(n,)`` 0/1 example weights; rows with weight 0 are
      ignored (weighted column means, rows scaled by ``sqrt(w)``), which
      equals dropping those rows.

  Returns:
    Scalar in ``[0, 1]``, float32 (float64 when x64 is enabled).  If either
    centred feature matrix is zero (e.g. constant features), the denominator
    vanishes and 0.0 is returned instead of NaN.

  Memory: up to ``CHUNK_ROWS`` examples, the centred matrices are formed
  (two passes, jitted).  Above that the inputs are never copied: the rows go
  through in chunks of ``CHUNK_ROWS``, each chunk centred on its own mean and
  merged into ``d x d`` sums with the pairwise update of
  :class:`StreamingCKAState` (exact up to rounding, for any mean offset), so
  the extra memory is ``O(d^2)`` plus one chunk.  On the CPU that path runs in
  the host's BLAS (NumPy, float32 products, float64 sums; XLA:CPU's matrix
  product is slower there), elsewhere in one jitted loop over the chunks.
  """
  x, y = _shapes_checked(features_x, features_y)
  n = x.shape[0]
  if n <= CHUNK_ROWS or _traced(x, y, weights):
    return _linear_cka_jit(features_x, features_y, weights)
  if _on_cpu(x) and _on_cpu(y):
    return _linear_cka_host(x, y, weights, CHUNK_ROWS)
  return _linear_cka_chunked_jit(x, y, weights, CHUNK_ROWS)


# Rows per chunk of linear_cka above which the inputs are streamed, not copied: a chunk's
# centred copies of two d = 512 float32 matrices take 2 x 32 MiB.
CHUNK_ROWS = 16384


def _shapes_checked(features_x: ArrayLike, features_y: ArrayLike) -> tuple[Any, Any]:
  """The inputs as arrays (NumPy stays NumPy, a JAX array stays on its device), their example
  axes checked; nothing is copied."""
  x = features_x if hasattr(features_x, "shape") else np.asarray(features_x)
  y = features_y if hasattr(features_y, "shape") else np.asarray(features_y)
  if x.ndim < 1 or y.ndim < 1:
    raise ValueError("features must have a leading example axis (n, ...)")
  if x.shape[0] != y.shape[0]:
    raise ValueError(
      "features_x and features_y must have the same number of examples, got "
      f"{x.shape[0]} and {y.shape[0]}"
    )
  return x, y


def _on_cpu(a: Any) -> bool:
  """Whether `a` lives in host memory: a NumPy array, or a JAX array on CPU devices."""
  if isinstance(a, jax.Array):
    return all(d.platform == "cpu" for d in a.devices())
  return jax.default_backend() == "cpu"


def _linear_cka_host(x: Any, y: Any, weights: ArrayLike | None, chunk: int) -> jax.Array:
  """`linear_cka` in chunks through the host BLAS: the pairwise update of
  `StreamingCKAState` with float64 sums and float32 (float64 under x64) products."""
  dtype = np.dtype(_compute_dtype())
  n = x.shape[0]
  x = np.asarray(x).reshape(n, -1)  # a view: a CPU JAX array is not copied
  y = np.asarray(y).reshape(n, -1)
  w = None
  if weights is not None:
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
      raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    w = np.maximum(w, 0.0)
  count = 0.0
  mean_x, mean_y = np.zeros(x.shape[1]), np.zeros(y.shape[1])
  cxx = np.zeros((x.shape[1],) * 2)
  cyy = np.zeros((y.shape[1],) * 2)
  cxy = np.zeros((x.shape[1], y.shape[1]))
  for start in range(0, n, chunk):
    xb = x[start : start + chunk].astype(dtype, copy=False)
    yb = y[start : start + chunk].astype(dtype, copy=False)
    if w is None:
      n_b = float(xb.shape[0])
      mx, my = xb.mean(axis=0, dtype=np.float64), yb.mean(axis=0, dtype=np.float64)
      xc, yc = xb - mx.astype(dtype), yb - my.astype(dtype)
    else:
      wb = w[start : start + chunk]
      n_b = float(wb.sum())
      if n_b == 0:
        continue
      mx, my = (wb @ xb) / n_b, (wb @ yb) / n_b
      root = np.sqrt(wb).astype(dtype)[:, None]
      xc, yc = (xb - mx.astype(dtype)) * root, (yb - my.astype(dtype)) * root
    total = count + n_b
    dx, dy = mx - mean_x, my - mean_y
    coef = count * n_b / total
    cxx += xc.T @ xc + coef * np.outer(dx, dx)
    cyy += yc.T @ yc + coef * np.outer(dy, dy)
    cxy += xc.T @ yc + coef * np.outer(dx, dy)
    mean_x += (n_b / total) * dx
    mean_y += (n_b / total) * dy
    count = total
  tx, ty = np.trace(cxx), np.trace(cyy)
  if not (tx > 0 and ty > 0):
    return jnp.zeros((), dtype)
  num = np.sum((cxy / np.sqrt(tx * ty)) ** 2)
  den = np.linalg.norm(cxx / tx) * np.linalg.norm(cyy / ty)
  return jnp.asarray(num / den if den > 0 else 0.0, dtype)


def _linear_cka_chunked_jit(x, y, weights, chunk: int) -> jax.Array:
  """`linear_cka` as one loop over chunks of rows (the pairwise update of
  `StreamingCKAState`), for inputs on an accelerator."""
  dtype = _compute_dtype()
  n = x.shape[0]
  x = x.reshape((n, math.prod(x.shape[1:])))
  y = y.reshape((n, math.prod(y.shape[1:])))
  w = jnp.ones((n,), dtype) if weights is None else jnp.asarray(weights).astype(dtype)
  if w.shape != (n,):
    raise ValueError(f"weights must have shape ({n},), got {w.shape}")
  full = n // chunk
  # CKA does not change when the features are shifted: shifting by the first chunk's mean
  # leaves each chunk's float32 mean and the merge's deltas near zero, where rounding is
  # small, whatever the features' offset (measured at an offset of 1e4 standard deviations:
  # 6.7e-5 relative error without the shift, 4.5e-7 with it).
  shift_x = x[:chunk].astype(dtype).mean(axis=0)
  shift_y = y[:chunk].astype(dtype).mean(axis=0)

  def rows(a, shift, start, size):
    return jax.lax.dynamic_slice_in_dim(a, start, size).astype(dtype) - shift

  def body(i, state):
    start = i * chunk
    return _streaming_update_jit(
      state,
      rows(x, shift_x, start, chunk),
      rows(y, shift_y, start, chunk),
      jax.lax.dynamic_slice_in_dim(w, start, chunk),
    )

  state = jax.lax.fori_loop(0, full, body, streaming_linear_cka_init(x.shape[1], y.shape[1]))
  if n > full * chunk:
    start, size = full * chunk, n - full * chunk
    state = _streaming_update_jit(
      state, rows(x, shift_x, start, size), rows(y, shift_y, start, size), w[start:]
    )
  return streaming_linear_cka_result(state)


_linear_cka_chunked_jit = jax.jit(_linear_cka_chunked_jit, static_argnames=("chunk",))


def _linear_cka_jit(features_x, features_y, weights) -> jax.Array:
  dtype = _compute_dtype()
  x, y = _flatten_pair(features_x, features_y, dtype)
  n = x.shape[0]

  if weights is None:
    w = sqrt_w = None
  else:
    w = jnp.asarray(weights).astype(dtype)
    if w.shape != (n,):
      raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    sqrt_w = jnp.sqrt(jnp.maximum(w, 0.0))
    w = sqrt_w * sqrt_w

  xu, x_norm = _centred_unit(x, sqrt_w, w)
  yu, y_norm = _centred_unit(y, sqrt_w, w)

  cross = jnp.matmul(yu.T, xu, precision=_HIGHEST)
  xx = jnp.matmul(xu.T, xu, precision=_HIGHEST)
  yy = jnp.matmul(yu.T, yu, precision=_HIGHEST)
  numerator = jnp.sum(cross * cross)
  denominator = jnp.sqrt(jnp.sum(xx * xx)) * jnp.sqrt(jnp.sum(yy * yy))
  ok = (x_norm > 0) & (y_norm > 0) & (denominator > 0)
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


# jax.jit by assignment, not as a decorator: mutation testing reaches only undecorated
# bodies (docs/mutation.md).
_linear_cka_jit = jax.jit(_linear_cka_jit)


def prediction_agreement(
  predictions_x: ArrayLike,
  predictions_y: ArrayLike,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Fraction of examples with equal predictions, ``sum_i w_i [x_i = y_i] / sum_i w_i``.

  Inputs of shape ``(..., n)`` broadcast against each other (e.g. a ``(K, n)``
  population against one ``(n,)`` model gives ``(K,)``); ``weights`` is an
  optional ``(n,)`` 0/1 mask for padded examples.  Returns 0.0 when the total
  weight is zero.
  """
  return _prediction_agreement_jit(predictions_x, predictions_y, weights)


def _prediction_agreement_jit(predictions_x, predictions_y, weights) -> jax.Array:
  px = jnp.asarray(predictions_x)
  py = jnp.asarray(predictions_y)
  equal = (px == py).astype(jnp.float32)
  if weights is None:
    w = jnp.ones(equal.shape[-1:], jnp.float32)
  else:
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != equal.shape[-1:]:
      raise ValueError(f"weights must have shape {equal.shape[-1:]}, got {w.shape}")
  total = w.sum()
  agree = (equal * w).sum(axis=-1)
  return jnp.where(total > 0, agree / jnp.where(total > 0, total, 1.0), 0.0)


_prediction_agreement_jit = jax.jit(_prediction_agreement_jit)


# ---------------------------------------------------------------------------
# Shared helpers for the CKA variants below.
# ---------------------------------------------------------------------------


def _flatten_pair(
  features_x: ArrayLike, features_y: ArrayLike, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  """``(n, ...)`` inputs -> ``(n, d1)``, ``(n, d2)`` in ``dtype``; checks the example axis."""
  x, y = (jnp.asarray(a) for a in _shapes_checked(features_x, features_y))
  n = x.shape[0]
  # explicit sizes (not -1) so an empty batch (n = 0) reshapes too
  x = x.reshape((n, math.prod(x.shape[1:])))
  y = y.reshape((n, math.prod(y.shape[1:])))
  return x.astype(dtype), y.astype(dtype)


def _example_weights(weights: ArrayLike | None, n: int, dtype: Any):
  """``(w, sqrt_w)`` for optional non-negative ``(n,)`` weights, or ``(None, None)``."""
  if weights is None:
    return None, None
  w = jnp.asarray(weights).astype(dtype)
  if w.shape != (n,):
    raise ValueError(f"weights must have shape ({n},), got {w.shape}")
  sqrt_w = jnp.sqrt(jnp.maximum(w, 0.0))
  return sqrt_w * sqrt_w, sqrt_w


def _cross_term(xu: jax.Array, yu: jax.Array) -> jax.Array:
  """``||X^T Y||_F^2 = <X X^T, Y Y^T>`` by the cheaper of two exact forms.

  Feature form: the ``d1 x d2`` matrix ``Y^T X``.  Gram form, used only when
  ``n^2 < d1 d2`` (so ``n`` is below the larger ``d``): the ``n x n`` Gram
  matrix of the wider side, ``G = X X^T``, and ``sum((G Y) * Y)``.  The
  choice is static (shapes only).
  """
  n, dx = xu.shape
  dy = yu.shape[1]
  if n * n < dx * dy:
    wide, narrow = (xu, yu) if dx >= dy else (yu, xu)
    gram = jnp.matmul(wide, wide.T, precision=_HIGHEST)
    return jnp.sum(jnp.matmul(gram, narrow, precision=_HIGHEST) * narrow)
  cross = jnp.matmul(yu.T, xu, precision=_HIGHEST)
  return jnp.sum(cross * cross)


def _self_term(xu: jax.Array) -> jax.Array:
  """``||X^T X||_F^2 = ||X X^T||_F^2`` from the smaller of the ``d x d`` and ``n x n`` products."""
  n, d = xu.shape
  prod = (
    jnp.matmul(xu, xu.T, precision=_HIGHEST) if n < d else jnp.matmul(xu.T, xu, precision=_HIGHEST)
  )
  return jnp.sum(prod * prod)


def _unbiased_hsic_times_n_n3(cross: jax.Array, a: jax.Array, b: jax.Array, n: Any) -> jax.Array:
  """``n (n - 3) HSIC_1`` for column-centred features (Song et al. 2012), feature space.

  With ``K = X X^T``, ``L = Y Y^T`` and ``K~``, ``L~`` their copies with zeroed
  diagonals, the unbiased estimator is

      HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)).

  With row norms ``a_i = ||x_i||^2``, ``b_i = ||y_i||^2`` and column sums
  ``s_x = X^T 1``: ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i a_i b_i``,
  ``1^T K~ 1 = ||s_x||^2 - sum_i a_i`` and ``(K~ 1)_i = x_i . s_x - a_i``.  For
  centred columns ``s_x = 0``, so ``1^T K~ 1 = -sum a``, ``1^T K~ L~ 1 = sum_i
  a_i b_i`` and the bracket becomes

      ||X^T Y||_F^2 - n/(n-2) sum_i a_i b_i + (sum a)(sum b) / ((n-1)(n-2)).

  HSIC_1 is invariant to shifting the features, so centring first changes
  nothing but the rounding.  ``cross`` is ``||X^T Y||_F^2``.  Rows that are
  all zero (padding with weight 0) contribute nothing, so ``n`` may be the
  number of rows with weight 1.
  """
  return _unbiased_hsic_parts(cross, a, b, n)[0]


def _unbiased_hsic_parts(
  cross: jax.Array, a: jax.Array, b: jax.Array, n: Any
) -> tuple[jax.Array, jax.Array]:
  """``(n (n-3) HSIC_1, sum of the absolute values of its three terms)``.

  The second value bounds the size of the rounding error of the first: an
  estimate within ``_CANCEL_TOL`` of it is cancellation noise, not signal.
  """
  ab = jnp.dot(a, b, precision=_HIGHEST)
  t2 = n / (n - 2.0) * ab
  t3 = jnp.sum(a) * jnp.sum(b) / ((n - 1.0) * (n - 2.0))
  return cross - t2 + t3, jnp.abs(cross) + jnp.abs(t2) + jnp.abs(t3)


# Relative size (in machine epsilons) below which an unbiased self-HSIC is
# treated as zero: its three terms cancel to rounding noise.
_CANCEL_TOL = 64.0


def _self_ok(h: jax.Array, magnitude: jax.Array) -> jax.Array:
  """True where the unbiased self-HSIC ``h`` is positive beyond rounding noise."""
  return h > _CANCEL_TOL * jnp.finfo(h.dtype).eps * magnitude


def _debiased_ratio(
  h_xy: jax.Array,
  h_xx: jax.Array,
  h_yy: jax.Array,
  self_ok: jax.Array,
  features_ok: jax.Array,
  n_ok: Any,
) -> jax.Array:
  """``h_xy / sqrt(h_xx h_yy)``: 0 for zero centred features, NaN when a self-HSIC is not
  positive or n < 4."""
  denom = h_xx * h_yy
  good = self_ok & (denom > 0)
  value = jnp.where(good, h_xy / jnp.sqrt(jnp.where(good, denom, 1.0)), jnp.nan)
  value = jnp.where(features_ok, value, 0.0)
  return jnp.where(n_ok, value, jnp.nan)


# ---------------------------------------------------------------------------
# Debiased linear CKA.
# ---------------------------------------------------------------------------


def debiased_linear_cka(
  features_x: ArrayLike,
  features_y: ArrayLike,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Linear CKA with HSIC replaced by its unbiased estimator (Song et al. 2012).

  ``CKA_1 = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with linear
  kernels ``K = X X^T``, ``L = Y Y^T`` (see ``_unbiased_hsic_times_n_n3`` for
  the feature-space expansion; the common ``1/(n(n-3))`` cancels).  This is
  the ``debiased=True`` CKA of the google-research ``representation_similarity``
  notebook (golden value 0.51346 where linear CKA is 0.55761).

  Cost: like :func:`linear_cka`, ``O(n d^2)`` time with ``d x d`` products;
  only if ``n^2 < d1 d2`` (more features than examples) is an ``n x n`` Gram
  matrix used instead, whichever is smaller.  Above ``CHUNK_ROWS`` examples
  the inputs are never copied: the rows go through ``metrics.streaming`` in
  chunks (extra memory ``O(d^2)`` plus one chunk) and the estimator is
  evaluated from the sums in float64.

  Args:
    features_x: ``(n, ...)`` features, flattened to ``(n, d1)``.
    features_y: ``(n, ...)`` features, flattened to ``(n, d2)``.
    weights: optional ``(n,)`` 0/1 mask; rows with weight 0 are dropped
      (the estimator then uses ``n = sum(weights)``).

  Returns:
    Scalar, float32 (float64 under x64).  Unlike linear CKA it can be
    negative (and, for tiny ``n``, exceed 1).  Degenerate cases: 0.0 when
    either centred feature matrix is zero (as :func:`linear_cka`); NaN when
    ``HSIC_1(K, K)`` or ``HSIC_1(L, L)`` is not positive (the ratio is
    undefined) or when fewer than 4 weighted rows remain.  "Not positive"
    means below ``64 eps`` times the summed size of the estimator's three
    terms, so an exact zero lost to float cancellation (e.g. one feature
    that is non-zero on a single example) also gives NaN, not noise.

  Raises:
    ValueError: ``n < 4`` (the estimator divides by ``n - 3``), or
      mismatched shapes.
  """
  x, y = _shapes_checked(features_x, features_y)
  if x.shape[0] > CHUNK_ROWS and not _traced(x, y, weights):
    return _from_sums(streaming.debiased_cka_from_stats, x, y, weights)
  return _debiased_linear_cka_jit(features_x, features_y, weights)


def _traced(*arrays: Any) -> bool:
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _from_sums(metric, x: Any, y: Any, weights: ArrayLike | None) -> jax.Array:
  """``metric`` of the d x d sums of ``metrics.streaming``, the rows added in chunks of
  ``CHUNK_ROWS`` where the arrays are (a device array is sliced on its device): no centred
  copy, extra memory ``O(d^2)`` plus one chunk. The metric itself runs in float64 on the
  host."""
  dtype = _compute_dtype()
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != (x.shape[0],):
      raise ValueError(f"weights must have shape ({x.shape[0]},), got {weights.shape}")
  stats = streaming.similarity_stats(x, y, batch_size=CHUNK_ROWS, weights=weights, dtype=dtype)
  return jnp.asarray(metric(stats), dtype)


def _debiased_linear_cka_jit(features_x, features_y, weights) -> jax.Array:
  dtype = _compute_dtype()
  x, y = _flatten_pair(features_x, features_y, dtype)
  n = x.shape[0]
  if n < 4:
    raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
  w, sqrt_w = _example_weights(weights, n, dtype)
  xu, x_norm = _centred_unit(x, sqrt_w, w)
  yu, y_norm = _centred_unit(y, sqrt_w, w)
  n_eff = jnp.asarray(n, dtype) if w is None else w.sum()
  a = jnp.sum(xu * xu, axis=1)
  b = jnp.sum(yu * yu, axis=1)
  h_xy = _unbiased_hsic_times_n_n3(_cross_term(xu, yu), a, b, n_eff)
  h_xx, m_xx = _unbiased_hsic_parts(_self_term(xu), a, a, n_eff)
  h_yy, m_yy = _unbiased_hsic_parts(_self_term(yu), b, b, n_eff)
  self_ok = _self_ok(h_xx, m_xx) & _self_ok(h_yy, m_yy)
  return _debiased_ratio(h_xy, h_xx, h_yy, self_ok, (x_norm > 0) & (y_norm > 0), n_eff >= 4)


_debiased_linear_cka_jit = jax.jit(_debiased_linear_cka_jit)


# ---------------------------------------------------------------------------
# Layer x layer CKA.
# ---------------------------------------------------------------------------


def _prepare_layer(features: ArrayLike, dtype: Any):
  """Flattened, centred, unit-norm layer, its centred norm, and its row norms ``a_i``."""
  x = jnp.asarray(features)
  x = x.reshape((x.shape[0], math.prod(x.shape[1:]))).astype(dtype)
  xu, norm = _centred_unit(x, None, None)
  return xu, norm, jnp.sum(xu * xu, axis=1)


def _self_hsic(xu, a, debiased: bool):
  """``(HSIC term, it is usable)`` for one layer."""
  term = _self_term(xu)
  if not debiased:
    return term, term > 0
  h, magnitude = _unbiased_hsic_parts(term, a, a, xu.shape[0])
  return h, _self_ok(h, magnitude)


def _cross_hsic(xu, yu, a, b, debiased: bool):
  term = _cross_term(xu, yu)
  return _unbiased_hsic_times_n_n3(term, a, b, xu.shape[0]) if debiased else term


def _cka_from_hsic(h_xy, self_x, self_y, norm_x, norm_y, debiased: bool):
  (h_xx, ok_x), (h_yy, ok_y) = self_x, self_y
  features_ok = (norm_x > 0) & (norm_y > 0)
  if debiased:
    return _debiased_ratio(h_xy, h_xx, h_yy, ok_x & ok_y, features_ok, True)
  denom = jnp.sqrt(h_xx) * jnp.sqrt(h_yy)
  ok = features_ok & (denom > 0)
  return jnp.where(ok, h_xy / jnp.where(ok, denom, 1.0), 0.0)


def _cka_matrix_jit(layers_a: tuple, layers_b: tuple | None, debiased: bool) -> jax.Array:
  dtype = _compute_dtype()
  same = layers_b is None
  prep_a = [_prepare_layer(f, dtype) for f in layers_a]
  prep_b = prep_a if same else [_prepare_layer(f, dtype) for f in layers_b]
  self_a = [_self_hsic(xu, a, debiased) for xu, _, a in prep_a]
  self_b = self_a if same else [_self_hsic(yu, b, debiased) for yu, _, b in prep_b]
  rows: list[list[jax.Array]] = []
  for i, (xu, nx, a) in enumerate(prep_a):
    row = []
    for j, (yu, ny, b) in enumerate(prep_b):
      if same and j < i:
        row.append(rows[j][i])
        continue
      h_xy = _cross_hsic(xu, yu, a, b, debiased)
      row.append(_cka_from_hsic(h_xy, self_a[i], self_b[j], nx, ny, debiased))
    rows.append(row)
  return jnp.stack([jnp.stack(r) for r in rows])


_cka_matrix_jit = jax.jit(_cka_matrix_jit, static_argnames=("debiased",))


def cka_matrix(
  features_a: Sequence[ArrayLike],
  features_b: Sequence[ArrayLike] | None = None,
  *,
  debiased: bool = False,
) -> jax.Array:
  """Layer x layer CKA: entry ``[i, j]`` is CKA(``features_a[i]``, ``features_b[j]``).

  Every layer is an ``(n, ...)`` array over the same ``n`` examples and is
  flattened per example (a conv map ``(n, H, W, C)`` becomes ``(n, H W C)``),
  column-centred and scaled to unit Frobenius norm once.  Each HSIC term is
  then computed by whichever exact form is smaller: the ``d_i x d_j`` feature
  product, or -- only when ``n^2 < d_i d_j``, i.e. for a layer with more
  features than examples -- the ``n x n`` Gram matrix of the wider layer.
  The self terms ``HSIC(K_i, K_i)`` are computed once per layer.  The whole
  matrix is one jitted computation (compiled once per list of shapes).

  Args:
    features_a: sequence of ``La`` layers of model A.
    features_b: sequence of ``Lb`` layers of model B; ``None`` compares A
      with itself (symmetric matrix, each pair computed once).
    debiased: use the unbiased HSIC estimator (as :func:`debiased_linear_cka`)
      instead of the biased one (as :func:`linear_cka`).

  Returns:
    ``(La, Lb)`` array with the same values (and degenerate-case rules) as
    :func:`linear_cka` / :func:`debiased_linear_cka` applied per pair.
  """
  layers_a = tuple(jnp.asarray(f) for f in features_a)
  layers_b = None if features_b is None else tuple(jnp.asarray(f) for f in features_b)
  if not layers_a or (layers_b is not None and not layers_b):
    raise ValueError("cka_matrix needs at least one layer on each side")
  if any(f.ndim < 1 for f in layers_a + (layers_b or ())):
    raise ValueError("features must have a leading example axis (n, ...)")
  sizes = {f.shape[0] for f in layers_a + (layers_b or ())}
  if len(sizes) != 1:
    raise ValueError(f"all layers must have the same number of examples, got {sorted(sizes)}")
  n = sizes.pop()
  if debiased and n < 4:
    raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
  return _cka_matrix_jit(layers_a, layers_b, bool(debiased))


# ---------------------------------------------------------------------------
# Exact streaming linear CKA.
# ---------------------------------------------------------------------------


class StreamingCKAState(NamedTuple):
  """Count, means and centred (co)variance sums of everything seen so far.

  ``cov_xy = sum_i (x_i - mean_x)(y_i - mean_y)^T`` (not divided by ``n``);
  batches are merged with the pairwise update of Chan, Golub & LeVeque
  (1979), which avoids the cancellation of ``X^T Y - n mean_x mean_y^T``.
  """

  count: jax.Array
  mean_x: jax.Array
  mean_y: jax.Array
  cov_xx: jax.Array
  cov_yy: jax.Array
  cov_xy: jax.Array


def streaming_linear_cka_init(dim_x: int, dim_y: int) -> StreamingCKAState:
  """Empty state for flattened feature sizes ``dim_x``, ``dim_y`` (``O(d^2)`` memory)."""
  dtype = _compute_dtype()
  return StreamingCKAState(
    jnp.zeros((), dtype),
    jnp.zeros((dim_x,), dtype),
    jnp.zeros((dim_y,), dtype),
    jnp.zeros((dim_x, dim_x), dtype),
    jnp.zeros((dim_y, dim_y), dtype),
    jnp.zeros((dim_x, dim_y), dtype),
  )


def streaming_linear_cka_update(
  state: StreamingCKAState,
  features_x: ArrayLike,
  features_y: ArrayLike,
  weights: ArrayLike | None = None,
) -> StreamingCKAState:
  """Merges one batch (``(n_b, ...)`` each, optional ``(n_b,)`` 0/1 weights) into ``state``.

  Batch ``B`` with count ``n_B``, means ``m_B`` and centred sums ``C_B`` merges
  into ``A`` as ``n = n_A + n_B``, ``m = m_A + (n_B/n) delta`` and
  ``C_xy = C_xy^A + C_xy^B + (n_A n_B / n) delta_x delta_y^T`` with
  ``delta = m_B - m_A``.  Jitted.
  """
  return _streaming_update_jit(state, features_x, features_y, weights)


def _streaming_update_jit(state, features_x, features_y, weights) -> StreamingCKAState:
  dtype = state.count.dtype
  x, y = _flatten_pair(features_x, features_y, dtype)
  if x.shape[1] != state.mean_x.shape[0] or y.shape[1] != state.mean_y.shape[0]:
    raise ValueError(
      f"batch feature sizes ({x.shape[1]}, {y.shape[1]}) do not match the state "
      f"({state.mean_x.shape[0]}, {state.mean_y.shape[0]})"
    )
  n = x.shape[0]
  w, sqrt_w = _example_weights(weights, n, dtype)
  if w is None:
    w = sqrt_w = jnp.ones((n,), dtype)
  n_b = w.sum()
  safe_b = jnp.where(n_b > 0, n_b, 1.0)
  mean_bx = jnp.matmul(w, x, precision=_HIGHEST) / safe_b
  mean_by = jnp.matmul(w, y, precision=_HIGHEST) / safe_b
  xc = (x - mean_bx) * sqrt_w[:, None]
  yc = (y - mean_by) * sqrt_w[:, None]
  n_a = state.count
  total = n_a + n_b
  safe_total = jnp.where(total > 0, total, 1.0)
  delta_x = mean_bx - state.mean_x
  delta_y = mean_by - state.mean_y
  coef = n_a * n_b / safe_total
  return StreamingCKAState(
    total,
    state.mean_x + (n_b / safe_total) * delta_x,
    state.mean_y + (n_b / safe_total) * delta_y,
    state.cov_xx + jnp.matmul(xc.T, xc, precision=_HIGHEST) + coef * jnp.outer(delta_x, delta_x),
    state.cov_yy + jnp.matmul(yc.T, yc, precision=_HIGHEST) + coef * jnp.outer(delta_y, delta_y),
    state.cov_xy + jnp.matmul(xc.T, yc, precision=_HIGHEST) + coef * jnp.outer(delta_x, delta_y),
  )


_streaming_update_jit = jax.jit(_streaming_update_jit)


def streaming_linear_cka_result(state: StreamingCKAState) -> jax.Array:
  """``||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F)``: linear CKA of all data seen (0.0 if degenerate)."""
  tx = jnp.trace(state.cov_xx)  # = ||X_c||_F^2; normalise like linear_cka to avoid overflow
  ty = jnp.trace(state.cov_yy)
  ok = (tx > 0) & (ty > 0)
  tx = jnp.where(ok, tx, 1.0)
  ty = jnp.where(ok, ty, 1.0)
  cxy = state.cov_xy / (jnp.sqrt(tx) * jnp.sqrt(ty))
  numerator = jnp.sum(cxy * cxy)
  cxx = state.cov_xx / tx
  cyy = state.cov_yy / ty
  denominator = jnp.sqrt(jnp.sum(cxx * cxx)) * jnp.sqrt(jnp.sum(cyy * cyy))
  ok = ok & (denominator > 0)
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


streaming_linear_cka_result = jax.jit(streaming_linear_cka_result)


def streaming_linear_cka(batches: Iterable[tuple]) -> jax.Array:
  """Exact linear CKA from an iterable of ``(x, y)`` or ``(x, y, weights)`` batches.

  Accumulates counts, means and the centred ``X^T X``, ``Y^T Y``, ``X^T Y`` in
  feature space (``O(d^2)`` memory, independent of the number of examples),
  so the result equals :func:`linear_cka` on the concatenated batches up to
  float rounding.  Returns 0.0 for no data.
  """
  state = None
  for batch in batches:
    x, y = batch[0], batch[1]
    if state is None:
      x_arr, y_arr = jnp.asarray(x), jnp.asarray(y)
      state = streaming_linear_cka_init(
        int(np.prod(x_arr.shape[1:], dtype=np.int64)), int(np.prod(y_arr.shape[1:], dtype=np.int64))
      )
    state = streaming_linear_cka_update(state, *batch)
  if state is None:
    return jnp.zeros((), _compute_dtype())
  return streaming_linear_cka_result(state)


# ---------------------------------------------------------------------------
# SVCCA (Raghu et al. 2017), as computed by the anatome library.
# ---------------------------------------------------------------------------


def _one_blas_thread(fn, *args) -> jax.Array:
  """``fn(*args)`` computed with the host BLAS on one thread.

  On the CPU, XLA hands the SVDs to LAPACK on the host's OpenBLAS, whose result depends
  on its thread count (which defaults to the core count, and which Ray and SLURM set per
  task through ``OMP_NUM_THREADS``): about 1e-7 relative, enough to flip the sixth decimal
  of a recorded distance. One thread gives the same bits on any machine with the same
  BLAS kernel, so a sweep's results do not depend on where each cell ran. The SVDs are
  small (``n x d`` with ``n`` the SVCCA subset); accelerators ignore the limit.
  """
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    return jax.block_until_ready(fn(*args))


def _keep_count(
  s: jax.Array, threshold: float, anatome_compat: bool, rank_tol: jax.Array
) -> jax.Array:
  """Number of leading singular directions kept by the cumulative-sum rule.

  ``r_k = sum_{j<=k} s_j / sum_j s_j`` (singular values, not squared).
  Default: the smallest ``k`` with ``r_k >= threshold``.  anatome: the number
  of ``k`` with ``r_k < threshold`` (one fewer).  Clipped to ``[1, rank]``.
  """
  total = jnp.sum(s)
  ratio = jnp.cumsum(s) / jnp.where(total > 0, total, 1.0)
  below = jnp.sum(ratio < threshold)
  k = below if anatome_compat else below + 1
  rank = jnp.sum(s > rank_tol)
  return jnp.clip(k, 1, jnp.maximum(rank, 1))


def _reduced_basis(x: jax.Array, threshold: float, anatome_compat: bool):
  """Orthonormal basis of the centred, SVD-reduced ``x`` (columns past ``k`` zeroed), ``k``, and
  an ok flag."""
  n, d = x.shape
  eps = jnp.finfo(x.dtype).eps
  positions = jnp.arange(min(n, d))
  if not anatome_compat:
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, _ = jnp.linalg.svd(xc, full_matrices=False)
    tol = s[0] * max(n, d) * eps
    k = _keep_count(s, threshold, False, tol)
    # span(U_k S_k) = span(U_k), already orthonormal and centred (1^T X_c = 0).
    return u * (positions < k), k, s[0] > 0
  # anatome: SVD of the uncentred input, project on V_k, then centre for CCA.
  u, s, _ = jnp.linalg.svd(x, full_matrices=False)
  tol = s[0] * max(n, d) * eps
  k = _keep_count(s, threshold, True, tol)
  z = (u * s) * (positions < k)
  z = z - z.mean(axis=0, keepdims=True)
  u2, s2, _ = jnp.linalg.svd(z, full_matrices=False)
  basis = u2 * (s2 > s2[0] * max(n, d) * eps)
  xc_nonzero = jnp.any(jnp.abs(x - x.mean(axis=0, keepdims=True)) > 0)
  return basis, k, xc_nonzero & (s2[0] > 0)


def _svcca_core(x: jax.Array, y: jax.Array, threshold: float, anatome_compat: bool) -> jax.Array:
  """SVCCA distance of two ``(n, d)`` matrices (traceable; k handled by masking)."""
  bx, kx, okx = _reduced_basis(x, threshold, anatome_compat)
  by, ky, oky = _reduced_basis(y, threshold, anatome_compat)
  corr = jnp.linalg.svd(jnp.matmul(bx.T, by, precision=_HIGHEST), compute_uv=False)
  m = jnp.minimum(kx, ky)
  kept = jnp.arange(corr.shape[0]) < m
  total = jnp.sum(jnp.where(kept, jnp.clip(corr, 0.0, 1.0), 0.0))
  return jnp.where(okx & oky, 1.0 - total / m.astype(x.dtype), jnp.nan)


def _svcca_jit(x, y, threshold: float, anatome_compat: bool) -> jax.Array:
  return _svcca_core(x, y, threshold, anatome_compat)


_svcca_jit = jax.jit(_svcca_jit, static_argnames=("threshold", "anatome_compat"))


def _check_threshold(threshold: float) -> float:
  threshold = float(threshold)
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  return threshold


def svcca_distance(
  features_x: ArrayLike,
  features_y: ArrayLike,
  *,
  threshold: float = 0.99,
  anatome_compat: bool = False,
) -> jax.Array:
  """SVCCA distance ``1 - mean canonical correlation`` (Raghu et al. 2017).

  Steps, for each ``(n, d)`` feature matrix (trailing dims flattened):

  1. centre the columns and take the thin SVD ``X_c = U S V^T``;
  2. keep the leading ``k`` directions, ``k`` the smallest with
     ``sum_{j<=k} s_j >= threshold * sum_j s_j`` (singular values, not
     squared), giving ``X_k = U_k S_k``;
  3. CCA between ``X_k`` and ``Y_k``: the canonical correlations are the
     singular values of ``Q_x^T Q_y`` for orthonormal bases of the two
     (centred) reduced matrices -- here ``Q_x = U_k`` directly, which spans
     the same space as a QR basis of ``U_k S_k``;
  4. distance ``= 1 - (1/min(k_x, k_y)) sum_{i <= min(k_x, k_y)} rho_i``.

  ``k`` is data dependent, so it is handled by masking columns of fixed-size
  arrays: the whole computation is traceable and jitted (``threshold`` and
  ``anatome_compat`` are static).  Cost: two thin SVDs, ``O(n d^2)``
  (``d <= n``), plus a ``min(n,d1) x min(n,d2)`` SVD.  Above ``CHUNK_ROWS``
  examples the data matrices are not decomposed (their ``U`` alone would be
  another ``n x d``): the rows go through ``metrics.streaming`` in chunks and
  the SVDs come from the ``d x d`` Gram/covariance eigenpairs, in float64
  (equal up to rounding; extra memory ``O(d^2)`` plus one chunk).  CCA is meaningful only
  for ``n`` well above ``k``; for ``n`` close to ``k_x + k_y`` the
  correlations are biased towards 1.

  Args:
    features_x, features_y: ``(n, ...)`` features over the same examples.
    threshold: fraction of the singular-value sum to keep, in ``(0, 1]``.
    anatome_compat: reproduce ``anatome.similarity.svcca_distance`` exactly
      instead: the reduction SVD is taken of the *uncentred* input (``x V_k``,
      centred only afterwards for CCA) and ``k`` counts the directions with
      cumulative ratio strictly below ``threshold`` (one fewer than the
      default rule; clipped to at least 1 where anatome would return NaN).

  Returns:
    Scalar in ``[0, 1]``, float32 (float64 under x64); NaN if either input
    has zero centred variance.
  """
  threshold = _check_threshold(threshold)
  rows_x, rows_y = _shapes_checked(features_x, features_y)
  if rows_x.shape[0] > CHUNK_ROWS and not _traced(rows_x, rows_y):
    metric = functools.partial(
      streaming.svcca_from_stats, threshold=threshold, anatome_compat=bool(anatome_compat)
    )
    return _from_sums(metric, rows_x, rows_y, None)
  dtype = _compute_dtype()
  x, y = _flatten_pair(features_x, features_y, dtype)
  if x.shape[0] < 2:
    raise ValueError(f"SVCCA needs at least 2 examples, got {x.shape[0]}")
  return _one_blas_thread(_svcca_jit, x, y, threshold, bool(anatome_compat))


def _adaptive_pool_matrix(length: int, out: int) -> np.ndarray:
  """``(out, length)`` averaging matrix with PyTorch ``adaptive_avg_pool`` bins.

  Bin ``i`` covers ``[floor(i L / out), ceil((i + 1) L / out))``.
  """
  mat = np.zeros((out, length), np.float64)
  for i in range(out):
    start = (i * length) // out
    end = -((-(i + 1) * length) // out)
    mat[i, start:end] = 1.0 / (end - start)
  return mat


def adaptive_avg_pool(maps: jax.Array, height: int, width: int) -> jax.Array:
  """``(n, H, W, C)`` maps averaged into ``(n, height, width, C)`` bins, the bins of PyTorch's
  ``adaptive_avg_pool2d`` (what anatome uses; bin ``i`` of an axis of length ``L`` covers
  ``[floor(i L / out), ceil((i + 1) L / out))``). Traceable; the sizes are static."""
  _, h, w, _ = maps.shape
  if (h, w) == (height, width):
    return maps
  ph = jnp.asarray(_adaptive_pool_matrix(h, height), maps.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, width), maps.dtype)
  return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, maps, precision=_HIGHEST)


def _downsample_maps(maps: jax.Array, height: int, width: int, method: str) -> jax.Array:
  n, h, w, c = maps.shape
  if (h, w) == (height, width):
    return maps
  if method == "bilinear":
    return jax.image.resize(maps, (n, height, width, c), method="bilinear", antialias=True)
  return adaptive_avg_pool(maps, height, width)


def _svcca_conv_jit(
  x, y, threshold: float, anatome_compat: bool, position_batch: int | None
) -> jax.Array:
  n, h, w, _ = x.shape
  xp = jnp.moveaxis(x.reshape((n, h * w, -1)), 1, 0)  # (P, n, Cx)
  yp = jnp.moveaxis(y.reshape((n, h * w, -1)), 1, 0)  # (P, n, Cy)
  distances = jax.lax.map(
    lambda pair: _svcca_core(pair[0], pair[1], threshold, anatome_compat),
    (xp, yp),
    batch_size=position_batch,
  )
  return jnp.mean(distances)


_svcca_conv_jit = jax.jit(
  _svcca_conv_jit, static_argnames=("threshold", "anatome_compat", "position_batch")
)


def svcca_conv_distance(
  maps_x: ArrayLike,
  maps_y: ArrayLike,
  *,
  size: int = 16,
  threshold: float = 0.99,
  resize_method: str | None = None,
  anatome_compat: bool = False,
  position_batch: int | None = 16,
) -> jax.Array:
  """SVCCA distance of two conv feature maps, per spatial position, averaged.

  Both ``(n, H, W, C)`` maps (channels last; ``C`` may differ) are first
  *down*sampled to a common grid ``(min(size, H_x, H_y), min(size, W_x,
  W_y))`` -- maps already that small are used as they are, never upsampled
  (anatome refuses ``size > H``).  Then, for each of the ``P`` positions,
  :func:`svcca_distance` is computed between the ``(n, C_x)`` and ``(n, C_y)``
  matrices of that position, and the ``P`` distances are averaged (NaN if any
  position is degenerate).

  Args:
    maps_x, maps_y: ``(n, H, W, C)`` activations over the same examples.
    size: target spatial size (the Simon Says authors used 16).
    threshold, anatome_compat: as in :func:`svcca_distance`.
    resize_method: ``"bilinear"`` (``jax.image.resize``, antialiased) or
      ``"avg_pool"`` (PyTorch ``adaptive_avg_pool2d`` bins, what anatome
      does).  ``None``: ``"avg_pool"`` if ``anatome_compat`` else
      ``"bilinear"``.
    position_batch: positions processed together (``lax.map`` with this
      ``batch_size``; ``None`` = one at a time).

  Cost: ``P`` pairs of thin SVDs of ``n x C`` matrices, ``O(P n C^2)`` time;
  peak memory ``O(position_batch * n * C)`` on top of the resized maps.
  Jitted per input shape.
  """
  threshold = _check_threshold(threshold)
  if resize_method is None:
    resize_method = "avg_pool" if anatome_compat else "bilinear"
  if resize_method not in ("bilinear", "avg_pool"):
    raise ValueError(f"resize_method must be 'bilinear' or 'avg_pool', got {resize_method!r}")
  if int(size) < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  if position_batch is not None and int(position_batch) < 1:
    raise ValueError(f"position_batch must be >= 1 or None, got {position_batch}")
  dtype = _compute_dtype()
  x = jnp.asarray(maps_x).astype(dtype)
  y = jnp.asarray(maps_y).astype(dtype)
  if x.ndim != 4 or y.ndim != 4:
    raise ValueError(f"maps must be (n, H, W, C), got shapes {x.shape} and {y.shape}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(
      f"maps must have the same number of examples, got {x.shape[0]} and {y.shape[0]}"
    )
  if x.shape[0] < 2:
    raise ValueError(f"SVCCA needs at least 2 examples, got {x.shape[0]}")
  height = min(int(size), x.shape[1], y.shape[1])
  width = min(int(size), x.shape[2], y.shape[2])
  x = _downsample_maps(x, height, width, resize_method)
  y = _downsample_maps(y, height, width, resize_method)
  batch = None if position_batch is None else int(position_batch)
  return _one_blas_thread(_svcca_conv_jit, x, y, threshold, bool(anatome_compat), batch)
