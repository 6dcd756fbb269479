"""The AGP cubic schedule against hand-computed values."""

from __future__ import annotations

import pytest

from prunebias_jax.pruning.schedule import agp_sparsity, pruning_steps


def _distiller_agp(initial: float, final: float, start: int, end: int, freq: int, epochs: int):
  """The authors' AgpPruningRate (Distiller's AGP), written out independently: 1-based
  epochs start, start+freq, ... while ≤ end, span = the distance from the first to the last."""
  prune_epochs = [e for e in range(start, epochs + 1) if (e - start) % freq == 0 and e <= end]
  span = prune_epochs[-1] - start
  return {e: final + (initial - final) * (1 - (e - start) / span) ** 3 for e in prune_epochs}


def test_agp_matches_the_paper_formula():
  # Paper: s_e = s + (0.1 - s)(1 - (e-1)/span)^3, e 1-based, span = 115 of 240 epochs.
  s, span = 0.45, 115
  for e in (1, 6, 61, 116):
    expected = s + (0.1 - s) * (1 - (e - 1) / span) ** 3
    assert agp_sparsity(e - 1, s, 0.1, span) == pytest.approx(expected)
  assert agp_sparsity(0, s, 0.1, span) == pytest.approx(0.1)
  assert agp_sparsity(span, s, 0.1, span) == pytest.approx(s)
  assert agp_sparsity(200, s, 0.1, span) == pytest.approx(s)


@pytest.mark.parametrize("target", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_pruning_steps_equal_the_authors_schedule(target):
  """AgpPruningRate(0.1, s, 1, 120, 5) over 240 epochs: re-pruning at epochs 1, 6, ..., 116
  (24 steps), the target reached at epoch 116 — not 121."""
  authors = _distiller_agp(0.1, target, 1, 120, 5, 240)
  assert list(authors) == list(range(1, 117, 5)) and len(authors) == 24
  steps = pruning_steps(240, target, schedule="gradual", initial=0.1, frequency=5, end_fraction=0.5)
  assert list(steps) == [e - 1 for e in authors]  # 0-based epochs
  for e, value in authors.items():
    assert steps[e - 1] == pytest.approx(value, abs=1e-12)
  assert steps[115] == target and max(steps) == 115


def test_pruning_steps_edge_cases():
  assert pruning_steps(10, 0.9, schedule="one_shot") == {0: 0.9}
  assert pruning_steps(1, 0.9, schedule="gradual") == {0: 0.9}  # no room for a ramp
  # 4 epochs, ramp over the first 2 (1-based epochs 1 and 2): from 0.1 straight to the target.
  assert pruning_steps(4, 0.9, schedule="gradual", frequency=1) == {0: pytest.approx(0.1), 1: 0.9}
  # 8 epochs: ramp over 1-based epochs 1..4, span 3: s_i = 0.9 − 0.8·(1 − i/3)³.
  assert pruning_steps(8, 0.9, schedule="gradual", frequency=1) == {
    0: pytest.approx(0.1),
    1: pytest.approx(0.9 - 0.8 * 8 / 27),
    2: pytest.approx(0.9 - 0.8 / 27),
    3: 0.9,
  }
  assert pruning_steps(10, 0.05, schedule="gradual") == {0: 0.05}  # target below the start
  with pytest.raises(ValueError, match="unknown pruning schedule 'agp'"):
    pruning_steps(10, 0.5, schedule="agp")
