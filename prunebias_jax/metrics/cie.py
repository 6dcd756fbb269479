"""Compression Identified Exemplars (after Hooker et al. 2020).

Hooker et al. call an example a CIE when the modal (most frequent) predicted label of a
population of compressed models differs from the modal label of a population of reference
(dense) models.  With an odd population and two classes a mode is unique, but the populations
used here are small (2 to 4 models is common) and with ``C`` classes several labels often share
the top vote count.  Picking one of them -- say by ``argmax``, which returns the smallest tied
label -- makes the result depend on how classes happen to be numbered: a tie is always resolved
towards the low end of the label range, so per-class CIE counts skew towards one end of it.

This module therefore never picks a single mode.  Per example, each population has a *modal
set*: every label whose vote count equals the maximum.  An example is a CIE when the two modal
sets are disjoint, i.e. no label is modal in both populations.  Consequences:

* with unique modes (e.g. odd populations without ties) this is exactly "the modes differ";
* a tie in one population that includes a modal label of the other is *not* a CIE (two
  compressed models voting ``{1, 3}`` against a reference mode of 3 did not move away from 3);
* permuting the label values permutes the modal sets and leaves the CIE mask unchanged.

The CIE *strength* of an example follows the same rule: the fraction of compressed models whose
prediction is not in the reference population's modal set (with a unique reference mode, the
fraction disagreeing with it).  It is label-value free too.

`modal_predictions` still returns one label per example (the smallest label of the modal set,
via ``argmax``), for display only -- image grids and reports.  No CIE decision uses it.  On a
CIE the two displayed labels always differ, since they come from disjoint sets.

Predictions are integer label arrays of shape ``(K, n)`` (models x examples).  Vote counts come
from an ``(n, C)`` table built with one scatter-add (no ``K x n x C`` one-hot tensor); the modal
sets are ``counts == max(counts)`` per row.  These functions are meant to be called on the host
with concrete arrays: they validate label ranges and, without ``num_classes``, infer ``C`` from
the data.  The vote counting itself is jitted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "cie_report",
  "compression_identified_exemplars",
  "modal_label_sets",
  "modal_predictions",
  "pruning_identified_exemplars_all_disagree",
]

ArrayLike = Any


def _as_population(predictions: ArrayLike, name: str) -> np.ndarray:
  """``(n,)`` or ``(K, n)`` integer labels -> ``(K, n)`` int array (checked)."""
  arr = np.asarray(predictions)
  if arr.ndim == 1:
    arr = arr[None, :]
  if arr.ndim != 2:
    raise ValueError(f"{name} must have shape (models, examples), got {arr.shape}")
  if arr.shape[0] < 1:
    raise ValueError(f"{name} needs at least one model")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.equal(np.mod(arr, 1), 0)):
      raise ValueError(f"{name} must hold integer labels")
  arr = arr.astype(np.int64)
  if arr.size and arr.min() < 0:
    raise ValueError(f"{name} has negative labels")
  return arr


def _resolve_num_classes(num_classes: int | None, *populations: np.ndarray) -> int:
  top = max((int(p.max()) for p in populations if p.size), default=-1)
  if num_classes is None:
    return max(top + 1, 1)
  num_classes = int(num_classes)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if top >= num_classes:
    raise ValueError(f"a label {top} is out of range for num_classes={num_classes}")
  return num_classes


def _vote_counts(predictions: jax.Array, num_classes: int) -> jax.Array:
  """``(n, C)`` int32 counts: ``counts[i, c] = #{k : predictions[k, i] = c}``."""
  k, n = predictions.shape
  examples = jnp.broadcast_to(jnp.arange(n), (k, n))
  return jnp.zeros((n, num_classes), jnp.int32).at[examples, predictions].add(1)


# jax.jit by assignment, not as a decorator: mutation testing reaches only undecorated
# bodies (docs/mutation.md).
_vote_counts = jax.jit(_vote_counts, static_argnames=("num_classes",))


def _modal_sets(predictions: jax.Array, num_classes: int) -> jax.Array:
  """``(n, C)`` bool: ``sets[i, c]`` iff label ``c`` has the maximal vote count on example ``i``.

  ``K >= 1``, so the maximum is at least 1 and a label nobody predicted is never modal.
  """
  counts = _vote_counts(predictions, num_classes)
  return counts == jnp.max(counts, axis=1, keepdims=True)


_modal_sets = jax.jit(_modal_sets, static_argnames=("num_classes",))


