"""Masks as a pytree shaped like `params`.

A mask leaf is a bool array for every prunable kernel (conv and dense kernels, except the
classifier `head`) and `None` for everything else (biases, BatchNorm scales, the head). The
effective weights are `params ⊙ masks` in every forward pass, and pruned weights are re-zeroed
after every optimizer update so that momentum and weight decay cannot revive them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
HEAD_MODULE = "head"


def layer_name(path) -> str:
  """'stage1/block0/conv1/kernel' for a flax params path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_prunable(path, leaf) -> bool:
  """Conv/dense kernels outside the classifier head."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return names[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2 and HEAD_MODULE not in names


def prunable_layers(params: PyTree) -> dict[str, Any]:
  """Ordered {layer name: kernel} of the prunable leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {layer_name(p): leaf for p, leaf in flat if is_prunable(p, leaf)}


def _is_none(x) -> bool:
  return x is None


def build_masks(params: PyTree, fn) -> PyTree:
  """A masks pytree with `fn(name, kernel)` at every prunable leaf and None elsewhere."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: fn(layer_name(p), x) if is_prunable(p, x) else None, params
  )


def dense_masks(params: PyTree) -> PyTree:
  """All-True masks (a dense model in mask form)."""
  return build_masks(params, lambda _, x: jnp.ones(x.shape, bool))


def apply_masks(params: PyTree, masks: PyTree | None) -> PyTree:
  """params ⊙ masks (None mask leaves, or masks=None, leave a leaf untouched)."""
  if masks is None:
    return params
  return jax.tree.map(
    lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
    masks,
    params,
    is_leaf=_is_none,
  )


def masks_to_flat(masks: PyTree) -> dict[str, Any]:
  """{layer name: bool mask} — the checkpointed form (no None leaves)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
  return {layer_name(p): m for p, m in flat if m is not None}


def masks_from_flat(params: PyTree, flat: dict[str, Any]) -> PyTree:
  """Inverse of `masks_to_flat`, shaped like `params`."""
  expected = set(prunable_layers(params))
  if set(flat) != expected:
    raise ValueError(
      f"mask layers {sorted(flat)} do not match the model's prunable layers {sorted(expected)}"
    )
  return build_masks(params, lambda name, _: jnp.asarray(flat[name], bool))


def sparsity_report(params: PyTree) -> dict[str, Any]:
  """Realised sparsity of the prunable kernels: the fraction of exactly-zero weights.

  Returns {'global': zeros/total over all prunable kernels, 'per_layer': {name: fraction}}.
  """
  per_layer, zeros, total = {}, 0, 0
  for name, kernel in prunable_layers(params).items():
    k = np.asarray(kernel)
    z = int(np.count_nonzero(k == 0))
    per_layer[name] = z / k.size
    zeros += z
    total += k.size
  return {"global": zeros / total if total else 0.0, "per_layer": per_layer}


def mask_sparsity(masks: PyTree) -> dict[str, Any]:
  """Target sparsity encoded by the masks: {'global', 'per_layer'} fraction of False entries."""
  flat = masks_to_flat(masks)
  per_layer = {n: 1.0 - float(np.mean(np.asarray(m))) for n, m in flat.items()}
  total = sum(int(np.asarray(m).size) for m in flat.values())
  pruned = sum(int(np.asarray(m).size - np.count_nonzero(np.asarray(m))) for m in flat.values())
  return {"global": pruned / total if total else 0.0, "per_layer": per_layer}
