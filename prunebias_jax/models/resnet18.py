"""ResNet-18 with a CIFAR stem (conv3x3 64, stride 1, no max-pool)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from prunebias_jax.models.resnet_cifar import ResNetBackbone


def resnet18(num_classes: int, dtype: Any = jnp.float32) -> ResNetBackbone:
  """ResNet-18 for 32x32 inputs: stages [2,2,2,2], widths 64/128/256/512.

  Stride 2 at the first block of stages 2-4; projection shortcuts (1x1 conv +
  BatchNorm) wherever the shape changes; global average pool; ``head``.
  """
  return ResNetBackbone(
    num_classes=num_classes,
    stage_sizes=(2, 2, 2, 2),
    widths=(64, 128, 256, 512),
    stem_width=64,
    dtype=dtype,
  )
