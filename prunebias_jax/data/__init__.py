"""Data sources by name, class imbalance, batching and augmentation.

`load_dataset(config.data)` reads (fields added after the first release are read with
`.get(name, default)`, so older configs keep working):

  source          'digits' | 'tfds' | 'image_folder'
  name            tfds: dataset name ('cifar10', 'cifar100', 'celeb_a', ...)
  data_dir        tfds: prepared TFDS data dir (None: the TFDS default)
  dir             image_folder: root with train/<class>/* and test/<class>/*
  cache_dir       image_folder: decoded-array cache (None: $XDG_CACHE_HOME or ~/.cache /prunebias_jax)
  train_split     'train'   (tfds split or image-folder sub-folder)
  test_split      'test'
  image_size      None/0: keep; int: resize to image_size x image_size (Pillow bilinear, antialiased)
  train_examples  0: all; n: seeded stratified subset of n (chosen before decoding)
  test_examples   0: all; n: seeded stratified subset of n
  split_seed      seed of the digits train/test split and of the subsets
  test_fraction   digits only
  label_attribute celeb_a: binary attribute used as the label (default Blond_Hair)
  group_attribute celeb_a: sensitive attribute stored in Split.groups (default Male); other
                  tfds datasets: an existing scalar feature used as groups
  imbalance       the paper's per-class subsampling of the fine-tuning split

Every bad value raises `DataError` (a ValueError) with a one-line message before training.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from prunebias_jax.data.dataset import Dataset, Split, channel_stats
from prunebias_jax.data.embedded import load_digits
from prunebias_jax.data.errors import DataError
from prunebias_jax.data.image_folder import (
  check_image_size,
  check_num_examples,
  load_image_folder,
  resize_array,
  stratified_subset,
)
from prunebias_jax.data.imbalance import subsample_classes
from prunebias_jax.data.tfds_source import load_tfds

SOURCES = ("digits", "tfds", "image_folder")


def _digits(data_config: ml_collections.ConfigDict) -> Dataset:
  """The embedded digits, with the optional subset/resize fields applied afterwards (the
  defaults leave the original behaviour untouched)."""
  seed = data_config.split_seed
  ds = load_digits(test_fraction=data_config.test_fraction, split_seed=seed)
  image_size = check_image_size(data_config.get("image_size", None))
  nums = (
    check_num_examples(data_config.get("train_examples", 0), "train_examples"),
    check_num_examples(data_config.get("test_examples", 0), "test_examples"),
  )
  if image_size is None and not any(nums):
    return ds
  splits = []
  for k, split in enumerate((ds.train, ds.test)):
    if nums[k]:
      split = split.take(stratified_subset(split.labels, nums[k], seed=(seed, k)))
    if image_size is not None:
      split = Split(
        np.stack([resize_array(img, image_size) for img in split.images]),
        split.labels,
        split.groups,
      )
    splits.append(split)
  mean, std = channel_stats(splits[0].images)
  return Dataset(
    name=ds.name,
    train=splits[0],
    test=splits[1],
    num_classes=ds.num_classes,
    class_names=ds.class_names,
    mean=mean,
    std=std,
  )


def _check_imbalance(imb, num_classes: int) -> None:
  classes, fractions = tuple(imb.classes), tuple(imb.keep_fractions)
  if len(classes) != len(fractions):
    raise DataError(
      f"data.imbalance.classes {classes} and data.imbalance.keep_fractions {fractions} "
      "must have the same length"
    )
  bad = [c for c in classes if not 0 <= int(c) < num_classes]
  if bad:
    raise DataError(
      f"data.imbalance.classes {classes} names classes {bad} outside 0..{num_classes - 1} "
      f"of this dataset ({num_classes} classes)"
    )
  if any(not 0.0 < float(f) <= 1.0 for f in fractions):
    raise DataError(f"data.imbalance.keep_fractions {fractions} must each be in (0, 1]")


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Loads the configured source and applies the configured training-split imbalance.

  With `imbalance.apply_to_dense=False` (the paper's protocol) the dense teacher trains on the
  full training split and only pruning + fine-tuning see the subsampled one.
  """
  source = data_config.source
  get = data_config.get
  common = dict(
    train_split=get("train_split", "train"),
    test_split=get("test_split", "test"),
    image_size=get("image_size", None),
    train_examples=get("train_examples", 0),
    test_examples=get("test_examples", 0),
    split_seed=get("split_seed", 0),
  )
  if source == "digits":
    ds = _digits(data_config)
  elif source == "tfds":
    ds = load_tfds(
      get("name", None),
      data_dir=get("data_dir", None),
      label_attribute=get("label_attribute", None),
      group_attribute=get("group_attribute", None),
      **common,
    )
  elif source == "image_folder":
    ds = load_image_folder(get("dir", None), cache_dir=get("cache_dir", None), **common)
  else:
    raise DataError(f"unknown data.source {source!r}; allowed: {', '.join(SOURCES)}")
  imb = data_config.imbalance
  if imb.classes:
    _check_imbalance(imb, ds.num_classes)
    full = ds.train
    reduced = subsample_classes(full, dict(zip(imb.classes, imb.keep_fractions)), seed=imb.seed)
    ds = Dataset(
      name=ds.name,
      train=reduced,
      test=ds.test,
      num_classes=ds.num_classes,
      class_names=ds.class_names,
      mean=ds.mean,
      std=ds.std,
      dense_train=None if imb.apply_to_dense else full,
    )
  return ds


__all__ = [
  "DataError",
  "Dataset",
  "Split",
  "SOURCES",
  "channel_stats",
  "load_dataset",
  "load_image_folder",
  "load_tfds",
  "stratified_subset",
  "subsample_classes",
]
