"""Pruning-induced bias: relative change of per-class rates, CEV and SDE.

Definitions follow docs/metrics.md (Simon Says, Blakeney et al.):

* Rates are averaged over a population *first* (``mean_k FPR_c^(k)``), then
  ``dFPR_c = s * (FPR_c^cmp - FPR_c^ref) / FPR_c^ref`` (same for FNR), with
  ``s = 100`` (``convention='simon_says'``, percent) or ``s = 1``
  (``convention='nas2022'``, fractions).
* ``CEV = 1/2 [Var(dFPR) + Var(dFNR)]`` (simon_says) or ``Var(dFPR) + Var(dFNR)``
  (nas2022); population variances (divide by the number of classes used).
* ``SDE = mean_c |dFPR_c - dFNR_c| / sqrt(2)`` (simon_says) or
  ``mean_c |dFPR_c - dFNR_c|`` (nas2022).

Zero reference rates (``zero_rate``):

* ``'floor'`` (default): a zero reference rate is replaced, in the denominator
  of the relative change, by one error's worth, ``1 / max(FP_c + TN_c, 1)`` for
  FPR and ``1 / max(FN_c + TP_c, 1)`` for FNR:
  ``dFPR_c = s (FPR_c^cmp - FPR_c^ref) / max(FPR_c^ref, floor_c)``.  The
  numerator keeps the true reference rate, so a model identical to the
  reference shows a change of exactly 0.
* ``'exclude'``: classes with a zero reference FPR *or* FNR are marked invalid
  and left out of the CEV/SDE means.

In both modes ``num_zero_rate_classes`` counts the classes that hit the rule
(zero reference FPR or FNR).  Classes whose rates are undefined on this test
set (no example of the class, or only examples of the class: a zero rate
denominator) are always marked invalid, whatever the rule, and are not counted
in ``num_zero_rate_classes``.  Entries of ``dfpr``/``dfnr`` for invalid classes
are set to 0.0 (never NaN): always read them together with ``valid``.

String options are plain Python values (keyword-only) and branch in Python, so
every function is jit-compatible with ``num_classes``, ``zero_rate`` and
``convention`` static.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prunebias_jax.choices import CONVENTIONS, ZERO_RATE_RULES
from prunebias_jax.metrics.confusion import (
  _check_num_classes,
  per_class_rates,
  rate_denominators,
  rates_from_confusion,
)

__all__ = [
  "BiasChange",
  "CONVENTIONS",
  "ZERO_RATE_RULES",
  "cev_from_changes",
  "combined_error_variance",
  "relative_rate_change",
  "relative_rate_change_from_confusion",
  "sde_from_changes",
  "symmetric_distance_error",
]

ArrayLike = Any


class BiasChange(NamedTuple):
  """Relative per-class rate changes.

  Attributes:
    dfpr: ``(C,)`` relative change of the false positive rate (percent for
      'simon_says', fraction for 'nas2022'); 0.0 where ``valid`` is False.
    dfnr: ``(C,)`` same for the false negative rate.
    valid: ``(C,)`` bool, classes used in CEV/SDE.
    num_zero_rate_classes: int32 scalar, number of classes with a zero
      reference FPR or FNR (floored or excluded, depending on the rule).
  """

  dfpr: jax.Array
  dfnr: jax.Array
  valid: jax.Array
  num_zero_rate_classes: jax.Array


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  return value


def _population_mean_rates(
  labels: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  weights: ArrayLike | None,
) -> tuple[jax.Array, jax.Array]:
  """``(C,)`` FPR and FNR averaged over all leading (population) axes."""
  fpr, fnr = per_class_rates(labels, predictions, num_classes, weights)
  return (
    fpr.reshape((-1, num_classes)).mean(axis=0),
    fnr.reshape((-1, num_classes)).mean(axis=0),
  )


def relative_rate_change(
  labels: ArrayLike,
  reference_predictions: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  *,
  zero_rate: str = "floor",
  convention: str = "simon_says",
  weights: ArrayLike | None = None,
) -> BiasChange:
  """Relative change of per-class FPR/FNR of ``predictions`` w.r.t. a reference.

  ``dFPR_c = s (mean_k FPR_c^(k) - mean_r FPR_c^(r)) / mean_r FPR_c^(r)`` and
  likewise for FNR, ``s = 100`` ('simon_says') or ``1`` ('nas2022').

  Args:
    labels: ``(n,)`` true classes.
    reference_predictions: ``(n,)`` or ``(K_ref, n)`` predictions of the
      reference (dense) model or population.
    predictions: ``(n,)`` or ``(K, n)`` predictions of the compared model or
      population.  Rates are averaged over each population before the
      relative change is taken.
    num_classes: ``C`` (static).
    zero_rate: ``'floor'`` or ``'exclude'`` (see module docstring).
    convention: ``'simon_says'`` (percent) or ``'nas2022'`` (fractions).
    weights: optional ``(n,)`` 0/1 example weights (ignore padded examples).

  Returns:
    :class:`BiasChange`.
  """
  _check_choice("zero_rate", zero_rate, ZERO_RATE_RULES)
  _check_choice("convention", convention, CONVENTIONS)
  return _relative_rate_change_jit(
    labels,
    reference_predictions,
    predictions,
    _check_num_classes(num_classes),
    zero_rate,
    convention,
    weights,
  )


def _relative_rate_change_jit(
  labels, reference_predictions, predictions, num_classes, zero_rate, convention, weights
) -> BiasChange:
  ref_fpr, ref_fnr = _population_mean_rates(labels, reference_predictions, num_classes, weights)
  cmp_fpr, cmp_fnr = _population_mean_rates(labels, predictions, num_classes, weights)
  negatives, positives = rate_denominators(labels, num_classes, weights)
  return _change(ref_fpr, ref_fnr, cmp_fpr, cmp_fnr, negatives, positives, zero_rate, convention)


def _change(ref_fpr, ref_fnr, cmp_fpr, cmp_fnr, negatives, positives, zero_rate, convention):
  """The relative changes of `relative_rate_change` from the (C,) rates and denominators."""
  defined = (negatives > 0) & (positives > 0)
  zero_fpr = ref_fpr <= 0
  zero_fnr = ref_fnr <= 0
  hit = defined & (zero_fpr | zero_fnr)

  # The floor replaces a zero reference rate in the *denominator* only: a compared model
  # that is exactly as good (rate 0 too) shows no change, and each of its extra errors
  # counts as one error's worth of relative change (1 error → +100%).
  if zero_rate == "floor":
    den_fpr = jnp.where(zero_fpr, 1.0 / jnp.maximum(negatives, 1.0), ref_fpr)
    den_fnr = jnp.where(zero_fnr, 1.0 / jnp.maximum(positives, 1.0), ref_fnr)
    valid = defined
  else:  # "exclude"
    den_fpr = jnp.where(zero_fpr, 1.0, ref_fpr)
    den_fnr = jnp.where(zero_fnr, 1.0, ref_fnr)
    valid = defined & ~(zero_fpr | zero_fnr)

  scale = 100.0 if convention == "simon_says" else 1.0
  dfpr = jnp.where(valid, scale * (cmp_fpr - ref_fpr) / den_fpr, 0.0)
  dfnr = jnp.where(valid, scale * (cmp_fnr - ref_fnr) / den_fnr, 0.0)
  return BiasChange(
    dfpr=dfpr,
    dfnr=dfnr,
    valid=valid,
    num_zero_rate_classes=hit.sum().astype(jnp.int32),
  )


def relative_rate_change_from_confusion(
  reference_confusion: ArrayLike,
  confusion: ArrayLike,
  *,
  zero_rate: str = "floor",
  convention: str = "simon_says",
) -> BiasChange:
  """`relative_rate_change` from confusion counts ``M[t, p]`` (``(C, C)``, or ``(K, C, C)`` for
  a population, whose rates are averaged first) instead of per-example predictions: what an
  evaluation pass accumulates. The rates are those of `rates_from_confusion`; the denominators
  ``FN_c + TP_c = n_c`` and ``FP_c + TN_c = n - n_c`` come from the reference's row sums (the
  labels), so the result equals `relative_rate_change` on the predictions the counts came from.
  """
  _check_choice("zero_rate", zero_rate, ZERO_RATE_RULES)
  _check_choice("convention", convention, CONVENTIONS)
  ref, cmp = jnp.asarray(reference_confusion), jnp.asarray(confusion)
  c = ref.shape[-1]
  if ref.ndim < 2 or ref.shape[-2:] != (c, c) or cmp.shape[-2:] != (c, c):
    raise ValueError(
      f"confusion counts must be (..., C, C) of one C, got {ref.shape} and {cmp.shape}"
    )
  return _change_from_confusion_jit(ref, cmp, zero_rate, convention)


def _change_from_confusion_jit(ref, cmp, zero_rate, convention) -> BiasChange:
  c = ref.shape[-1]
  ref_rates, cmp_rates = rates_from_confusion(ref), rates_from_confusion(cmp)
  mean = lambda r: r.reshape((-1, c)).mean(axis=0)
  counts = ref.reshape((-1, c, c))[0].astype(jnp.float32)  # the labels: any member's row sums
  positives = counts.sum(axis=1)
  negatives = counts.sum() - positives
  return _change(
    mean(ref_rates.fpr),
    mean(ref_rates.fnr),
    mean(cmp_rates.fpr),
    mean(cmp_rates.fnr),
    negatives,
    positives,
    zero_rate,
    convention,
  )


_change_from_confusion_jit = jax.jit(
  _change_from_confusion_jit, static_argnames=("zero_rate", "convention")
)


# jax.jit by assignment, not as a decorator: mutation testing reaches only undecorated
# bodies (docs/mutation.md).
_relative_rate_change_jit = jax.jit(
  _relative_rate_change_jit, static_argnames=("num_classes", "zero_rate", "convention")
)


def _mask_and_count(
  dfpr: ArrayLike, dfnr: ArrayLike, valid: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  dfpr = jnp.asarray(dfpr)
  dfnr = jnp.asarray(dfnr)
  if not jnp.issubdtype(dfpr.dtype, jnp.floating):
    dfpr = dfpr.astype(jnp.float32)
  dfnr = dfnr.astype(dfpr.dtype)
  if dfpr.shape != dfnr.shape:
    raise ValueError(f"dfpr and dfnr must have the same shape, got {dfpr.shape} and {dfnr.shape}")
  if valid is None:
    mask = jnp.ones(dfpr.shape, bool)
  else:
    mask = jnp.asarray(valid).astype(bool)
    if mask.shape != dfpr.shape:
      raise ValueError(f"valid must have shape {dfpr.shape}, got {mask.shape}")
  w = mask.astype(dfpr.dtype)
  count = w.sum()
  # where() (not multiply) so that a NaN in an invalid entry cannot leak.
  return jnp.where(mask, dfpr, 0.0), jnp.where(mask, dfnr, 0.0), w, count, jnp.maximum(count, 1.0)


def cev_from_changes(
  dfpr: ArrayLike,
  dfnr: ArrayLike,
  valid: ArrayLike | None = None,
  convention: str = "simon_says",
) -> jax.Array:
  """Combined Error Variance from per-class changes, over the ``valid`` classes.

  'simon_says': ``CEV = 1/2 [Var(dFPR) + Var(dFNR)] = (1/C) sum_c 1/2 ||p_c - pbar||^2``;
  'nas2022': ``CEV = Var(dFPR) + Var(dFNR)``.  Population variances (divide by
  the number of valid classes).  The changes are used as given (their unit,
  percent or fraction, is set by :func:`relative_rate_change`).  Returns NaN
  only if no class is valid (an empty mean), documented as undefined.
  """
  _check_choice("convention", convention, CONVENTIONS)
  return _cev_jit(dfpr, dfnr, valid, convention)


def _cev_jit(dfpr, dfnr, valid, convention) -> jax.Array:
  x, y, w, count, denom = _mask_and_count(dfpr, dfnr, valid)

  def variance(v: jax.Array) -> jax.Array:
    mean = (w * v).sum() / denom
    return (w * (v - mean) ** 2).sum() / denom

  factor = 0.5 if convention == "simon_says" else 1.0
  cev = factor * (variance(x) + variance(y))
  return jnp.where(count > 0, cev, jnp.nan)


_cev_jit = jax.jit(_cev_jit, static_argnames="convention")


def sde_from_changes(
  dfpr: ArrayLike,
  dfnr: ArrayLike,
  valid: ArrayLike | None = None,
  convention: str = "simon_says",
) -> jax.Array:
  """Symmetric Distance Error from per-class changes, over the ``valid`` classes.

  'simon_says': ``SDE = mean_c |dFPR_c - dFNR_c| / sqrt(2)`` (mean distance of the
  points to the line dFPR = dFNR); 'nas2022': ``SDE = mean_c |dFPR_c - dFNR_c|``.
  Returns NaN only if no class is valid (an empty mean).
  """
  _check_choice("convention", convention, CONVENTIONS)
  return _sde_jit(dfpr, dfnr, valid, convention)


def _sde_jit(dfpr, dfnr, valid, convention) -> jax.Array:
  x, y, w, count, denom = _mask_and_count(dfpr, dfnr, valid)
  factor = 1.0 / math.sqrt(2.0) if convention == "simon_says" else 1.0
  sde = factor * (w * jnp.abs(x - y)).sum() / denom
  return jnp.where(count > 0, sde, jnp.nan)


_sde_jit = jax.jit(_sde_jit, static_argnames="convention")


def combined_error_variance(
  labels: ArrayLike,
  reference_predictions: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  *,
  zero_rate: str = "floor",
  convention: str = "simon_says",
  weights: ArrayLike | None = None,
) -> jax.Array:
  """CEV of ``predictions`` relative to the reference (scalar).

  ``CEV = 1/2 [Var_c(dFPR_c) + Var_c(dFNR_c)]`` in percent^2 ('simon_says') or
  ``Var(dFPR) + Var(dFNR)`` on fractions ('nas2022'); see
  :func:`relative_rate_change` for the arguments and :func:`cev_from_changes`.
  """
  change = relative_rate_change(
    labels,
    reference_predictions,
    predictions,
    num_classes,
    zero_rate=zero_rate,
    convention=convention,
    weights=weights,
  )
  return cev_from_changes(change.dfpr, change.dfnr, change.valid, convention)


def symmetric_distance_error(
  labels: ArrayLike,
  reference_predictions: ArrayLike,
  predictions: ArrayLike,
  num_classes: int,
  *,
  zero_rate: str = "floor",
  convention: str = "simon_says",
  weights: ArrayLike | None = None,
) -> jax.Array:
  """SDE of ``predictions`` relative to the reference (scalar).

  ``SDE = mean_c |dFPR_c - dFNR_c| / sqrt(2)`` in percent ('simon_says') or
  ``mean_c |dFPR_c - dFNR_c|`` on fractions ('nas2022'); see
  :func:`relative_rate_change` for the arguments and :func:`sde_from_changes`.
  """
  change = relative_rate_change(
    labels,
    reference_predictions,
    predictions,
    num_classes,
    zero_rate=zero_rate,
    convention=convention,
    weights=weights,
  )
  return sde_from_changes(change.dfpr, change.dfnr, change.valid, convention)
