"""Tests for prunebias_jax.metrics.cie (Compression Identified Exemplars)."""

from __future__ import annotations

import os
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.metrics.cie import (
  cie_report,
  compression_identified_exemplars,
  modal_predictions,
  pruning_identified_exemplars_all_disagree,
)
from prunebias_jax.report import write_cie_grid as save_cie_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def mode_loop(population):
  """Reference mode per example with Python loops: most votes, ties -> smaller label."""
  population = np.atleast_2d(np.asarray(population))
  out = []
  for i in range(population.shape[1]):
    counts = Counter(int(v) for v in population[:, i])
    best = max(counts.values())
    out.append(min(label for label, c in counts.items() if c == best))
  return np.array(out)


def test_argmax_returns_first_maximum():
  # the tie rule relies on this
  assert int(jnp.argmax(jnp.array([1, 3, 3, 0]))) == 1
  np.testing.assert_array_equal(jnp.argmax(jnp.array([[2, 2, 0], [0, 1, 1]]), axis=1), [0, 1])


def test_modal_predictions_ties_go_to_smaller_label():
  pop = np.array(
    [
      [0, 1, 2, 5, 7],
      [1, 0, 2, 3, 7],
      [2, 2, 1, 5, 4],
      [3, 2, 1, 3, 4],
    ]
  )
  # col0: 0,1,2,3 all once -> 0; col1: 2 twice -> 2; col2: 2 vs 1 tie -> 1;
  # col3: 5 vs 3 tie -> 3; col4: 7 vs 4 tie -> 4
  expected = [0, 2, 1, 3, 4]
  np.testing.assert_array_equal(modal_predictions(pop), expected)
  np.testing.assert_array_equal(modal_predictions(pop, num_classes=10), expected)
  np.testing.assert_array_equal(mode_loop(pop), expected)
  # a single model is its own mode
  np.testing.assert_array_equal(modal_predictions(pop[2]), pop[2])
  with pytest.raises(ValueError):
    modal_predictions(pop, num_classes=6)  # label 7 out of range
  with pytest.raises(ValueError):
    modal_predictions(np.array([[0, -1]]))


def test_modes_match_loop_reference_on_random_populations():
  rng = np.random.default_rng(0)
  for k, c in ((1, 3), (4, 3), (7, 10), (30, 5)):
    pop = rng.integers(0, c, size=(k, 200))
    np.testing.assert_array_equal(modal_predictions(pop, num_classes=c), mode_loop(pop))
    ref = rng.integers(0, c, size=(5, 200))
    cie = np.asarray(compression_identified_exemplars(ref, pop, num_classes=c))
    np.testing.assert_array_equal(cie, mode_loop(ref) != mode_loop(pop))


def test_cie_hand_built():
  ref = np.array(
    [
      [0, 1, 2, 3, 1],
      [0, 1, 2, 3, 0],
      [0, 1, 1, 3, 0],
    ]
  )  # modes: 0, 1, 2, 3, 0
  comp = np.array(
    [
      [0, 2, 2, 1, 1],
      [0, 2, 1, 3, 0],
      [1, 1, 1, 1, 1],
      [1, 2, 2, 3, 0],
    ]
  )  # modes: 0/1 tie -> 0, 2, 1/2 tie -> 1, 1/3 tie -> 1, 0/1 tie -> 0
  cie = compression_identified_exemplars(ref, comp)
  assert cie.dtype == jnp.bool_ and cie.shape == (5,)
  np.testing.assert_array_equal(cie, [False, True, True, True, False])
  # everyone agrees -> no CIE
  assert not np.any(compression_identified_exemplars(ref, ref))
  assert not np.any(compression_identified_exemplars(ref[:1], np.repeat(ref[:1], 4, axis=0)))
  with pytest.raises(ValueError):
    compression_identified_exemplars(ref, comp[:, :4])


def test_all_disagree_is_stricter():
  teacher = np.array([0, 1, 2, 3])
  comp = np.array(
    [
      [1, 0, 2, 0],
      [2, 0, 1, 3],
      [1, 0, 1, 0],
    ]
  )
  pie = np.asarray(pruning_identified_exemplars_all_disagree(teacher, comp))
  np.testing.assert_array_equal(pie, [True, True, False, False])
  # example 3: the compressed mode (0) differs from the teacher (3), so it is a
  # CIE, but one pruned model agrees with the teacher: not in the strict count
  np.testing.assert_array_equal(
    compression_identified_exemplars(teacher, comp), [True, True, True, True]
  )
  with pytest.raises(ValueError):
    pruning_identified_exemplars_all_disagree(teacher[:3], comp)


