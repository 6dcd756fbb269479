"""Similarity between two models: linear CKA and prediction agreement.

Linear CKA (Kornblith et al. 2019) in its feature-space form: with the columns
of ``X`` (n x d1) and ``Y`` (n x d2) centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),

computed with d x d matrices only (O(n d^2) time, O(d^2) memory; the n x n Gram
matrix is never formed).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["linear_cka", "prediction_agreement"]

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
    """
    return _linear_cka_jit(features_x, features_y, weights)


@jax.jit
def _linear_cka_jit(features_x, features_y, weights) -> jax.Array:
    dtype = _compute_dtype()
    x = jnp.asarray(features_x)
    y = jnp.asarray(features_y)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError("features must have a leading example axis (n, ...)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"features_x and features_y must have the same number of examples, got {x.shape[0]} and {y.shape[0]}"
        )
    n = x.shape[0]
    x = x.reshape((n, -1)).astype(dtype)
    y = y.reshape((n, -1)).astype(dtype)

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


@jax.jit
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
