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
  modal_label_sets,
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


def modal_sets_loop(population):
  """Reference modal set per example with Python loops: every label with the most votes."""
  population = np.atleast_2d(np.asarray(population))
  out = []
  for i in range(population.shape[1]):
    counts = Counter(int(v) for v in population[:, i])
    best = max(counts.values())
    out.append({label for label, c in counts.items() if c == best})
  return out


def cie_loop(reference, compressed):
  """Reference CIE mask: the two modal sets share no label."""
  return np.array(
    [not (r & c) for r, c in zip(modal_sets_loop(reference), modal_sets_loop(compressed))],
    dtype=bool,
  )


def strength_loop(reference, compressed):
  """Fraction of compressed models whose prediction is outside the reference modal set."""
  compressed = np.atleast_2d(np.asarray(compressed))
  sets = modal_sets_loop(reference)
  return np.array(
    [
      sum(int(v) not in sets[i] for v in compressed[:, i]) / compressed.shape[0]
      for i in range(compressed.shape[1])
    ]
  )


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
    np.testing.assert_array_equal(cie, cie_loop(ref, pop))
    sets = np.asarray(modal_label_sets(pop, num_classes=c))
    assert sets.shape == (200, c) and sets.dtype == np.bool_
    assert [set(np.flatnonzero(row).tolist()) for row in sets] == modal_sets_loop(pop)


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
  )  # modal sets: {0, 1}, {2}, {1, 2}, {1, 3}, {0, 1}
  cie = compression_identified_exemplars(ref, comp)
  assert cie.dtype == jnp.bool_ and cie.shape == (5,)
  # only example 1 has disjoint sets ({1} vs {2}); examples 2 and 3 were CIEs under the old
  # argmax rule (tie -> smaller label 1) but their compressed ties include the reference mode
  np.testing.assert_array_equal(cie, [False, True, False, False, False])
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
  # example 2 is a 0/1 tie in both (identical) populations: tied, but not a CIE
  assert rep["num_ties_reference"] == 1 and rep["num_ties_compressed"] == 1
  with pytest.raises(ValueError):
    cie_report(np.array([0, 1, 2, 0]), ref, ref, num_classes=2)  # label 2 out of range


def test_compressed_tie_with_reference_mode_is_not_cie_and_otherwise_is():
  # two compressed models predict {1, 3} on both examples
  comp = np.array([[1, 1], [3, 3]])
  ref = np.array([[3, 2], [3, 2], [3, 1]])  # reference modes: 3, then 2
  np.testing.assert_array_equal(
    modal_label_sets(comp, num_classes=4), [[False, True, False, True]] * 2
  )
  np.testing.assert_array_equal(
    modal_label_sets(ref, num_classes=4),
    [[False, False, False, True], [False, False, True, False]],
  )
  cie = np.asarray(compression_identified_exemplars(ref, comp, num_classes=4))
  np.testing.assert_array_equal(cie, [False, True])  # 3 in {1, 3}; 2 not in {1, 3}
  rep = cie_report(np.array([3, 2]), ref, comp, num_classes=4)
  np.testing.assert_array_equal(rep["cie_mask"], [False, True])
  np.testing.assert_array_equal(rep["per_class_cie_counts"], [0, 0, 1, 0])
  np.testing.assert_array_equal(rep["cie_indices"], [1])
  np.testing.assert_allclose(rep["cie_strength"], [1.0])  # neither 1 nor 3 is in {2}
  # the same question with the populations swapped: a reference tie is symmetric
  np.testing.assert_array_equal(compression_identified_exemplars(comp, ref), [False, True])


