"""The sweep's units of work and how shards split them.

    plan(config)                    -> [Unit]   the cells, in the order the report lists them
    shard(units, count, index)      -> [Unit]   the index-th of `count` disjoint, balanced subsets

A unit is one fine-tuning of one compression for one seed group: a cell (method, sparsity,
CE/KD/feature distillation, temperature) and the seeds trained together (`population`),
named like its training stage (`stages.stage_name`, e.g. 'l1_filter_s0.5_kd_seed0'). The
dense models (the teacher and the dense population) are one more unit, 'dense', that every
cell needs: the serial part of a sweep. Both lists depend on the config alone, so every
worker, shard and engine derives the same ones without loading data.

Balance: a unit costs its number of models times 1 (CE), 1.5 (a loss with the teacher's
forward pass: KD and the feature methods) or 0.01 (post-training quantization: calibration
and an evaluation, no training); units go, costliest first, to the shard with the least cost
so far (ties to the lower index), and each shard runs its units in plan order.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from prunebias_jax import stages

DENSE = "dense"  # the dense unit's name (its lock, record file and provenance stage)


class Unit(NamedTuple):
  """One cell for one seed group; `group` is the group's seeds (the masks are pruned per
  group), `seeds` those the cell has models for."""

  name: str
  index: int  # position in the plan
  cell: stages.Cell
  group: tuple[int, ...]
  seeds: tuple[int, ...]

  @property
  def cost(self) -> float:
    if self.cell.distill == stages.PTQ:
      return 0.01 * len(self.seeds)
    return (1.0 if self.cell.distill == "ce" else 1.5) * len(self.seeds)

  @property
  def checkpoints(self) -> list[str]:
    """The checkpoint names of its models (none for a post-training-quantized cell)."""
    if self.cell.distill == stages.PTQ:
      return []
    return [self.cell.checkpoint_name(s) for s in self.seeds]


def plan(config: ml_collections.ConfigDict) -> list[Unit]:
  """Every cell of the sweep for every seed group, in the order a single process trains them."""
  units = []
  for group, method, sparsity in stages.pruning_groups(config):
    for cell in stages.variants(config, method, sparsity):
      seeds = stages.cell_seeds(config, cell, group)
      if not seeds:  # a PTQ of the unpruned teacher: one model, made in the first group
        continue
      name = stages.stage_name([cell.checkpoint_name(s) for s in seeds])
      units.append(Unit(name, len(units), cell, tuple(group), tuple(seeds)))
  return units


def shard(units: list[Unit], count: int, index: int) -> list[Unit]:
  """The `index`-th of `count` disjoint subsets of `units` whose costs are balanced (greedy,
  costliest first), in plan order; their union is `units`."""
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"shard {index} of {count}: need 0 <= index < count")
  load = [0.0] * count
  owner = {}
  for unit in sorted(units, key=lambda u: (-u.cost, u.index)):
    target = min(range(count), key=lambda i: (load[i], i))
    owner[unit.index] = target
    load[target] += unit.cost
  return [u for u in units if owner[u.index] == index]
