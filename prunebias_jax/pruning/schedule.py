"""Pruning schedules over the epochs of fine-tuning.

`one_shot`: the target sparsity from the first step. `gradual` (Zhu & Gupta 2017, AGP; as
in Simon Says): the sparsity rises from `initial` to the target s along the cubic

    s_i = s + (initial − s) · (1 − min(i / span, 1))³          (i = 0-based epoch)

re-pruning every `frequency` epochs while i < span, and once more at i = span, where s is
reached; span = ⌊end_fraction · epochs⌋ (the paper: every 5 epochs over the first half of
240). Units pruned earlier stay pruned (`prune(..., previous_masks=...)`).
"""

from __future__ import annotations

SCHEDULES = ("one_shot", "gradual")


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
  span = min(int(end_fraction * epochs), epochs - 1)
  if schedule == "one_shot" or span <= 0 or target <= initial:
    return {0: target}
  steps = {e: agp_sparsity(e, target, initial, span) for e in range(0, span, max(1, frequency))}
  steps[span] = target
  return steps