def test_ties_on_both_sides_and_strength_against_the_reference_set():
  ref = np.array([[1, 0, 1], [2, 2, 2]])  # sets {1, 2}, {0, 2}, {1, 2}
  comp = np.array(
    [
      [1, 1, 3],
      [2, 3, 3],
      [3, 1, 0],
      [0, 3, 2],
    ]
  )  # sets {0, 1, 2, 3}, {1, 3}, {3}
  cie = np.asarray(compression_identified_exemplars(ref, comp))
  np.testing.assert_array_equal(cie, [False, True, True])
  rep = cie_report(np.array([1, 0, 2]), ref, comp, num_classes=4)
  # strength = compressed models outside the reference set:
  # ex0 {1, 2}: 1,2,3,0 -> 2/4 (against the displayed mode 1 it would be 3/4);
  # ex1 {0, 2}: 1,3,1,3 -> 4/4; ex2 {1, 2}: 3,3,0,2 -> 3/4 (against mode 1: 4/4)
  np.testing.assert_array_equal(rep["cie_indices"], [1, 2])
  np.testing.assert_allclose(rep["cie_strength"], [1.0, 0.75])
  assert rep["num_ties_reference"] == 3 and rep["num_ties_compressed"] == 2
  np.testing.assert_allclose(strength_loop(ref, comp), [0.5, 1.0, 0.75])
  np.testing.assert_array_equal(rep["reference_modes"], [1, 0, 1])  # display: smallest tied


@pytest.mark.parametrize("k", [2, 3, 4])
def test_cie_is_invariant_to_relabelling(k):
  rng = np.random.default_rng(10 + k)
  c, n = 5, 300
  labels = rng.integers(0, c, size=n)
  ref = rng.integers(0, c, size=(k, n))
  comp = rng.integers(0, c, size=(k, n))
  perm = rng.permutation(c)
  assert np.any(perm != np.arange(c))
  # populations where tie-breaking matters: some examples tie, and the old argmax rule
  # (smallest tied label wins) is not invariant under this permutation
  assert any(len(s) > 1 for s in modal_sets_loop(ref) + modal_sets_loop(comp))
  old = mode_loop(ref) != mode_loop(comp)
  old_permuted = mode_loop(perm[ref]) != mode_loop(perm[comp])
  assert np.any(old != old_permuted)

  rep = cie_report(labels, ref, comp, num_classes=c)
  rep_p = cie_report(perm[labels], perm[ref], perm[comp], num_classes=c)
  np.testing.assert_array_equal(rep_p["cie_mask"], rep["cie_mask"])
  np.testing.assert_array_equal(rep["cie_mask"], cie_loop(ref, comp))
  np.testing.assert_array_equal(
    compression_identified_exemplars(perm[ref], perm[comp], num_classes=c), rep["cie_mask"]
  )
  # class perm[j] in the relabelled run is class j in the original one
  np.testing.assert_array_equal(rep_p["per_class_cie_counts"][perm], rep["per_class_cie_counts"])
  np.testing.assert_array_equal(rep_p["cie_indices"], rep["cie_indices"])
  np.testing.assert_allclose(rep_p["cie_strength"], rep["cie_strength"])
  np.testing.assert_allclose(rep["cie_strength"], strength_loop(ref, comp)[rep["cie_indices"]])
  assert rep_p["num_ties_reference"] == rep["num_ties_reference"]
  assert rep_p["num_ties_compressed"] == rep["num_ties_compressed"]
  sets = np.asarray(modal_label_sets(ref, c))
  np.testing.assert_array_equal(np.asarray(modal_label_sets(perm[ref], c))[:, perm], sets)


def _old_modes_differ(reference, compressed):
  """Hooker et al.'s definition with Counter: the single most common labels differ."""
  out = []
  for i in range(reference.shape[1]):
    r = Counter(int(v) for v in reference[:, i]).most_common(1)[0][0]
    m = Counter(int(v) for v in compressed[:, i]).most_common(1)[0][0]
    out.append(r != m)
  return np.array(out, dtype=bool)


def _untied(population):
  out = []
  for i in range(population.shape[1]):
    top = Counter(int(v) for v in population[:, i]).most_common(2)
    out.append(len(top) == 1 or top[0][1] > top[1][1])
  return np.array(out, dtype=bool)