def _modes(predictions: jax.Array, num_classes: int) -> jax.Array:
  # Display only. argmax returns the first maximal index: the smallest label of the modal set.
  return jnp.argmax(_vote_counts(predictions, num_classes), axis=1).astype(jnp.int32)


_modes = jax.jit(_modes, static_argnames=("num_classes",))


def _disjoint(reference_sets: jax.Array, compressed_sets: jax.Array) -> jax.Array:
  """``(n,)`` bool CIE mask: no label is modal in both populations."""
  return ~jnp.any(reference_sets & compressed_sets, axis=1)


_disjoint = jax.jit(_disjoint)


def modal_label_sets(predictions: ArrayLike, num_classes: int | None = None) -> jax.Array:
  """Modal set per example of a ``(K, n)`` population (``(n,)`` = one model).

  ``sets[i, c] = #{k : p[k, i] = c} == max_c' #{k : p[k, i] = c'}``: every label with the
  maximal vote count, so a tie yields several True entries per row and no label value is
  preferred.  ``num_classes`` defaults to ``max label + 1``.  Returns ``(n, C)`` bool.
  """
  pop = _as_population(predictions, "predictions")
  c = _resolve_num_classes(num_classes, pop)
  return _modal_sets(jnp.asarray(pop, jnp.int32), c)


def modal_predictions(predictions: ArrayLike, num_classes: int | None = None) -> jax.Array:
  """One modal label per example of a ``(K, n)`` population (``(n,)`` = one model), for display.

  ``mode_i = argmax_c #{k : p[k, i] = c}``: on a tie this shows the *smallest* tied label,
  an arbitrary choice.  CIE decisions never use it; they compare `modal_label_sets`.
  ``num_classes`` defaults to ``max label + 1``.  Returns ``(n,)`` int32.
  """
  pop = _as_population(predictions, "predictions")
  c = _resolve_num_classes(num_classes, pop)
  return _modes(jnp.asarray(pop, jnp.int32), c)


def compression_identified_exemplars(
  reference_predictions: ArrayLike,
  compressed_predictions: ArrayLike,
  num_classes: int | None = None,
) -> jax.Array:
  """CIE mask: the modal sets of the two populations are disjoint, per example.

  Example ``i`` is a CIE when no label is modal (has the maximal vote count) in both
  populations.  With unique modes this is ``mode(compressed)_i != mode(reference)_i``; a tie
  that includes a modal label of the other population is not a CIE.

  Args:
    reference_predictions: ``(K_ref, n)`` labels of the dense population
      (``(n,)`` for a single model).
    compressed_predictions: ``(K, n)`` labels of the compressed population.
    num_classes: ``C``; defaults to ``max label + 1`` over both populations.

  Returns:
    ``(n,)`` bool array, True for compression identified exemplars.
  """
  ref = _as_population(reference_predictions, "reference_predictions")
  comp = _as_population(compressed_predictions, "compressed_predictions")
  if ref.shape[1] != comp.shape[1]:
    raise ValueError(
      f"populations cover different numbers of examples: {ref.shape[1]} and {comp.shape[1]}"
    )
  c = _resolve_num_classes(num_classes, ref, comp)
  return _disjoint(
    _modal_sets(jnp.asarray(ref, jnp.int32), c), _modal_sets(jnp.asarray(comp, jnp.int32), c)
  )


def pruning_identified_exemplars_all_disagree(
  teacher_predictions: ArrayLike,
  compressed_predictions: ArrayLike,
) -> jax.Array:
  """The Simon Says code's stricter "PIE" count -- a different quantity from CIEs.

  ``(n,)`` bool, True where *every* one of the ``K`` compressed models
  predicts a label different from the single teacher's:
  ``all_k p[k, i] != teacher_i``.  (A CIE only needs the compressed *mode*
  to be disjoint from the reference modal set.)
  """
  teacher = np.asarray(teacher_predictions)
  if teacher.ndim != 1:
    raise ValueError(f"teacher_predictions must be (n,), got {teacher.shape}")
  comp = _as_population(compressed_predictions, "compressed_predictions")
  if comp.shape[1] != teacher.shape[0]:
    raise ValueError(
      f"teacher has {teacher.shape[0]} examples, compressed population {comp.shape[1]}"
    )
  return jnp.all(jnp.asarray(comp) != jnp.asarray(teacher)[None, :], axis=0)