def test_cie_report_constructed_case():
  labels = np.array([0, 1, 2, 2, 1, 0])
  ref = np.array(
    [
      [0, 1, 2, 2, 1, 0],
      [0, 1, 2, 1, 1, 0],
      [1, 1, 2, 2, 0, 0],
    ]
  )  # modes 0 1 2 2 1 0
  comp = np.array(
    [
      [0, 2, 0, 2, 1, 1],
      [0, 2, 0, 2, 0, 1],
      [1, 1, 0, 2, 0, 0],
      [0, 2, 1, 2, 0, 1],
    ]
  )  # modes 0 2 0 2 0 1 -> CIE at 1, 2, 4, 5
  rep = cie_report(labels, ref, comp, num_classes=3)
  cie = np.array([False, True, True, False, True, True])
  np.testing.assert_array_equal(rep["cie_mask"], cie)
  assert rep["num_cie"] == 4
  assert rep["cie_fraction"] == pytest.approx(4 / 6)
  assert (rep["num_examples"], rep["num_reference_models"], rep["num_compressed_models"]) == (
    6,
    3,
    4,
  )

  def loop_accuracy(pop, subset):
    hits = total = 0
    for model in pop:
      for i in range(len(labels)):
        if subset[i]:
          hits += int(model[i] == labels[i])
          total += 1
    return hits / total

  assert rep["reference_accuracy_cie"] == pytest.approx(loop_accuracy(ref, cie))
  assert rep["reference_accuracy_non_cie"] == pytest.approx(loop_accuracy(ref, ~cie))
  assert rep["compressed_accuracy_cie"] == pytest.approx(loop_accuracy(comp, cie))
  assert rep["compressed_accuracy_non_cie"] == pytest.approx(loop_accuracy(comp, ~cie))
  # by hand: reference on CIE {1,2,4,5}: 3+3+2+3 = 11 of 12
  assert rep["reference_accuracy_cie"] == pytest.approx(11 / 12)
  # compressed on CIE: ex1 1/4, ex2 0/4, ex4 1/4, ex5 1/4 -> 3/16
  assert rep["compressed_accuracy_cie"] == pytest.approx(3 / 16)
  # per class by true label: labels at CIE = 1, 2, 1, 0
  np.testing.assert_array_equal(rep["per_class_cie_counts"], [1, 2, 1])
  # strength = fraction of compressed models != reference mode:
  # ex1 (mode 1): 3/4, ex2 (mode 2): 4/4, ex4 (mode 1): 3/4, ex5 (mode 0): 3/4
  np.testing.assert_array_equal(rep["cie_indices"], [2, 1, 4, 5])
  np.testing.assert_allclose(rep["cie_strength"], [1.0, 0.75, 0.75, 0.75])
  np.testing.assert_array_equal(rep["reference_modes"], [0, 1, 2, 2, 1, 0])
  np.testing.assert_array_equal(rep["compressed_modes"], [0, 2, 0, 2, 0, 1])


def test_cie_report_without_cie_has_no_nan():
  labels = np.array([0, 1, 1, 0])
  ref = np.array([[0, 1, 0, 0], [0, 1, 1, 0]])
  rep = cie_report(labels, ref, ref, num_classes=2)
  assert rep["num_cie"] == 0 and rep["cie_fraction"] == 0.0
  assert rep["reference_accuracy_cie"] is None and rep["compressed_accuracy_cie"] is None
  assert rep["reference_accuracy_non_cie"] == pytest.approx(7 / 8)
  assert rep["cie_indices"].shape == (0,)
  np.testing.assert_array_equal(rep["per_class_cie_counts"], [0, 0])
  with pytest.raises(ValueError):
    cie_report(np.array([0, 1, 2, 0]), ref, ref, num_classes=2)  # label 2 out of range


def test_save_cie_grid_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, size=10)
  ref = rng.integers(0, 3, size=10)
  comp = rng.integers(0, 3, size=10)
  path = tmp_path / "figs" / "cie.png"
  drawn = save_cie_grid(
    path, images, [3, 1, 7, 0, 9], ref, comp, labels, ["cat", "dog", "ship"], max_images=4
  )
  assert drawn == 4
  data = path.read_bytes()
  assert len(data) > 0 and data[:8] == PNG_SIGNATURE
  assert os.listdir(path.parent) == ["cie.png"]  # no temporary file left behind

  grey = rng.integers(0, 256, size=(5, 6, 6, 1), dtype=np.uint8)
  gpath = tmp_path / "grey.png"
  assert save_cie_grid(gpath, grey, np.arange(5), ref[:5], comp[:5], labels[:5], None) == 5
  assert gpath.read_bytes()[:8] == PNG_SIGNATURE
  epath = tmp_path / "empty.png"
  assert save_cie_grid(epath, grey, [], ref[:5], comp[:5], labels[:5], None) == 0
  assert epath.read_bytes()[:8] == PNG_SIGNATURE
  with pytest.raises(ValueError):
    save_cie_grid(tmp_path / "bad.png", images.astype(np.float32), [0], ref, comp, labels, None)