def test_odd_populations_without_ties_match_modes_differ():
  rng = np.random.default_rng(5)
  # two classes and odd populations: modes are always unique
  for k_ref, k in ((1, 1), (1, 3), (3, 5), (5, 7)):
    ref = rng.integers(0, 2, size=(k_ref, 400))
    comp = rng.integers(0, 2, size=(k, 400))
    rep = cie_report(rng.integers(0, 2, size=400), ref, comp, num_classes=2)
    assert rep["num_ties_reference"] == 0 and rep["num_ties_compressed"] == 0
    np.testing.assert_array_equal(rep["cie_mask"], _old_modes_differ(ref, comp))
    np.testing.assert_array_equal(
      compression_identified_exemplars(ref, comp), _old_modes_differ(ref, comp)
    )
    ref_mode = np.array([Counter(ref[:, i].tolist()).most_common(1)[0][0] for i in range(400)])
    idx = rep["cie_indices"]
    np.testing.assert_allclose(rep["cie_strength"], np.mean(comp[:, idx] != ref_mode[idx], 0))
  # more classes: restrict to the examples where neither odd population ties
  for k_ref, k in ((3, 3), (5, 3), (3, 7)):
    ref = rng.integers(0, 6, size=(k_ref, 600))
    comp = rng.integers(0, 6, size=(k, 600))
    keep = _untied(ref) & _untied(comp)
    assert 50 < keep.sum() < 600
    cie = np.asarray(compression_identified_exemplars(ref, comp, num_classes=6))
    np.testing.assert_array_equal(cie[keep], _old_modes_differ(ref[:, keep], comp[:, keep]))


def test_tie_counts():
  ref = np.array(
    [
      [0, 1, 2, 0, 4],
      [1, 1, 3, 0, 4],
      [2, 0, 3, 1, 4],
    ]
  )  # sets {0, 1, 2}, {1}, {3}, {0}, {4}: one tie
  comp = np.array(
    [
      [0, 1, 2, 3, 4],
      [1, 2, 2, 3, 0],
    ]
  )  # sets {0, 1}, {1, 2}, {2}, {3}, {0, 4}: three ties
  rep = cie_report(np.zeros(5, dtype=int), ref, comp, num_classes=5)
  assert rep["num_ties_reference"] == 1
  assert rep["num_ties_compressed"] == 3
  np.testing.assert_array_equal(rep["cie_mask"], [False, False, True, True, False])
  rng = np.random.default_rng(7)
  for k in (1, 2, 4, 6):
    pop = rng.integers(0, 4, size=(k, 250))
    rep = cie_report(rng.integers(0, 4, 250), pop[:1], pop, num_classes=4)
    assert rep["num_ties_compressed"] == sum(len(s) > 1 for s in modal_sets_loop(pop))
    assert rep["num_ties_reference"] == 0  # a single model never ties
    np.testing.assert_array_equal(rep["cie_mask"], cie_loop(pop[:1], pop))


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


def test_modal_label_sets_honours_num_classes_and_names_bad_predictions():
  preds = np.array([[0, 1, 2], [0, 2, 2]])
  sets = np.asarray(modal_label_sets(preds, num_classes=5))
  assert sets.shape == (3, 5)  # the given C, not the 3 labels seen
  np.testing.assert_array_equal(sets[:, 3:], False)
  np.testing.assert_array_equal(sets[:, :3], [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
  assert np.asarray(modal_label_sets(preds)).shape == (3, 3)  # inferred: max label + 1
  with pytest.raises(ValueError, match=r"^predictions must have shape \(models, examples\)"):
    modal_label_sets(np.zeros((2, 2, 2), np.int32))


def test_cie_report_modes_are_integer_labels():
  ref = np.array([[0, 1, 2, 2], [0, 1, 2, 1]])
  comp = np.array([[1, 1, 0, 2], [1, 1, 0, 2]])
  report = cie_report(np.array([0, 1, 2, 2]), ref, comp, num_classes=3)
  for key in ("reference_modes", "compressed_modes"):
    assert report[key].dtype == np.int64, key
  np.testing.assert_array_equal(report["compressed_modes"], [1, 1, 0, 2])
  np.testing.assert_array_equal(report["reference_modes"], [0, 1, 2, 1])  # tie 1/2: smallest


def test_float_predictions_are_taken_when_integral_and_refused_otherwise():
  ints = np.array([[0, 1, 2], [0, 2, 2]])
  np.testing.assert_array_equal(
    modal_label_sets(ints.astype(np.float32), num_classes=3), modal_label_sets(ints, num_classes=3)
  )
  with pytest.raises(ValueError, match="^predictions must hold integer labels$"):
    modal_label_sets(np.array([[0.0, 1.5, 2.0]]), num_classes=3)
