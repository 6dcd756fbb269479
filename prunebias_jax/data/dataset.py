"""In-memory dataset containers shared by every data source.

Images are kept as uint8 NHWC arrays on the host: small (CIFAR-10 is 150 MB), exact, and
converted to float, augmented and normalised on the device inside the jitted steps, so no
augmented copy of the dataset is ever materialised.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: `images` uint8 (N, H, W, C), `labels` int32 (N,), optional `groups` int32 (N,)."""

  images: np.ndarray
  labels: np.ndarray
  groups: np.ndarray | None = None

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
        f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images"
      )
    if self.groups is not None and self.groups.shape != self.labels.shape:
      raise ValueError(
        f"groups shape {self.groups.shape} does not match labels {self.labels.shape}"
      )

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, indices: np.ndarray) -> "Split":
    """The sub-split at `indices` (a copy)."""
    return Split(
      images=self.images[indices],
      labels=self.labels[indices],
      groups=None if self.groups is None else self.groups[indices],
    )

  def class_counts(self, num_classes: int) -> np.ndarray:
    return np.bincount(self.labels, minlength=num_classes).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/test splits plus what the pipeline needs to know about them.

  `mean`/`std` are per-channel statistics in [0, 1] units used for normalisation.
  `dense_train` is the split the dense teacher trains on; `train` is the split pruning and
  fine-tuning see (the paper's imbalanced setting subsamples only the latter).
  """

  name: str
  train: Split
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  dense_train: Split | None = None
  # The name of each group id in the splits' `groups` (data.group_attribute), None without.
  group_names: tuple[str, ...] | None = None

  @property
  def teacher_train(self) -> Split:
    return self.train if self.dense_train is None else self.dense_train

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.test.images.shape[1:])  # type: ignore[return-value]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 NHWC images, in [0, 1] units.

  Computed exactly from a 256-bin histogram per channel, so memory stays O(1) in the number
  of images (a float64 copy of CelebA at 64 px would need ~16 GB).
  """
  channels = images.shape[-1]
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(channels):  # a handful of channels; each bincount is one vectorised pass
    hist = np.bincount(images[..., c].reshape(-1), minlength=256).astype(np.float64)
    total = hist.sum()
    mean = float((hist * values).sum() / total)
    var = float((hist * (values - mean) ** 2).sum() / total)
    std = var**0.5
    means.append(mean)
    stds.append(std if std > 0 else 1.0)  # a constant channel is left unscaled, not divided by 0
  return tuple(means), tuple(stds)
