"""The AGP cubic schedule against hand-computed values."""

from __future__ import annotations

import pytest

from prunebias_jax.pruning.schedule import agp_sparsity, pruning_steps


def test_agp_matches_the_paper_formula():
  # Paper: s_e = s + (0.1 - s)(1 - (e-1)/span)^3, e 1-based, span = 120 of 240 epochs.
  s, span = 0.45, 120
  for e in (1, 6, 61, 116):
    expected = s + (0.1 - s) * (1 - (e - 1) / span) ** 3
    assert agp_sparsity(e - 1, s, 0.1, span) == pytest.approx(expected)
  assert agp_sparsity(0, s, 0.1, span) == pytest.approx(0.1)
  assert agp_sparsity(span, s, 0.1, span) == pytest.approx(s)
  assert agp_sparsity(200, s, 0.1, span) == pytest.approx(s)


def test_pruning_steps_paper_schedule():
  steps = pruning_steps(240, 0.45, schedule="gradual", initial=0.1, frequency=5, end_fraction=0.5)
  assert list(steps)[:3] == [0, 5, 10] and max(steps) == 120
  assert len(steps) == 24 + 1  # epochs 0, 5, ..., 115, and 120 where the target is reached
  values = list(steps.values())
  assert values == sorted(values) and values[0] == pytest.approx(0.1) and values[-1] == 0.45


def test_pruning_steps_edge_cases():
  assert pruning_steps(10, 0.9, schedule="one_shot") == {0: 0.9}
  assert pruning_steps(1, 0.9, schedule="gradual") == {0: 0.9}  # no room for a ramp
  assert pruning_steps(4, 0.9, schedule="gradual", frequency=1) == {
    0: pytest.approx(0.1),
    1: pytest.approx(0.9 - 0.8 / 8),
    2: 0.9,
  }
  assert pruning_steps(10, 0.05, schedule="gradual") == {0: 0.05}  # target below the start
  with pytest.raises(ValueError, match="unknown pruning schedule 'agp'"):
    pruning_steps(10, 0.5, schedule="agp")
