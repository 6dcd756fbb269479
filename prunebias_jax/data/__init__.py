"""Data sources by name, class imbalance, batching and augmentation."""

from __future__ import annotations

import ml_collections

from prunebias_jax.data.dataset import Dataset, Split, channel_stats
from prunebias_jax.data.embedded import load_digits
from prunebias_jax.data.imbalance import subsample_classes

SOURCES = ("digits",)


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Loads the configured source and applies the configured training-split imbalance.

  With `imbalance.apply_to_dense=False` (the paper's protocol) the dense teacher trains on the
  full training split and only pruning + fine-tuning see the subsampled one.
  """
  if data_config.source == "digits":
    ds = load_digits(test_fraction=data_config.test_fraction, split_seed=data_config.split_seed)
  else:
    raise ValueError(f"unknown data.source {data_config.source!r}; allowed: {', '.join(SOURCES)}")
  imb = data_config.imbalance
  if imb.classes:
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


__all__ = ["Dataset", "Split", "SOURCES", "channel_stats", "load_dataset", "subsample_classes"]