def _subset_accuracy(predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float | None:
  """Population-mean accuracy on ``mask``: ``mean_k mean_{i in mask} [p_ki = y_i]``; None if
  empty."""
  if not mask.any():
    return None
  return float(np.mean(predictions[:, mask] == labels[None, mask]))


def cie_report(
  labels: ArrayLike,
  reference_predictions: ArrayLike,
  compressed_predictions: ArrayLike,
  num_classes: int,
) -> dict[str, Any]:
  """CIE summary of a reference and a compressed population on one test set.

  Keys:
    ``num_examples``, ``num_reference_models``, ``num_compressed_models``;
    ``num_cie`` (int) and ``cie_fraction`` (``num_cie / n``);
    ``reference_accuracy_cie``, ``reference_accuracy_non_cie``,
    ``compressed_accuracy_cie``, ``compressed_accuracy_non_cie``: population
    mean accuracy on that subset (mean over models and examples), or None
    when the subset is empty (no CIE, or every example a CIE) -- never NaN;
    ``per_class_cie_counts``: ``(C,)`` int64 counts of CIEs by *true* label;
    ``cie_indices``: int64 indices of the CIEs sorted by strength descending
    (ties by index), and ``cie_strength`` aligned with it, where strength is
    the fraction of compressed models whose prediction is not in the
    reference population's modal set (label-value free; with a unique
    reference mode, the fraction disagreeing with it);
    ``cie_mask`` ``(n,)`` bool (modal sets disjoint, see the module docstring);
    ``num_ties_reference``, ``num_ties_compressed``: numbers of examples whose
    modal set in that population has more than one label;
    ``reference_modes`` and ``compressed_modes`` ``(n,)`` int64, display only
    (`modal_predictions`: smallest tied label; inputs for
    `report.write_cie_grid`; on a CIE the two always differ).

  Arrays are NumPy (call ``.tolist()`` for JSON).
  """
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f"labels must be (n,), got {y.shape}")
  ref = _as_population(reference_predictions, "reference_predictions")
  comp = _as_population(compressed_predictions, "compressed_predictions")
  n = y.shape[0]
  if ref.shape[1] != n or comp.shape[1] != n:
    raise ValueError(f"labels have {n} examples, populations {ref.shape[1]} and {comp.shape[1]}")
  y = y.astype(np.int64)
  c = _resolve_num_classes(num_classes, ref, comp, y)
  if n and y.min() < 0:
    raise ValueError("labels has negative entries")
  ref_j, comp_j = jnp.asarray(ref, jnp.int32), jnp.asarray(comp, jnp.int32)
  ref_sets_j, comp_sets_j = _modal_sets(ref_j, c), _modal_sets(comp_j, c)
  mask = np.asarray(_disjoint(ref_sets_j, comp_sets_j))
  ref_sets, comp_sets = np.asarray(ref_sets_j), np.asarray(comp_sets_j)
  ref_modes = np.asarray(_modes(ref_j, c)).astype(np.int64)
  comp_modes = np.asarray(_modes(comp_j, c)).astype(np.int64)
  # in_ref[k, i]: compressed model k predicts a label of the reference modal set on example i
  in_ref = ref_sets[np.arange(n)[None, :], comp]
  strength_all = np.mean(~in_ref, axis=0) if n else np.zeros(0)
  cie_idx = np.flatnonzero(mask)
  order = np.argsort(-strength_all[cie_idx], kind="stable")
  cie_idx = cie_idx[order].astype(np.int64)
  num_cie = int(mask.sum())
  return {
    "num_examples": int(n),
    "num_reference_models": int(ref.shape[0]),
    "num_compressed_models": int(comp.shape[0]),
    "num_cie": num_cie,
    "cie_fraction": num_cie / n if n else None,
    "reference_accuracy_cie": _subset_accuracy(ref, y, mask),
    "reference_accuracy_non_cie": _subset_accuracy(ref, y, ~mask),
    "compressed_accuracy_cie": _subset_accuracy(comp, y, mask),
    "compressed_accuracy_non_cie": _subset_accuracy(comp, y, ~mask),
    "per_class_cie_counts": np.bincount(y[mask], minlength=c).astype(np.int64),
    "cie_indices": cie_idx,
    "cie_strength": strength_all[cie_idx],
    "cie_mask": mask,
    "num_ties_reference": int(np.count_nonzero(ref_sets.sum(axis=1) > 1)),
    "num_ties_compressed": int(np.count_nonzero(comp_sets.sum(axis=1) > 1)),
    "reference_modes": ref_modes,
    "compressed_modes": comp_modes,
  }
