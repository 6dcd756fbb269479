"""VGG with BatchNorm (configurations A = VGG-11 and D = VGG-16) for small images."""

from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from prunebias_jax.models.resnet_cifar import batch_norm, classifier_head, conv

#: Layer configurations: ints are conv3x3 widths, ``'M'`` is a 2x2 max-pool.
VGG_CFGS: dict[str, tuple[Union[int, str], ...]] = {
  "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
  "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
  """VGG-BN: conv3x3-BN-relu blocks with max-pools, GAP -> ``features`` -> ``head``.

  A max-pool is skipped when the spatial size is already 1. The map at every
  ``'M'`` point is sown as ``'stage{k}'``; the pooled 512-d vector as
  ``'features'``.

  Attributes:
      num_classes: number of output logits.
      cfg: layer configuration (see :data:`VGG_CFGS`).
      dtype: compute dtype (parameters are always float32).
  """

  num_classes: int
  cfg: Sequence[Union[int, str]]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Return float32 logits of shape ``(N, num_classes)`` for NHWC ``x``."""
    x = jnp.asarray(x, self.dtype)
    n_conv = 0
    n_stage = 0
    for item in self.cfg:
      if item == "M":
        if x.shape[1] > 1 and x.shape[2] > 1:
          x = nn.max_pool(x, (2, 2), strides=(2, 2))
        n_stage += 1
        self.sow("intermediates", f"stage{n_stage}", x)
      else:
        x = conv(int(item), 3, 1, dtype=self.dtype, name=f"conv{n_conv}")(x)
        x = batch_norm(train, dtype=self.dtype, name=f"bn{n_conv}")(x)
        x = nn.relu(x)
        n_conv += 1
    feats = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", feats)
    logits = classifier_head(self.num_classes, dtype=self.dtype)(feats)
    return jnp.asarray(logits, jnp.float32)


def vgg(name: str, num_classes: int, dtype: Any = jnp.float32) -> VGG:
  """Build ``'vgg11'`` or ``'vgg16'`` (with BatchNorm)."""
  if name not in VGG_CFGS:
    raise ValueError(f"unknown VGG variant {name!r}; allowed: {', '.join(sorted(VGG_CFGS))}")
  return VGG(num_classes=num_classes, cfg=VGG_CFGS[name], dtype=dtype)
