"""The paper's imbalanced setting: keep only a fraction of some classes' training images."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prunebias_jax.data.dataset import Split


def subsample_classes(split: Split, keep_fractions: Mapping[int, float], seed: int) -> Split:
  """Keep round(f·n_c) randomly chosen examples of each class c in `keep_fractions` (at least 1).

  Classes not named keep all their examples. Sampling is seeded, so the same config always
  keeps the same images; the test split is never passed through here.
  """
  rng = np.random.default_rng(seed)
  keep = np.ones(len(split), dtype=bool)
  for c, frac in sorted(keep_fractions.items()):
    idx = np.flatnonzero(split.labels == c)
    n_keep = max(1, int(round(frac * idx.size))) if idx.size else 0
    drop = rng.permutation(idx)[n_keep:]
    keep[drop] = False
  return split.take(np.flatnonzero(keep))
