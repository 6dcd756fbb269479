"""Pruning: masks from the dense weights, by method and sparsity.

Methods (all one-shot from given weights; a gradual schedule calls `prune` repeatedly with
the previous masks, and already-pruned units stay pruned):
- `l1_filter`: structured, layer-wise — in every prunable layer zero the round(s·F) output
  filters with the smallest L1 norm (the paper's method).
- `global_magnitude`: unstructured — the round(s·N) smallest |w| over all prunable layers.
- `layer_magnitude`: unstructured — the round(s·n_l) smallest |w| in each layer.
- `random`: unstructured, layer-wise — round(s·n_l) uniformly random weights in each layer.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from prunebias_jax.choices import PRUNING_METHODS as METHODS
from prunebias_jax.pruning.masks import (
  apply_masks,
  build_masks,
  dense_masks,
  is_prunable,
  mask_sparsity,
  masks_from_flat,
  masks_to_flat,
  prunable_layers,
  sparsity_report,
)
from prunebias_jax.pruning.scores import (
  keep_mask,
  l1_filter_scores,
  magnitude_scores,
  random_scores,
)

PyTree = Any


def _previous(previous_masks: PyTree | None) -> dict[str, np.ndarray]:
  return (
    {}
    if previous_masks is None
    else {n: np.asarray(m) for n, m in masks_to_flat(previous_masks).items()}
  )


def prune(
  params: PyTree, method: str, sparsity: float, seed: int = 0, previous_masks: PyTree | None = None
) -> PyTree:
  """Masks (pytree shaped like `params`) removing the fraction `sparsity` by `method`.

  `previous_masks`: units already pruned get score −∞ so they stay pruned (monotone schedules).
  """
  if method not in METHODS:
    raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(METHODS)}")
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity {sparsity!r} is outside [0, 1)")
  layers = {n: np.asarray(k) for n, k in prunable_layers(params).items()}
  prev = _previous(previous_masks)
  result: dict[str, np.ndarray] = {}

  if method == "l1_filter":
    for name, k in layers.items():
      scores = l1_filter_scores(k)
      if name in prev:  # a filter counts as pruned when all its weights are masked
        scores = np.where(prev[name].reshape(-1, k.shape[-1]).any(axis=0), scores, -np.inf)
      filters = keep_mask(scores, int(round(sparsity * scores.size)))
      result[name] = np.broadcast_to(filters, k.shape).copy()
  elif method == "global_magnitude":
    scores = {n: magnitude_scores(k) for n, k in layers.items()}
    for n in prev:
      scores[n] = np.where(prev[n], scores[n], -np.inf)
    flat = np.concatenate([s.reshape(-1) for s in scores.values()])
    keep = keep_mask(flat, int(round(sparsity * flat.size)))
    offset = 0
    for name, k in layers.items():
      result[name] = keep[offset : offset + k.size].reshape(k.shape)
      offset += k.size
  else:
    rng = np.random.default_rng(seed)
    for name, k in layers.items():
      scores = magnitude_scores(k) if method == "layer_magnitude" else random_scores(k, rng)
      if name in prev:
        scores = np.where(prev[name], scores, -np.inf)
      result[name] = keep_mask(scores, int(round(sparsity * k.size)))

  return build_masks(params, lambda name, _: jnp.asarray(result[name]))


__all__ = [
  "METHODS",
  "apply_masks",
  "build_masks",
  "dense_masks",
  "is_prunable",
  "mask_sparsity",
  "masks_from_flat",
  "masks_to_flat",
  "prunable_layers",
  "prune",
  "sparsity_report",
]
