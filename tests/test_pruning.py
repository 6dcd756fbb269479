"""Masks: exact sparsity per method, the right weights chosen, and sparsity kept by training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.models import get_model
from prunebias_jax.pruning import (
  METHODS,
  apply_masks,
  mask_sparsity,
  masks,
  masks_from_flat,
  masks_to_flat,
  prunable_layers,
  prune,
  sparsity_report,
)
from prunebias_jax.train import create_state, make_optimizer, make_train_step


@pytest.fixture(scope="module")
def resnet20_params():
  model = get_model("resnet20", 10)
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]


def test_prunable_layers_exclude_head_and_non_kernels(resnet20_params):
  names = list(prunable_layers(resnet20_params))
  assert names and all(n.endswith("kernel") for n in names)
  assert not any("head" in n for n in names)
  assert len(names) == 19 + 2  # 19 convs in the trunk + 2 projection shortcuts


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.98])
@pytest.mark.parametrize("method", ["layer_magnitude", "random"])
def test_layerwise_unstructured_sparsity_exact(resnet20_params, method, sparsity):
  masks = prune(resnet20_params, method, sparsity, seed=3)
  for name, m in masks_to_flat(masks).items():
    m = np.asarray(m)
    assert abs((m.size - m.sum()) - sparsity * m.size) <= 0.5 + 1e-9, name  # round(s·n) weights


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_global_magnitude_exact_and_threshold(resnet20_params, sparsity):
  masks = masks_to_flat(prune(resnet20_params, "global_magnitude", sparsity))
  layers = prunable_layers(resnet20_params)
  total = sum(np.asarray(k).size for k in layers.values())
  pruned = sum(np.asarray(m).size - np.asarray(m).sum() for m in masks.values())
  assert abs(pruned - sparsity * total) <= 0.5
  pruned_mag = np.concatenate(
    [np.abs(np.asarray(layers[n]))[~np.asarray(m)] for n, m in masks.items()]
  )
  kept_mag = np.concatenate(
    [np.abs(np.asarray(layers[n]))[np.asarray(m)] for n, m in masks.items()]
  )
  assert pruned_mag.max() <= kept_mag.min()


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_l1_filter_prunes_lowest_norm_filters(resnet20_params, sparsity):
  masks = masks_to_flat(prune(resnet20_params, "l1_filter", sparsity))
  for name, kernel in prunable_layers(resnet20_params).items():
    k = np.asarray(kernel)
    m = np.asarray(masks[name])
    # Whole output filters: every weight of a filter shares its fate.
    per_filter = m.reshape(-1, k.shape[-1])
    assert np.all(per_filter.all(axis=0) | ~per_filter.any(axis=0))
    kept = per_filter.all(axis=0)
    n_pruned = int(np.sum(~kept))
    assert n_pruned == int(round(sparsity * k.shape[-1])), name  # within one filter of the target
    norms = np.abs(k).sum(axis=tuple(range(k.ndim - 1)))  # independent L1 per output channel
    if 0 < n_pruned < k.shape[-1]:
      assert norms[~kept].max() <= norms[kept].min()


def test_previous_masks_stay_pruned(resnet20_params):
  first = prune(resnet20_params, "layer_magnitude", 0.3)
  # Perturb weights so magnitudes change order, then prune further with the old masks.
  noisy = jax.tree.map(
    lambda p: p + 0.5 * jax.random.normal(jax.random.key(1), p.shape), resnet20_params
  )
  second = prune(noisy, "layer_magnitude", 0.6, previous_masks=first)
  for n, m1 in masks_to_flat(first).items():
    m2 = np.asarray(masks_to_flat(second)[n])
    assert not np.any(m2 & ~np.asarray(m1)), n
  assert abs(mask_sparsity(second)["global"] - 0.6) < 1e-3


def test_masks_roundtrip_and_bad_input(resnet20_params):
  masks = prune(resnet20_params, "random", 0.5, seed=0)
  back = masks_from_flat(resnet20_params, masks_to_flat(masks))
  assert jax.tree.structure(back, is_leaf=lambda x: x is None) == jax.tree.structure(
    masks, is_leaf=lambda x: x is None
  )
  with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
    prune(resnet20_params, "nope", 0.5)
  with pytest.raises(ValueError, match="outside"):
    prune(resnet20_params, "random", 1.0)
  assert set(METHODS) == {"l1_filter", "global_magnitude", "layer_magnitude", "random"}


def _sgd_momentum_wd():
  """SGD with momentum 0.9 and weight decay: both push on weights whose gradient is zero."""
  import ml_collections

  opt_cfg = ml_collections.ConfigDict(
    dict(
      learning_rate=0.1,
      momentum=0.9,
      nesterov=False,
      weight_decay=5e-4,
      schedule="constant",
      decay_epochs=(),
      decay_factor=0.1,
    )
  )
  return make_optimizer(opt_cfg, steps_per_epoch=10, epochs=5)


@pytest.mark.parametrize("method", ["l1_filter", "global_magnitude"])
def test_sparsity_unchanged_after_50_sgd_momentum_wd_steps(method):
  model = get_model("small_cnn", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  masks = prune(variables["params"], method, 0.7)
  params = apply_masks(variables["params"], masks)
  before = sparsity_report(params)
  optimizer = _sgd_momentum_wd()
  step = make_train_step(
    model, optimizer, mean=(0.5,), std=(0.25,), crop_padding=1, flip=False, kd=False
  )
  state = create_state(params, variables["batch_stats"], optimizer, masks=masks)
  rng = np.random.default_rng(0)
  for i in range(50):
    images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (16,), dtype=np.int32)
    state, _ = step(state, images, labels, jax.random.key(i), None, jnp.float32(0), jnp.float32(1))
  after = sparsity_report(state.params)
  assert after == before
  # The unpruned weights did move, so this is not a vacuous check.
  assert not np.allclose(
    np.asarray(state.params["conv2"]["kernel"]), np.asarray(params["conv2"]["kernel"])
  )
  assert abs(after["global"] - 0.7) < 0.02


def test_momentum_and_weight_decay_cannot_revive_weights_pruned_mid_training():
  """Gradual pruning prunes a model whose optimizer already carries momentum on every weight.
  Dense steps first (momentum builds up everywhere), then prune keeping the optimizer state,
  then more steps: the pruned weights must stay exactly zero, which only the re-masking after
  the update guarantees (their gradient is zero, but their momentum and decay are not)."""
  import optax

  from prunebias_jax.pruning import dense_masks

  model = get_model("small_cnn", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  optimizer = _sgd_momentum_wd()
  step = make_train_step(
    model, optimizer, mean=(0.5,), std=(0.25,), crop_padding=0, flip=False, kd=False
  )
  params = variables["params"]
  state = create_state(params, variables["batch_stats"], optimizer, masks=dense_masks(params))
  rng = np.random.default_rng(0)

  def steps(state, n, offset):
    for i in range(n):
      images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
      labels = rng.integers(0, 10, (16,), dtype=np.int32)
      key = jax.random.key(offset + i)
      state, _ = step(state, images, labels, key, None, jnp.float32(0), jnp.float32(1))
    return state

  state = steps(state, 10, 0)
  masks = prune(state.params, "global_magnitude", 0.7)
  flat_masks = {n: np.asarray(m) for n, m in masks_to_flat(masks).items()}  # the step donates
  state = state.replace(params=apply_masks(state.params, masks), masks=masks)
  is_trace = lambda x: isinstance(x, optax.TraceState)  # noqa: E731
  (trace,) = [s.trace for s in jax.tree.leaves(state.opt_state, is_leaf=is_trace) if is_trace(s)]
  momentum = masks_to_flat(trace)
  pruned_momentum = [np.abs(np.asarray(momentum[n])[~m]) for n, m in flat_masks.items()]
  assert max(float(v.max()) for v in pruned_momentum if v.size) > 0  # something to revive
  state = steps(state, 5, 100)
  for name, mask in flat_masks.items():
    kernel = np.asarray(masks_to_flat(state.params)[name])
    assert np.all(kernel[~mask] == 0.0), name
  assert sparsity_report(state.params)["global"] == pytest.approx(0.7, abs=0.02)


def test_sparsity_report_counts_exact_zeros_per_prunable_kernel():
  params = {
    "conv1": {"kernel": np.array([[0.0, 1.0], [0.0, 2.0]]), "bias": np.zeros(2)},
    "fc": {"kernel": np.array([[0.0, 0.0, 0.0, 3.0]])},
    "head": {"kernel": np.zeros((4, 2))},  # the classifier is never pruned: not counted
  }
  report = sparsity_report(params)
  assert report == {
    "global": pytest.approx(5 / 8),
    "per_layer": {"conv1/kernel": 0.5, "fc/kernel": 0.75},
  }
  assert sparsity_report({"head": {"kernel": np.zeros((4, 2))}}) == {"global": 0.0, "per_layer": {}}


def test_random_pruning_is_seeded_layerwise_and_not_magnitude():
  model = get_model("small_cnn", 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  flat = lambda m: np.concatenate([np.asarray(v).ravel() for v in masks_to_flat(m).values()])
  a, again, other = (prune(params, "random", 0.5, seed=s) for s in (1, 1, 2))
  magnitude = prune(params, "layer_magnitude", 0.5)
  np.testing.assert_array_equal(flat(a), flat(again))  # the seed decides
  assert (flat(a) != flat(other)).mean() > 0.3  # another seed, other weights
  assert (flat(a) != flat(magnitude)).mean() > 0.3  # not the magnitude ranking
  for name, m in masks_to_flat(a).items():  # layer by layer, half of each kernel
    assert abs(1 - np.asarray(m).mean() - 0.5) < 0.01, name


def test_layer_names_and_prunability_of_any_pytree_path():
  tree = {
    "blocks": [{"conv": {"kernel": np.ones((3, 3, 2, 4))}}],
    "head": {"kernel": np.ones((4, 2))},
  }
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert [masks.layer_name(p) for p in paths] == ["blocks/[0]/conv/kernel", "head/kernel"]
  assert [masks.is_prunable(p, leaf) for p, leaf in zip(paths, (np.ones((3, 3, 2, 4)), None))] == [
    True,
    False,
  ]
  assert masks.is_prunable(paths[0], 1.0) is False  # a scalar leaf named kernel: not a kernel
