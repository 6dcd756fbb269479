"""Pruning scores: lower score = pruned first.

All scores are host-side NumPy (pruning runs once per model, on small kernels) and exact:
ties are broken by a stable argsort, so the same weights always give the same mask.
"""

from __future__ import annotations

import numpy as np


def magnitude_scores(kernel: np.ndarray) -> np.ndarray:
  """|w| per weight (unstructured magnitude pruning)."""
  return np.abs(np.asarray(kernel, np.float64))


def random_scores(kernel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Uniform random scores per weight (the random-pruning baseline)."""
  return rng.random(np.shape(kernel))


def l1_filter_scores(kernel: np.ndarray) -> np.ndarray:
  """L1 norm of each output filter: Σ over all axes but the last of |w| → shape (out,).

  For a conv kernel (kh, kw, in, out) a filter is one output channel; for a dense kernel
  (in, out) it is one output unit (Li et al. 2017; the Simon Says structured method).
  """
  k = np.abs(np.asarray(kernel, np.float64))
  return k.reshape(-1, k.shape[-1]).sum(axis=0)


def keep_mask(scores: np.ndarray, num_pruned: int) -> np.ndarray:
  """Bool mask of scores' shape with exactly `num_pruned` lowest-scoring entries False."""
  flat = scores.reshape(-1)
  order = np.argsort(flat, kind="stable")
  keep = np.ones(flat.shape, bool)
  keep[order[:num_pruned]] = False
  return keep.reshape(scores.shape)
