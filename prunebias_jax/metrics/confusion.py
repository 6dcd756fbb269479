"""Confusion matrices and one-vs-rest per-class error rates.

Definitions (see docs/metrics.md), with ``M`` the confusion matrix (rows = true
class, columns = predicted class) of ``n`` examples:

* ``TP_c = M[c, c]``
* ``FP_c = sum_i M[i, c] - TP_c``
* ``FN_c = sum_j M[c, j] - TP_c``
* ``TN_c = n - TP_c - FP_c - FN_c``
* ``FPR_c = FP_c / (FP_c + TN_c)`` and ``FNR_c = FN_c / (FN_c + TP_c)``

**Zero denominators.** When a denominator is zero (``FN_c + TP_c = 0``: class
``c`` is absent from the labels; ``FP_c + TN_c = 0``: every example belongs to
class ``c``) the corresponding rate is *defined as 0.0*; these functions never
return NaN.  Use :func:`rate_denominators` to find such classes.

**Padding / weights.** ``weights`` is an optional per-example weight (normally
0/1) so that padded examples can be ignored.  Examples whose label or
prediction lies outside ``[0, num_classes)`` (e.g. a ``-1`` padding label) are
ignored as well (they get weight 0): a jitted function cannot raise on bad
data, so such entries are dropped rather than wrapped around.

All functions are jit-compatible with ``num_classes`` static.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "ClassRates",
  "confusion_matrix",
  "per_class_rates",
  "rate_denominators",
  "rates_from_confusion",
]

ArrayLike = Any


class ClassRates(NamedTuple):
  """Per-class one-vs-rest false positive / false negative rates.

  Both fields have shape ``(..., C)``.  Besides attribute access
  (``rates.fpr``), integer indexing (``rates[0]``) and unpacking
  (``fpr, fnr = rates``), string keys work too: ``rates['fpr']``.
  """

  fpr: jax.Array
  fnr: jax.Array

  def __getitem__(self, key):  # type: ignore[override]
    if isinstance(key, str):
      if key not in self._fields:
        raise KeyError(f"{key!r} is not a field of ClassRates; fields are {self._fields}")
      return getattr(self, key)
    return tuple.__getitem__(self, key)


def _check_num_classes(num_classes: int) -> int:
  """``num_classes`` must be a concrete positive integer (static under jit)."""
  try:
    value = operator.index(num_classes)
  except TypeError as err:
    raise TypeError(
      f"num_classes must be a Python int (static under jit), got {num_classes!r}"
    ) from err
  if isinstance(num_classes, bool) or value < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return value


def _example_weights(labels: jax.Array, num_classes: int, weights: ArrayLike | None) -> jax.Array:
  """Float32 per-example weights, zeroed for labels outside ``[0, num_classes)``."""
  if weights is None:
    w = jnp.ones(labels.shape, jnp.float32)
  else:
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != labels.shape:
      raise ValueError(f"weights must have shape {labels.shape} (like labels), got {w.shape}")
  return jnp.where((labels >= 0) & (labels < num_classes), w, 0.0)


def _as_int_vector(x: ArrayLike, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype}")
  return x.astype(jnp.int32)


def _confusion_single(
  labels: jax.Array, predictions: jax.Array, w: jax.Array, num_classes: int
) -> jax.Array:
  w = jnp.where((predictions >= 0) & (predictions < num_classes), w, 0.0)
  li = jnp.clip(labels, 0, num_classes - 1)
  pi = jnp.clip(predictions, 0, num_classes - 1)
  return jnp.zeros((num_classes, num_classes), jnp.float32).at[li, pi].add(w)


def confusion_matrix(
  labels: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Weighted confusion matrix ``M[t, p] = sum_i w_i [y_i = t][yhat_i = p]``.

  Args:
    labels: ``(n,)`` integer true classes.
    predictions: ``(n,)`` integer predicted classes, or ``(..., n)`` for a
      population of models (the result then has the same leading axes).
    num_classes: ``C`` (static Python int).
    weights: optional ``(n,)`` per-example weights (0/1 to ignore padding).

  Returns:
    float32 array ``(..., C, C)`` of (weighted) counts, rows = true class,
    columns = predicted class.  Built with a single scatter-add.
  """
  return _confusion_matrix_jit(labels, predictions, _check_num_classes(num_classes), weights)


