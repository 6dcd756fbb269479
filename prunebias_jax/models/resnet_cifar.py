"""CIFAR-style residual networks (He et al., 2016) with basic blocks.

Includes the classic ``resnet20/32/56`` (stem width 16, stage widths 16/32/64)
and the wider ``resnet32x4`` used by RepDistiller (stem 32, widths 64/128/256).
Shortcuts are identity when the shape is unchanged and a 1x1 convolution +
BatchNorm projection otherwise.

Also defines the shared building blocks (initialisers, ``conv3x3``,
``batch_norm``, :class:`BasicBlock`) that the other models reuse.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

#: Kaiming-normal (fan_out, ReLU gain) initialiser used for every convolution.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  *,
  dtype: Dtype,
  name: str,
) -> nn.Conv:
  """Bias-free ``kernel x kernel`` convolution (always followed by BatchNorm).

  Padding is ``kernel // 2`` on every side, so a stride-1 conv keeps the
  spatial size and a stride-2 conv halves it (rounding up).
  """
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=kaiming_fan_out,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def batch_norm(train: bool, *, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm with the project-wide settings (momentum 0.9, eps 1e-5)."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def classifier_head(num_classes: int, *, dtype: Dtype) -> nn.Dense:
  """The single final classifier, always named ``'head'``."""
  return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="head")


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a residual connection.

  Attributes:
      features: output channels.
      stride: stride of the first convolution (and of the projection).
      dtype: compute dtype.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Apply the block to an NHWC map."""
    y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    y = batch_norm(train, dtype=self.dtype, name="bn1")(y)
    y = nn.relu(y)
    y = conv(self.features, 3, 1, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train, dtype=self.dtype, name="bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, dtype=self.dtype, name="proj_conv")(x)
      shortcut = batch_norm(train, dtype=self.dtype, name="proj_bn")(shortcut)
    else:
      shortcut = x
    return nn.relu(y + shortcut)


class ResNetBackbone(nn.Module):
  """Generic basic-block ResNet: stem conv3x3 -> stages -> GAP -> ``head``.

  The first block of every stage except the first uses stride 2. Sows
  ``'stage{i}'`` (NHWC map after each stage) and ``'features'`` (pooled
  vector fed to ``head``) into the ``'intermediates'`` collection.

  Attributes:
      num_classes: number of output logits.
      stage_sizes: number of blocks per stage.
      widths: output channels per stage.
      stem_width: channels of the stem convolution.
      dtype: compute dtype (parameters are always float32).
  """

  num_classes: int
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  stem_width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Return float32 logits of shape ``(N, num_classes)`` for NHWC ``x``."""
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
        f"stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} differ in length"
      )
    x = jnp.asarray(x, self.dtype)
    x = conv(self.stem_width, 3, 1, dtype=self.dtype, name="stem_conv")(x)
    x = batch_norm(train, dtype=self.dtype, name="stem_bn")(x)
    x = nn.relu(x)
    for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(width, stride, dtype=self.dtype, name=f"stage{i + 1}_block{j}")(x, train)
      self.sow("intermediates", f"stage{i + 1}", x)
    feats = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", feats)
    logits = classifier_head(self.num_classes, dtype=self.dtype)(feats)
    return jnp.asarray(logits, jnp.float32)


def cifar_resnet(depth: int, num_classes: int, dtype: Dtype = jnp.float32) -> ResNetBackbone:
  """CIFAR ResNet of the given depth (6n+2): stem 16, widths 16/32/64."""
  if depth < 8 or (depth - 2) % 6 != 0:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
  n = (depth - 2) // 6
  return ResNetBackbone(
    num_classes=num_classes,
    stage_sizes=(n, n, n),
    widths=(16, 32, 64),
    stem_width=16,
    dtype=dtype,
  )


def resnet32x4(num_classes: int, dtype: Dtype = jnp.float32) -> ResNetBackbone:
  """RepDistiller ``resnet32x4``: stem 32, widths 64/128/256, 5 blocks per stage."""
  return ResNetBackbone(
    num_classes=num_classes,
    stage_sizes=(5, 5, 5),
    widths=(64, 128, 256),
    stem_width=32,
    dtype=dtype,
  )
