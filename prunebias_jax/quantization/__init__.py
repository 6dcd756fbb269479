"""Compression by quantization, through Qwix: the schemes, the quantized model, the static
calibration and the deployed model's size.

A scheme quantizes every conv and dense kernel of a model (the classifier head included)
symmetrically per output channel, s_c = max|W_c| / (2^(b−1) − ½) and Ŵ = s_c·clip(round(W/s_c),
−2^(b−1), 2^(b−1) − 1) (Qwix's absmax rule; 'minmax' makes it asymmetric); the activations a
scheme names are quantized per example at run time ('dynamic') or with scales calibrated on
training images ('static'). The same fake-quantized forward pass serves post-training
quantization (PTQ: the teacher's weights, evaluated quantized) and quantization-aware
fine-tuning (QAT: the straight-through gradient of the rounding trains the float weights).

A compression method is a pruning method, a scheme, or both ('l1_filter+int8_weights': prune,
then quantize the pruned model); `split_method` reads one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from prunebias_jax.data.pipeline import normalize
from prunebias_jax.pruning.masks import layer_name

PyTree = Any


class Scheme(NamedTuple):
  """What a scheme quantizes: the kernels' bits, and the activations' (None: float)."""

  weight_bits: int
  act_bits: int | None = None
  static: bool = False  # activations with calibrated scales (else per example, at run time)


SCHEMES: dict[str, Scheme] = {
  "int8_weights": Scheme(8),
  "int4_weights": Scheme(4),
  "int8_dynamic": Scheme(8, 8),
  "int8_static": Scheme(8, 8, static=True),
}
QTYPES = {8: jnp.int8, 4: jnp.int4}
STATS = "quant_stats"  # the Flax collection of a static scheme's calibrated activation ranges


def split_method(method: str) -> tuple[str | None, str | None]:
  """'l1_filter+int8_weights' → ('l1_filter', 'int8_weights'); 'int8_weights' → (None,
  'int8_weights'); a pruning method → (method, None)."""
  base, _, scheme = method.rpartition("+")
  if scheme in SCHEMES:
    return base or None, scheme
  return method, None


def is_quantized(method: str | None) -> bool:
  """Whether a record's `method` quantizes."""
  return method is not None and split_method(method)[1] is not None


def quantized_model(
  model: nn.Module,
  scheme: str,
  weight_calibration: str = "absmax",
  act_calibration: str = "absmax",
) -> nn.Module:
  """`model` with the scheme's fake quantization of every conv/dense kernel (and activation)
  intercepted by Qwix; same variables (plus `quant_stats` for a static scheme)."""
  s = SCHEMES[scheme]
  rule = qwix.QtRule(
    module_path=".*",
    weight_qtype=QTYPES[s.weight_bits],
    weight_calibration_method=weight_calibration,
    act_qtype=QTYPES[s.act_bits] if s.act_bits else None,
    act_calibration_method=act_calibration if s.act_bits else None,
    act_static_scale=s.static if s.act_bits else None,
  )
  return qwix.quantize_model(model, qwix.QtProvider([rule]))


def calibrate(qmodel: nn.Module, variables: PyTree, chunks, mean, std) -> PyTree:
  """A static scheme's activation ranges ({'quant_stats': ...}) from `chunks` (an iterable of
  equal-sized uint8/float image batches): Qwix's running mean of each chunk's mean
  per-example absmax (or min/max) at the input of every quantized op.

  Runs eagerly: Qwix 0.1.8 updates the ranges inside the convolution's custom VJP, which
  cannot be traced (an UnexpectedTracerError under `jax.jit`); the quantized model itself,
  with the ranges frozen, is traced as usual."""

  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  base = {k: v for k, v in variables.items() if k != STATS}
  stats: dict = {}
  for chunk in chunks:
    x = normalize(jnp.asarray(chunk), mean, std)
    _, stats = qmodel.apply({**base, **stats}, x, train=False, mutable=[STATS])
  if not stats:
    raise ValueError("calibrate needs at least one chunk of images")
  return stats


def calibration_chunk(num_images: int, max_chunk: int) -> int:
  """The largest divisor of `num_images` not above `max_chunk`: equal chunks weigh every
  calibration image alike in Qwix's running mean."""
  return max(d for d in range(1, min(num_images, max_chunk) + 1) if num_images % d == 0)


def _bytes(values: int, bits: int) -> int:
  return math.ceil(values * bits / 8)


def model_bytes(variables: PyTree, scheme: str | None = None) -> int:
  """The deployed size of `variables` ({'params', 'batch_stats'[, 'quant_stats']}) in bytes.

  Kernels (conv and dense) at the scheme's bits (float32 without one), each stored densely or,
  when smaller, in a bitmap sparse format (one bit per weight + the non-zero values), plus
  one float32 scale per output channel when quantized; every other array (biases, BatchNorm
  parameters and statistics, calibrated ranges) in float32.
  """
  bits = SCHEMES[scheme].weight_bits if scheme else 32
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    x = np.asarray(leaf)
    if layer_name(path).endswith("/kernel") and x.ndim >= 2 and path[0].key == "params":
      dense = _bytes(x.size, bits)
      sparse = _bytes(x.size, 1) + _bytes(int(np.count_nonzero(x)), bits)
      total += min(dense, sparse) + (4 * x.shape[-1] if scheme else 0)
    else:
      total += 4 * x.size
  return total
