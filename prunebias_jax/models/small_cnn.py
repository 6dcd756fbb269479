"""A small, CPU-friendly CNN for 8x8 single-channel digits (works on any H=W >= 2)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from prunebias_jax.models.resnet_cifar import batch_norm, classifier_head, conv


class SmallCNN(nn.Module):
  """conv32-BN-relu, conv64-BN-relu, maxpool2, conv128-BN-relu, GAP, fc128-relu, head.

  Sows ``'stage1'`` (after the first two conv blocks, before pooling),
  ``'stage2'`` (after the third conv block) and ``'features'`` (the 128-d fc
  output) into ``'intermediates'``.

  Attributes:
      num_classes: number of output logits.
      dtype: compute dtype (parameters are always float32).
  """

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Return float32 logits of shape ``(N, num_classes)`` for NHWC ``x``."""
    x = jnp.asarray(x, self.dtype)
    for i, width in enumerate((32, 64)):
      x = conv(width, 3, 1, dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = batch_norm(train, dtype=self.dtype, name=f"bn{i + 1}")(x)
      x = nn.relu(x)
    self.sow("intermediates", "stage1", x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = conv(128, 3, 1, dtype=self.dtype, name="conv3")(x)
    x = batch_norm(train, dtype=self.dtype, name="bn3")(x)
    x = nn.relu(x)
    self.sow("intermediates", "stage2", x)
    x = jnp.mean(x, axis=(1, 2))
    feats = nn.relu(nn.Dense(128, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x))
    self.sow("intermediates", "features", feats)
    logits = classifier_head(self.num_classes, dtype=self.dtype)(feats)
    return jnp.asarray(logits, jnp.float32)
