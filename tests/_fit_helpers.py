"""Helpers of the tests that train through `fit` and compare states bit for bit
(test_resume.py, test_loop_scan.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prunebias_jax.pruning import apply_masks, prune


class Interrupted(Exception):
  """Raised by a test's crash point: the stage stops there, like a kill."""


def reprune(members: int):
  """A gradual-pruning hook that depends on the current weights and is not idempotent (it
  also shrinks the weights), so running it at the wrong point of a resumed stage, or twice,
  changes the result."""

  def hook(epoch, state):
    masks = state.masks
    if epoch == 0:
      return state
    if members == 1:
      new = prune(state.params, "global_magnitude", 0.7, previous_masks=masks)
    else:
      per = [
        prune(
          jax.tree.map(lambda x: x[j], state.params),
          "global_magnitude",
          0.7,
          previous_masks=jax.tree.map(lambda x: x[j], masks),
        )
        for j in range(members)
      ]
      new = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
    return state.replace(
      params=jax.tree.map(lambda w: 0.9 * w, apply_masks(state.params, new)), masks=new
    )

  return hook


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
