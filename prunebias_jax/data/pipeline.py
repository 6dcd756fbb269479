"""Batching and on-device augmentation.

Training: a seeded, shuffled, epoch-based index iterator over the uint8 host arrays (the last
partial batch of an epoch is dropped so every step has the same shape). Augmentation (random
crop after zero padding, horizontal flip) and normalisation run on the device inside the
jitted step, per batch, so no augmented copy of the dataset is ever built.

Evaluation: the test split is padded to a whole number of batches and a 0/1 `valid` weight
marks the padding, so every test example is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from prunebias_jax.data.dataset import Split


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full training batches per epoch (the partial last batch is dropped)."""
  return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a pure function of (seed, epoch), so a resumed run sees
  the same order as an uninterrupted one."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """(steps_per_epoch, batch_size) int32: row b holds the examples of the epoch's batch b, in
  increasing order (a sorted gather is cache friendlier); what `train_batches` gathers, and
  what the scanned loop uploads once per epoch to gather on the device."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  order = epoch_permutation(num_examples, seed, epoch)[: per_epoch * batch_size]
  return np.sort(order.reshape(per_epoch, batch_size), axis=1).astype(np.int32)


def train_batches(
  split: Split,
  batch_size: int,
  seed: int,
  start_epoch: int = 0,
  num_epochs: int | None = None,
  skip: int = 0,
  with_indices: bool = False,
) -> Iterator[tuple]:
  """Yields (epoch, images uint8, labels int32) for shuffled full batches, epoch after epoch
  (`with_indices`: (epoch, images, labels, the examples' int32 indices in the split)).

  `skip`: start after the first `skip` batches (a resumed stage): the batches that follow are
  exactly those an uninterrupted iterator would yield next, without gathering the skipped ones.
  """
  n = len(split)
  per_epoch = steps_per_epoch(n, batch_size)
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} is larger than the training split ({n} examples)")
  epoch = start_epoch + skip // per_epoch
  first = skip % per_epoch
  while num_epochs is None or epoch < start_epoch + num_epochs:
    rows = epoch_batches(n, batch_size, seed, epoch)
    for b in range(first, per_epoch):
      idx = rows[b]
      if with_indices:
        yield epoch, split.images[idx], split.labels[idx], idx
      else:
        yield epoch, split.images[idx], split.labels[idx]
    first = 0
    epoch += 1


def padded_eval_arrays(split: Split, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images (B, bs, H, W, C), labels (B, bs), valid (B, bs) float32), zero-padded at the end."""
  n = len(split)
  num_batches = max(1, -(-n // batch_size))
  pad = num_batches * batch_size - n
  images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
  labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
  valid = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = (num_batches, batch_size)
  return images.reshape(shape + images.shape[1:]), labels.reshape(shape), valid.reshape(shape)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 NHWC → (x/255 − mean)/std per channel."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - mean) / std).astype(dtype)


def augment(rng: jax.Array, images: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """Random crop of the original size after zero padding by `crop_padding`, and a random
  horizontal flip with probability ½, independently per image (uint8 in, uint8 out)."""
  if crop_padding <= 0 and not flip:
    return images
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if crop_padding > 0:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * p + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_rng, 0.5, (n,))
    images = jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)
  return images
