"""Model zoo: a name -> Flax Linen module registry.

Every model follows the same conventions:

* ``__call__(x, train=False)`` on NHWC float input returns float32 logits of
  shape ``(N, num_classes)``;
* BatchNorm (momentum 0.9, eps 1e-5) with variables ``{'params', 'batch_stats'}``;
* one final ``nn.Dense(num_classes, name='head')``;
* ``'features'`` (the vector fed to ``head``) and ``'stage1'``, ``'stage2'``, ...
  are sown into the ``'intermediates'`` collection;
* ``dtype`` is the compute dtype (one of :data:`COMPUTE_DTYPES`): ``"bfloat16"`` gives mixed
  precision (bf16 convolutions and activations; float32 parameters, BatchNorm statistics and
  logits), parameters are always float32.

Example::

    model = get_model("resnet20", num_classes=10)
    variables = model.init(jax.random.key(0), x)
    logits, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    feats = state["intermediates"]["features"][0]
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from prunebias_jax.choices import COMPUTE_DTYPES
from prunebias_jax.models.resnet18 import resnet18
from prunebias_jax.models.resnet_cifar import BasicBlock, ResNetBackbone, cifar_resnet, resnet32x4
from prunebias_jax.models.small_cnn import SmallCNN
from prunebias_jax.models.vgg import VGG, VGG_CFGS, vgg

__all__ = [
  "COMPUTE_DTYPES",
  "available_models",
  "get_model",
  "BasicBlock",
  "ResNetBackbone",
  "SmallCNN",
  "VGG",
  "VGG_CFGS",
]

_Builder = Callable[[int, Any], nn.Module]

_REGISTRY: dict[str, _Builder] = {
  "small_cnn": lambda nc, dt: SmallCNN(num_classes=nc, dtype=dt),
  "resnet20": lambda nc, dt: cifar_resnet(20, nc, dt),
  "resnet32": lambda nc, dt: cifar_resnet(32, nc, dt),
  "resnet56": lambda nc, dt: cifar_resnet(56, nc, dt),
  "resnet32x4": lambda nc, dt: resnet32x4(nc, dt),
  "resnet18": lambda nc, dt: resnet18(nc, dt),
  "vgg11": lambda nc, dt: vgg("vgg11", nc, dt),
  "vgg16": lambda nc, dt: vgg("vgg16", nc, dt),
}


def _compute_dtype(dtype: Any) -> Any:
  """``'float32'``/``'bfloat16'`` (or the matching numpy/jnp dtype) -> the jnp dtype."""
  try:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
  except TypeError:
    name = None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"unknown compute dtype {dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def available_models() -> tuple[str, ...]:
  """Return the sorted names accepted by :func:`get_model`."""
  return tuple(sorted(_REGISTRY))


def get_model(name: str, num_classes: int, dtype: str = "float32") -> nn.Module:
  """Build an (uninitialised) Flax Linen module by name.

  Args:
      name: one of :func:`available_models`.
      num_classes: number of output logits (>= 2).
      dtype: compute dtype, one of :data:`COMPUTE_DTYPES` (``jnp.float32`` /
          ``jnp.bfloat16`` are accepted too). ``"bfloat16"``: convolutions, dense layers
          and activations in bf16; parameters stay float32 (``param_dtype``), BatchNorm
          statistics are reduced in float32 and the logits are returned as float32.

  Raises:
      ValueError: unknown ``name``, ``num_classes < 2`` or unknown ``dtype``.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(available_models())}")
  if (
    isinstance(num_classes, bool)
    or not isinstance(num_classes, (int, np.integer))
    or num_classes < 2
  ):
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  return _REGISTRY[name](int(num_classes), _compute_dtype(dtype))
