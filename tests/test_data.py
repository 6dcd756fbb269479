"""The embedded digits source, imbalance, the epoch iterator, eval padding and augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.data import load_dataset, subsample_classes
from prunebias_jax.data.dataset import Split, channel_stats
from prunebias_jax.data.embedded import load_digits
from prunebias_jax.data.pipeline import augment, normalize, padded_eval_arrays, train_batches


def test_digits_split_is_stratified_and_disjoint():
  ds = load_digits(test_fraction=0.4, split_seed=0)
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert len(ds.train) + len(ds.test) == 1797
  counts = ds.test.class_counts(10)
  assert counts.min() >= 69 and counts.max() <= 74  # 40% of 174..183 per class
  assert ds.train.images.dtype == np.uint8 and ds.train.images.max() == 255
  # Same seed, same split; different seed, different split.
  again = load_digits(0.4, 0)
  assert np.array_equal(again.test.labels, ds.test.labels) and np.array_equal(
    again.test.images, ds.test.images
  )
  assert not np.array_equal(load_digits(0.4, 1).test.images, ds.test.images)


def test_imbalance_only_touches_named_classes_and_finetune_split(tiny_config):
  ds = load_dataset(tiny_config.data)
  full = ds.teacher_train.class_counts(10)
  reduced = ds.train.class_counts(10)
  for c, f in zip(tiny_config.data.imbalance.classes, tiny_config.data.imbalance.keep_fractions):
    assert reduced[c] == max(1, round(f * full[c]))
  others = [c for c in range(10) if c not in tiny_config.data.imbalance.classes]
  assert np.array_equal(reduced[others], full[others])
  assert len(ds.teacher_train) > len(ds.train)


def test_subsample_is_seeded():
  split = Split(np.zeros((100, 2, 2, 1), np.uint8), np.repeat(np.arange(2), 50).astype(np.int32))
  a = subsample_classes(split, {0: 0.2}, seed=1)
  b = subsample_classes(split, {0: 0.2}, seed=1)
  assert len(a) == 60 and np.array_equal(a.labels, b.labels)


def test_train_batches_cover_each_epoch_once_and_are_deterministic():
  n, bs = 103, 10
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  split = Split(images, np.arange(n, dtype=np.int32) % 7)
  batches = list(train_batches(split, bs, seed=5, num_epochs=2))
  assert len(batches) == 2 * (n // bs)
  for epoch in (0, 1):
    seen = np.concatenate([b[1].reshape(-1) for b in batches if b[0] == epoch])
    assert (
      len(seen) == len(set(seen.tolist())) == (n // bs) * bs
    )  # no repeats; last partial batch dropped
  again = list(train_batches(split, bs, seed=5, num_epochs=2))
  assert all(np.array_equal(x[1], y[1]) for x, y in zip(batches, again))
  resumed = list(train_batches(split, bs, seed=5, start_epoch=1, num_epochs=1))
  assert all(np.array_equal(x[1], y[1]) for x, y in zip(batches[n // bs :], resumed))


@pytest.mark.parametrize("n,bs", [(719, 256), (512, 256), (5, 8)])
def test_eval_padding_counts_every_example_once(n, bs):
  images = np.random.default_rng(0).integers(0, 255, (n, 2, 2, 1), dtype=np.uint8)
  split = Split(images, np.arange(n, dtype=np.int32))
  imgs, labels, valid = padded_eval_arrays(split, bs)
  assert imgs.shape[:2] == labels.shape == valid.shape and labels.shape[1] == bs
  assert valid.sum() == n
  assert np.array_equal(labels.reshape(-1)[valid.reshape(-1) > 0], np.arange(n))
  assert np.array_equal(imgs.reshape((-1,) + images.shape[1:])[:n], images)


def test_augment_crops_are_shifts_and_flip_mirrors():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 255, (32, 6, 6, 3), dtype=np.uint8)
  out = np.asarray(augment(jax.random.key(0), jnp.asarray(images), crop_padding=2, flip=True))
  assert out.shape == images.shape and out.dtype == np.uint8
  for img, aug in zip(images, out):
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
    candidates = [padded[i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.array_equal(aug, c) for c in candidates)
  assert not np.array_equal(out, images)  # something moved
  same = np.asarray(augment(jax.random.key(0), jnp.asarray(images), crop_padding=0, flip=False))
  assert np.array_equal(same, images)


def test_normalize_matches_numpy():
  images = np.random.default_rng(1).integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
  mean, std = channel_stats(images)
  out = np.asarray(normalize(jnp.asarray(images), jnp.asarray(mean), jnp.asarray(std)))
  ref = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-5)


def test_channel_stats_match_numpy_float64():
  images = np.random.default_rng(3).integers(0, 256, (50, 5, 5, 3), dtype=np.uint8)
  images[..., 2] = 7  # a constant channel: std falls back to 1
  mean, std = channel_stats(images)
  ref = images.reshape(-1, 3).astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std[:2], ref.std(0)[:2], rtol=1e-12)
  assert std[2] == 1.0