def _confusion_matrix_jit(labels, predictions, num_classes, weights):
  labels = _as_int_vector(labels, "labels")
  predictions = _as_int_vector(predictions, "predictions")
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D (n,), got shape {labels.shape}")
  if predictions.ndim < 1 or predictions.shape[-1] != labels.shape[0]:
    raise ValueError(
      f"predictions must have shape (..., {labels.shape[0]}), got {predictions.shape}"
    )
  w = _example_weights(labels, num_classes, weights)
  lead = predictions.shape[:-1]
  flat = predictions.reshape((-1, labels.shape[0]))
  cms = jax.vmap(lambda p: _confusion_single(labels, p, w, num_classes))(flat)
  return cms.reshape(lead + (num_classes, num_classes))


# jax.jit by assignment, not as a decorator: mutation testing reaches only undecorated
# bodies (docs/mutation.md).
_confusion_matrix_jit = jax.jit(_confusion_matrix_jit, static_argnames="num_classes")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0.0 (no NaN, NaN-free gradients)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def rates_from_confusion(cm: ArrayLike) -> ClassRates:
  """One-vs-rest ``FPR_c = FP_c/(FP_c+TN_c)``, ``FNR_c = FN_c/(FN_c+TP_c)`` from ``(..., C, C)``.

  A zero denominator gives a rate of 0.0 (never NaN).
  """
  cm = jnp.asarray(cm, jnp.float32)
  tp = jnp.diagonal(cm, axis1=-2, axis2=-1)
  predicted = cm.sum(axis=-2)  # column sums: TP + FP
  actual = cm.sum(axis=-1)  # row sums: TP + FN
  total = cm.sum(axis=(-2, -1))[..., None]
  fp = predicted - tp
  fn = actual - tp
  tn = total - tp - fp - fn
  return ClassRates(fpr=_safe_div(fp, fp + tn), fnr=_safe_div(fn, fn + tp))


def per_class_rates(
  labels: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  weights: ArrayLike | None = None,
) -> ClassRates:
  """Per-class one-vs-rest error rates of one model or a population of models.

  ``FPR_c = FP_c / (FP_c + TN_c)``, ``FNR_c = FN_c / (FN_c + TP_c)`` (see the
  module docstring).  ``predictions`` of shape ``(n,)`` give ``(C,)`` rates;
  ``(K, n)`` (a population of K models) give ``(K, C)`` rates, one row per
  model (vmapped).  A zero denominator (class absent from the labels, or all
  examples of one class) gives 0.0, never NaN.
  """
  return _per_class_rates_jit(labels, predictions, _check_num_classes(num_classes), weights)


def _per_class_rates_jit(labels, predictions, num_classes, weights):
  return rates_from_confusion(_confusion_matrix_jit(labels, predictions, num_classes, weights))


_per_class_rates_jit = jax.jit(_per_class_rates_jit, static_argnames="num_classes")


def rate_denominators(
  labels: ArrayLike,
  num_classes: int,
  weights: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-class rate denominators ``(FP_c + TN_c, FN_c + TP_c)``; they depend on labels only.

  ``FN_c + TP_c = n_c`` (weighted number of examples of class ``c``) and
  ``FP_c + TN_c = n - n_c``.  Returns two float32 ``(C,)`` arrays.
  """
  return _rate_denominators_jit(labels, _check_num_classes(num_classes), weights)


def _rate_denominators_jit(labels, num_classes, weights):
  labels = _as_int_vector(labels, "labels")
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D (n,), got shape {labels.shape}")
  w = _example_weights(labels, num_classes, weights)
  li = jnp.clip(labels, 0, num_classes - 1)
  positives = jnp.zeros((num_classes,), jnp.float32).at[li].add(w)
  negatives = w.sum() - positives
  return negatives, positives


_rate_denominators_jit = jax.jit(_rate_denominators_jit, static_argnames="num_classes")
