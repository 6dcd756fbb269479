"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import numpy as np

from prunebias_jax.data.dataset import Dataset, Split, channel_stats


def stratified_split(
  labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Train/test index arrays with the same class proportions in both (seeded, deterministic)."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):  # loop over classes of a tiny host-side split, not a metric
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * idx.size))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction: float = 0.4, split_seed: int = 0) -> Dataset:
  """1,797 8x8 grey-scale digits (10 classes), split stratified into train/test.

  Pixel values 0..16 are scaled to 0..255 uint8 so every source shares the uint8 pipeline.
  """
  from sklearn.datasets import load_digits as _sk_load_digits  # local: only this source needs it

  raw = _sk_load_digits()
  images = np.clip(np.round(raw.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
  labels = raw.target.astype(np.int32)
  train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
  train = Split(images[train_idx], labels[train_idx])
  test = Split(images[test_idx], labels[test_idx])
  mean, std = channel_stats(train.images)
  return Dataset(
    name="digits",
    train=train,
    test=test,
    num_classes=10,
    class_names=tuple(str(i) for i in range(10)),
    mean=mean,
    std=std,
  )
