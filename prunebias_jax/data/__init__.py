"""Data sources by name, class imbalance, batching and augmentation.

`load_dataset(config.data)` reads the fields below; `prunebias_jax.config` validates them
(types, ranges, class indices) before this runs, so only what needs the files is checked here:

  source          'digits' | 'tfds' | 'image_folder'
  name            tfds: dataset name ('cifar10', 'cifar100', 'celeb_a', ...)
  data_dir        tfds: prepared TFDS data dir (None: the TFDS default)
  dir             image_folder: root with train/<class>/* and test/<class>/*
  cache_dir       image_folder: decoded-array cache (None: $XDG_CACHE_HOME/prunebias_jax or
                  ~/.cache/prunebias_jax)
  train_split     'train'   (tfds split or image-folder sub-folder)
  test_split      'test'
  image_size      None: keep; int: resize to image_size x image_size (Pillow bilinear, antialiased)
  train_examples  0: all; n: seeded stratified subset of n (chosen before decoding)
  test_examples   0: all; n: seeded stratified subset of n
  split_seed      seed of the digits train/test split and of the subsets
  test_fraction   digits only
  label_attribute celeb_a: binary attribute used as the label (default Blond_Hair)
  group_attribute sensitive attribute(s) stored in Split.groups, named in Dataset.group_names;
                  several give intersectional groups (data.groups). celeb_a: attributes
                  (default Male); other tfds datasets: scalar features; image_folder: columns
                  of the attributes table. The digits carry none.
  attributes      image_folder: the attributes table (None: attributes.csv or .jsonl at the root)
  imbalance       the paper's per-class subsampling of the fine-tuning split; classes by index
                  or by name

A source that cannot be read raises `DataError` (one line) before training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from prunebias_jax.choices import DATA_SOURCES as SOURCES
from prunebias_jax.data.dataset import Dataset, Split, channel_stats
from prunebias_jax.data.embedded import load_digits
from prunebias_jax.data.groups import attribute_names
from prunebias_jax.data.image_folder import (
  load_image_folder,
  resize_array,
  stratified_subset,
)
from prunebias_jax.data.imbalance import subsample_classes
from prunebias_jax.data.tfds_source import load_tfds
from prunebias_jax.errors import DataError


def _digits(data_config: ml_collections.ConfigDict) -> Dataset:
  """The embedded digits, with the optional subset/resize fields applied afterwards (the
  defaults leave the original behaviour untouched)."""
  seed = data_config.split_seed
  ds = load_digits(test_fraction=data_config.test_fraction, split_seed=seed)
  image_size = data_config.image_size
  nums = (data_config.train_examples, data_config.test_examples)
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


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Loads the configured source and applies the configured training-split imbalance.

  With `imbalance.apply_to_dense=False` (the paper's protocol) the dense teacher trains on the
  full training split and only pruning + fine-tuning see the subsampled one.
  """
  d = data_config
  common = dict(
    train_split=d.train_split,
    test_split=d.test_split,
    image_size=d.image_size,
    train_examples=d.train_examples,
    test_examples=d.test_examples,
    split_seed=d.split_seed,
  )
  if d.source == "digits":
    if attribute_names(d.group_attribute):
      raise DataError(
        f"data.group_attribute={d.group_attribute!r}: the embedded digits have no sensitive "
        "attributes; use an image folder with an attributes table or a TFDS dataset"
      )
    ds = _digits(d)
  elif d.source == "tfds":
    ds = load_tfds(
      d.name,
      data_dir=d.data_dir,
      label_attribute=d.label_attribute,
      group_attribute=d.group_attribute,
      **common,
    )
  elif d.source == "image_folder":
    ds = load_image_folder(
      d.dir,
      cache_dir=d.cache_dir,
      attributes=d.attributes,
      group_attribute=d.group_attribute,
      **common,
    )
  else:
    raise DataError(f"unknown data.source {d.source!r}; allowed: {', '.join(SOURCES)}")
  imb = data_config.imbalance
  if imb.classes:
    full = ds.train
    classes = class_indices(imb.classes, ds.class_names)
    reduced = subsample_classes(full, dict(zip(classes, imb.keep_fractions)), seed=imb.seed)
    ds = dataclasses.replace(ds, train=reduced, dense_train=None if imb.apply_to_dense else full)
  return ds


def class_indices(classes: Sequence[int | str], class_names: Sequence[str]) -> tuple[int, ...]:
  """`data.imbalance.classes` (indices or class names) as class indices of the dataset."""
  out = []
  for c in classes:
    if isinstance(c, str):
      if c not in class_names:
        raise DataError(
          f"data.imbalance.classes names {c!r}, which is not a class of this dataset; its "
          f"classes are {', '.join(map(repr, class_names))}"
        )
      out.append(list(class_names).index(c))
    else:
      if not 0 <= c < len(class_names):
        raise DataError(
          f"data.imbalance.classes has {c!r}; allowed: class indices in "
          f"[0, {len(class_names) - 1}] or class names"
        )
      out.append(int(c))
  if len(set(out)) != len(out):
    raise DataError(f"data.imbalance.classes {tuple(classes)} names a class twice")
  return tuple(out)


__all__ = [
  "DataError",
  "Dataset",
  "Split",
  "SOURCES",
  "channel_stats",
  "class_indices",
  "load_dataset",
  "load_image_folder",
  "load_tfds",
  "stratified_subset",
  "subsample_classes",
]
