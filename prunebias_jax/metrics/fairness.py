"""Group fairness: demographic parity and equalized odds differences.

Definitions (see docs/metrics.md, "Group fairness"), for a binary prediction
``Yhat`` and a sensitive attribute ``A`` with integer values ``0 .. G-1``:

* selection rate ``SR_a = P(Yhat=1 | A=a)``,
  ``TPR_a = P(Yhat=1 | Y=1, A=a)``, ``FPR_a = P(Yhat=1 | Y=0, A=a)``;
* ``DPD = max_a SR_a - min_a SR_a``;
* ``EOD = max(TPR gap, FPR gap)`` (``agg='worst_case'``) or
  ``(TPR gap + FPR gap) / 2`` (``agg='mean'``), each gap ``max_a - min_a``.

These equal fairlearn's ``demographic_parity_difference`` and
``equalized_odds_difference(..., agg=...)`` (fairlearn 0.15, default
``method='between_groups'``).

Multiclass (one-vs-rest): for each class ``c`` the binary quantities above are
computed with ``Yhat == c`` as the positive prediction and ``Y == c`` as the
positive label, giving one DPD / EOD per class; they are then aggregated over
all ``C`` classes by their maximum (``aggregate='max'``) or mean
(``aggregate='mean'``).  Report both.

Edge cases (matching fairlearn where fairlearn defines them):

* **A group with no examples** (no example with ``A=a``, or all its weights 0)
  is *ignored*: it takes no part in the max/min.  (fairlearn only ever sees
  the groups present in the data.)  If no group at all has examples the
  difference is NaN.
* **A group with no positives** (``Y=1``) has ``TPR_a = 0``, and a group with
  no negatives has ``FPR_a = 0``; such groups *do* take part in the max/min.
  This is fairlearn's behaviour: its ``true_positive_rate`` /
  ``false_positive_rate`` use scikit-learn's row-normalised confusion matrix,
  which turns the 0/0 of an empty row into 0.  In the multiclass case the same
  rule applies per class (a class absent from a group's labels gives that
  group ``TPR = 0`` for the class).

Weights / padding: ``weights`` is an optional per-example weight (normally 0/1,
to ignore padded rows; fractional weights act like fairlearn's
``sample_weight``).  Examples whose group id lies outside ``[0, num_groups)``,
whose prediction (or label) lies outside ``[0, num_classes)`` -- for the binary
functions, outside ``{0, 1}`` -- get weight 0 as well: a jitted function
cannot raise on bad data, so such rows are dropped (a ``-1`` padding value is
therefore safe).

All counts are one-hot sums: ``count[g, c] = sum_i w_i [A_i=g] [Yhat_i=c]`` as
an einsum of an ``(n, G)`` and an ``(n, C)`` one-hot matrix; no Python loop over
examples, classes or groups.  Everything is jit- and vmap-compatible with
``num_groups``, ``num_classes`` and the string options static.  The binary
public functions may infer ``num_groups = max(groups) + 1`` on the host, which
needs concrete ``groups``: under ``jax.vmap``/``jax.jit`` (e.g. inside
:func:`prunebias_jax.metrics.stats.bootstrap_ci`) pass ``num_groups``.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prunebias_jax.metrics.bias import _check_choice  # one string-option check for all metrics
from prunebias_jax.metrics.confusion import _check_num_classes

__all__ = [
  "EOD_AGGREGATIONS",
  "CLASS_AGGREGATIONS",
  "GroupRates",
  "demographic_parity_difference",
  "demographic_parity_difference_multiclass",
  "equalized_odds_difference",
  "equalized_odds_difference_multiclass",
  "group_rates",
]

ArrayLike = Any

EOD_AGGREGATIONS: tuple[str, ...] = ("worst_case", "mean")
CLASS_AGGREGATIONS: tuple[str, ...] = ("max", "mean")

_HIGHEST = jax.lax.Precision.HIGHEST


class GroupRates(NamedTuple):
  """Per group x class one-vs-rest rates and the counts behind them.

  Attributes (``G`` groups, ``C`` classes; weighted counts):
    selection_rate: ``(G, C)`` ``P(Yhat=c | A=g)``.
    tpr: ``(G, C)`` ``P(Yhat=c | Y=c, A=g)``; 0.0 where the group has no
      example of class ``c`` (fairlearn's rule).
    fpr: ``(G, C)`` ``P(Yhat=c | Y!=c, A=g)``; 0.0 where the group has no
      example of another class.
    count: ``(G,)`` number of examples in each group (0: group absent,
      its rates are 0.0 and are ignored by the differences).
    positives: ``(G, C)`` examples of group ``g`` with ``Y=c``.
    negatives: ``(G, C)`` examples of group ``g`` with ``Y!=c``.

  String keys work too: ``rates['tpr']``.
  """

  selection_rate: jax.Array
  tpr: jax.Array
  fpr: jax.Array
  count: jax.Array
  positives: jax.Array
  negatives: jax.Array

  def __getitem__(self, key):  # type: ignore[override]
    if isinstance(key, str):
      if key not in self._fields:
        raise KeyError(f"{key!r} is not a field of GroupRates; fields are {self._fields}")
      return getattr(self, key)
    return tuple.__getitem__(self, key)


# --------------------------------------------------------------------------
# Validation helpers (Python side, before jit)
# --------------------------------------------------------------------------


def _check_num_groups(num_groups: int) -> int:
  try:
    value = operator.index(num_groups)
  except TypeError as err:
    raise TypeError(
      f"num_groups must be a Python int (static under jit), got {num_groups!r}"
    ) from err
  if isinstance(num_groups, bool) or value < 1:
    raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
  return value


def _resolve_num_groups(groups: ArrayLike, num_groups: int | None) -> int:
  """``num_groups`` if given, else ``max(groups) + 1`` computed on the host."""
  if num_groups is not None:
    return _check_num_groups(num_groups)
  if isinstance(groups, jax.core.Tracer):
    raise ValueError(
      "num_groups cannot be inferred from traced groups (inside jit/vmap); "
      "pass num_groups explicitly"
    )
  g = np.asarray(groups)
  if g.size == 0:
    raise ValueError("groups is empty; pass num_groups explicitly")
  if not (np.issubdtype(g.dtype, np.integer) or g.dtype == np.bool_):
    raise TypeError(f"groups must hold integer group ids, got dtype {g.dtype}")
  return max(int(g.max()) + 1, 1)


def _as_int(x: ArrayLike, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.int32)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer ids, got dtype {x.dtype}")
  return x.astype(jnp.int32)


def _as_binary(x: ArrayLike) -> jax.Array:
  """0/1 values (any dtype) -> int32 0/1; anything else -> -1 (dropped)."""
  x = jnp.asarray(x)
  return jnp.where(x == 1, 1, jnp.where(x == 0, 0, -1)).astype(jnp.int32)


def _check_vector(x: jax.Array, n: int | None, name: str) -> int:
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D (n,), got shape {x.shape}")
  if n is not None and x.shape[0] != n:
    raise ValueError(f"{name} must have shape ({n},), got {x.shape}")
  return x.shape[0]


# --------------------------------------------------------------------------
# Core (traceable, static num_groups / num_classes)
# --------------------------------------------------------------------------


def _counts(
  labels: jax.Array | None,
  predictions: jax.Array,
  groups: jax.Array,
  weights: ArrayLike | None,
  num_groups: int,
  num_classes: int,
) -> GroupRates:
  """Group x class counts and rates by one-hot einsums (int inputs, -1 = dropped)."""
  n = _check_vector(predictions, None, "predictions")
  _check_vector(groups, n, "groups")
  if labels is not None:
    _check_vector(labels, n, "labels")
  if weights is None:
    w = jnp.ones((n,), jnp.float32)
  else:
    w = jnp.asarray(weights, jnp.float32)
    _check_vector(w, n, "weights")

  ok = (groups >= 0) & (groups < num_groups) & (predictions >= 0) & (predictions < num_classes)
  if labels is not None:
    ok = ok & (labels >= 0) & (labels < num_classes)
  w = jnp.where(ok, w, 0.0)

  gw = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32) * w[:, None]  # (n, G)
  pred_oh = jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)  # (n, C)
  count = gw.sum(axis=0)  # (G,)
  selected = jnp.einsum("ng,nc->gc", gw, pred_oh, precision=_HIGHEST)
  selection_rate = _safe_div(selected, count[:, None])

  if labels is None:
    zeros = jnp.zeros_like(selected)
    return GroupRates(selection_rate, zeros, zeros, count, zeros, zeros)

  label_oh = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # (n, C)
  correct = (labels == predictions).astype(jnp.float32)
  positives = jnp.einsum("ng,nc->gc", gw, label_oh, precision=_HIGHEST)
  tp = jnp.einsum("ng,nc->gc", gw * correct[:, None], label_oh, precision=_HIGHEST)
  negatives = count[:, None] - positives
  fp = selected - tp
  return GroupRates(
    selection_rate=selection_rate,
    tpr=_safe_div(tp, positives),
    fpr=_safe_div(fp, negatives),
    count=count,
    positives=positives,
    negatives=negatives,
  )


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0.0 (fairlearn's 0/0 -> 0 rule)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _gap(rate: jax.Array, count: jax.Array) -> jax.Array:
  """``max_a rate[a] - min_a rate[a]`` over present groups (``count > 0``); ``(G, C) -> (C,)``.

  NaN if no group is present.
  """
  present = (count > 0)[:, None]
  hi = jnp.max(jnp.where(present, rate, -jnp.inf), axis=0)
  lo = jnp.min(jnp.where(present, rate, jnp.inf), axis=0)
  return jnp.where(present.any(), hi - lo, jnp.nan)


def _eod_per_class(rates: GroupRates, agg: str) -> jax.Array:
  tpr_gap = _gap(rates.tpr, rates.count)
  fpr_gap = _gap(rates.fpr, rates.count)
  if agg == "worst_case":
    return jnp.maximum(tpr_gap, fpr_gap)
  return 0.5 * (tpr_gap + fpr_gap)


def _aggregate(values: jax.Array, aggregate: str) -> jax.Array:
  return values.max() if aggregate == "max" else values.mean()


def _group_rates_jit(labels, predictions, groups, weights, num_groups, num_classes) -> GroupRates:
  return _counts(
    _as_int(labels, "labels"),
    _as_int(predictions, "predictions"),
    _as_int(groups, "groups"),
    weights,
    num_groups,
    num_classes,
  )


# jax.jit by assignment, not as a decorator: mutation testing reaches only undecorated
# bodies (docs/mutation.md).
_group_rates_jit = jax.jit(_group_rates_jit, static_argnames=("num_groups", "num_classes"))


def _dpd_binary_jit(predictions, groups, weights, num_groups) -> jax.Array:
  rates = _counts(None, _as_binary(predictions), _as_int(groups, "groups"), weights, num_groups, 2)
  return _gap(rates.selection_rate, rates.count)[1]


_dpd_binary_jit = jax.jit(_dpd_binary_jit, static_argnames="num_groups")


def _eod_binary_jit(labels, predictions, groups, weights, num_groups, agg) -> jax.Array:
  rates = _counts(
    _as_binary(labels), _as_binary(predictions), _as_int(groups, "groups"), weights, num_groups, 2
  )
  return _eod_per_class(rates, agg)[1]


_eod_binary_jit = jax.jit(_eod_binary_jit, static_argnames=("num_groups", "agg"))


def _dpd_multiclass_jit(predictions, groups, weights, num_groups, num_classes, aggregate):
  rates = _counts(
    None,
    _as_int(predictions, "predictions"),
    _as_int(groups, "groups"),
    weights,
    num_groups,
    num_classes,
  )
  return _aggregate(_gap(rates.selection_rate, rates.count), aggregate)


_dpd_multiclass_jit = jax.jit(
  _dpd_multiclass_jit, static_argnames=("num_groups", "num_classes", "aggregate")
)


def _eod_multiclass_jit(
  labels, predictions, groups, weights, num_groups, num_classes, agg, aggregate
):
  rates = _counts(
    _as_int(labels, "labels"),
    _as_int(predictions, "predictions"),
    _as_int(groups, "groups"),
    weights,
    num_groups,
    num_classes,
  )
  return _aggregate(_eod_per_class(rates, agg), aggregate)


_eod_multiclass_jit = jax.jit(
  _eod_multiclass_jit, static_argnames=("num_groups", "num_classes", "agg", "aggregate")
)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def group_rates(
  labels: ArrayLike,
  predictions: ArrayLike,
  groups: ArrayLike,
  num_groups: int,
  num_classes: int,
  weights: ArrayLike | None = None,
) -> GroupRates:
  """Per group x class one-vs-rest selection rate, TPR and FPR.

  With ``w_i`` the example weights and ``[.]`` the indicator:

  * ``count_g = sum_i w_i [A_i=g]``
  * ``SR[g, c] = sum_i w_i [A_i=g][Yhat_i=c] / count_g``
  * ``TPR[g, c] = sum_i w_i [A_i=g][Y_i=c][Yhat_i=c] / sum_i w_i [A_i=g][Y_i=c]``
  * ``FPR[g, c] = sum_i w_i [A_i=g][Y_i!=c][Yhat_i=c] / sum_i w_i [A_i=g][Y_i!=c]``

  A zero denominator gives 0.0 (see the module docstring).

  Args:
    labels: ``(n,)`` integer true classes.
    predictions: ``(n,)`` integer predicted classes.
    groups: ``(n,)`` integer group ids in ``[0, num_groups)``.
    num_groups: ``G`` (static Python int).
    num_classes: ``C`` (static Python int).
    weights: optional ``(n,)`` example weights (0 ignores a padded row).

  Returns:
    :class:`GroupRates` with ``(G, C)`` rates and the counts behind them.
  """
  return _group_rates_jit(
    labels,
    predictions,
    groups,
    weights,
    _check_num_groups(num_groups),
    _check_num_classes(num_classes),
  )


def demographic_parity_difference(
  predictions: ArrayLike,
  groups: ArrayLike,
  *,
  num_groups: int | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Demographic parity difference ``max_a P(Yhat=1|A=a) - min_a P(Yhat=1|A=a)``.

  Equals ``fairlearn.metrics.demographic_parity_difference(y_true, predictions,
  sensitive_features=groups)``.  Groups without examples are ignored.

  Args:
    predictions: ``(n,)`` binary predictions (0/1, any dtype); other values
      are dropped.
    groups: ``(n,)`` integer group ids.
    num_groups: ``G`` (static); inferred as ``max(groups) + 1`` on the host
      when omitted (needs concrete ``groups``: pass it under jit/vmap).
    weights: optional ``(n,)`` example weights (0 ignores a padded row).

  Returns:
    float32 scalar (NaN if no group has examples).
  """
  return _dpd_binary_jit(predictions, groups, weights, _resolve_num_groups(groups, num_groups))


def equalized_odds_difference(
  labels: ArrayLike,
  predictions: ArrayLike,
  groups: ArrayLike,
  *,
  agg: str = "worst_case",
  num_groups: int | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Equalized odds difference of binary predictions.

  ``TPR gap = max_a TPR_a - min_a TPR_a``, ``FPR gap = max_a FPR_a - min_a FPR_a``;
  ``EOD = max(TPR gap, FPR gap)`` for ``agg='worst_case'``, ``(TPR gap + FPR gap)/2``
  for ``agg='mean'``.  Equals ``fairlearn.metrics.equalized_odds_difference(labels,
  predictions, sensitive_features=groups, agg=agg)``, including fairlearn's rule
  that a present group with no positives (negatives) has TPR (FPR) 0.

  Args:
    labels: ``(n,)`` binary true labels (0/1); other values are dropped.
    predictions: ``(n,)`` binary predictions (0/1); other values are dropped.
    groups: ``(n,)`` integer group ids.
    agg: ``'worst_case'`` or ``'mean'`` (fairlearn's argument name and values).
    num_groups: ``G`` (static); inferred on the host when omitted.
    weights: optional ``(n,)`` example weights (0 ignores a padded row).

  Returns:
    float32 scalar (NaN if no group has examples).
  """
  _check_choice("agg", agg, EOD_AGGREGATIONS)
  return _eod_binary_jit(
    labels, predictions, groups, weights, _resolve_num_groups(groups, num_groups), agg
  )


def demographic_parity_difference_multiclass(
  predictions: ArrayLike,
  groups: ArrayLike,
  num_classes: int,
  *,
  aggregate: str = "max",
  num_groups: int | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """One-vs-rest DPD aggregated over classes.

  ``DPD_c = max_a P(Yhat=c|A=a) - min_a P(Yhat=c|A=a)``; returns ``max_c DPD_c``
  (``aggregate='max'``) or ``(1/C) sum_c DPD_c`` (``aggregate='mean'``) over
  all ``C`` classes.

  Args:
    predictions: ``(n,)`` integer predicted classes in ``[0, num_classes)``.
    groups: ``(n,)`` integer group ids.
    num_classes: ``C`` (static).
    aggregate: ``'max'`` or ``'mean'``.
    num_groups: ``G`` (static); inferred on the host when omitted.
    weights: optional ``(n,)`` example weights.
  """
  _check_choice("aggregate", aggregate, CLASS_AGGREGATIONS)
  return _dpd_multiclass_jit(
    predictions,
    groups,
    weights,
    _resolve_num_groups(groups, num_groups),
    _check_num_classes(num_classes),
    aggregate,
  )


def equalized_odds_difference_multiclass(
  labels: ArrayLike,
  predictions: ArrayLike,
  groups: ArrayLike,
  num_classes: int,
  *,
  agg: str = "worst_case",
  aggregate: str = "max",
  num_groups: int | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """One-vs-rest EOD aggregated over classes.

  Per class ``c`` (positive label ``Y=c``, positive prediction ``Yhat=c``):
  ``EOD_c = max(TPR gap_c, FPR gap_c)`` (``agg='worst_case'``) or their mean
  (``agg='mean'``), gaps taken over present groups with fairlearn's 0/0 -> 0
  rule.  Returns ``max_c EOD_c`` (``aggregate='max'``) or ``mean_c EOD_c``
  (``aggregate='mean'``) over all ``C`` classes.

  Args:
    labels: ``(n,)`` integer true classes.
    predictions: ``(n,)`` integer predicted classes.
    groups: ``(n,)`` integer group ids.
    num_classes: ``C`` (static).
    agg: ``'worst_case'`` or ``'mean'`` (how the TPR and FPR gaps combine).
    aggregate: ``'max'`` or ``'mean'`` (how the classes combine).
    num_groups: ``G`` (static); inferred on the host when omitted.
    weights: optional ``(n,)`` example weights.
  """
  _check_choice("agg", agg, EOD_AGGREGATIONS)
  _check_choice("aggregate", aggregate, CLASS_AGGREGATIONS)
  return _eod_multiclass_jit(
    labels,
    predictions,
    groups,
    weights,
    _resolve_num_groups(groups, num_groups),
    _check_num_classes(num_classes),
    agg,
    aggregate,
  )
