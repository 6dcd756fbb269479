"""Pruning schedules over the epochs of fine-tuning.

`one_shot`: the target sparsity from the first step. `gradual` (Zhu & Gupta 2017, AGP; as
in Simon Says): the sparsity rises from `initial` to the target s along the cubic

    s_i = s + (initial − s) · (1 − min(i / span, 1))³          (i = 0-based epoch)

re-pruning every `frequency` epochs from the first epoch up to the last re-pruning epoch that
still falls inside the first `end_fraction` of fine-tuning, where s is reached:

    E = ⌊end_fraction · epochs⌋,   span = frequency · ⌊(E − 1) / frequency⌋   (≤ epochs − 1)

This is the authors' schedule (`AgpPruningRate(0.1, s, 1, 120, 5)` for 240 epochs): 1-based
epochs 1, 6, …, 116, i.e. span = 115 and 24 re-prunings, the target reached at epoch 116
(not 121). With span = 0 there is no room for a ramp and the target applies from the start.
Units pruned earlier stay pruned (`prune(..., previous_masks=...)`).
"""

from __future__ import annotations

from prunebias_jax.choices import PRUNING_SCHEDULES as SCHEDULES


def agp_sparsity(epoch: int, target: float, initial: float, span: int) -> float:
  """The cubic AGP sparsity at 0-based `epoch` (equal to `target` from `span` on)."""
  if span <= 0:
    return target
  progress = min(epoch / span, 1.0)
  return target + (initial - target) * (1.0 - progress) ** 3


def pruning_steps(
  epochs: int,
  target: float,
  *,
  schedule: str,
  initial: float = 0.1,
  frequency: int = 5,
  end_fraction: float = 0.5,
) -> dict[int, float]:
  """{0-based epoch at whose start to prune: sparsity}; the last entry is always `target`."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown pruning schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
  frequency = max(1, frequency)
  last = int(end_fraction * epochs)  # the 1-based epoch that ends the ramp
  span = min(frequency * ((last - 1) // frequency), epochs - 1)
  if schedule == "one_shot" or span <= 0 or target <= initial:
    return {0: target}
  steps = {e: agp_sparsity(e, target, initial, span) for e in range(0, span + 1, frequency)}
  steps[span] = target  # exactly, whatever the rounding of the cubic
  return steps
