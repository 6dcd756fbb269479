"""Tests for the model zoo registry and architectures (fast: heavy models use eval_shape)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from prunebias_jax.models import available_models, get_model

ALL_MODELS = (
  "resnet18",
  "resnet20",
  "resnet32",
  "resnet32x4",
  "resnet56",
  "small_cnn",
  "vgg11",
  "vgg16",
)
REAL_FORWARD = ("small_cnn", "resnet20")
FEATURE_DIMS = {
  "small_cnn": 128,
  "resnet20": 64,
  "resnet32": 64,
  "resnet56": 64,
  "resnet32x4": 256,
  "resnet18": 512,
  "vgg11": 512,
  "vgg16": 512,
}
NUM_STAGES = {
  "small_cnn": 2,
  "resnet20": 3,
  "resnet32": 3,
  "resnet56": 3,
  "resnet32x4": 3,
  "resnet18": 4,
  "vgg11": 5,
  "vgg16": 5,
}


def _x(shape=(2, 32, 32, 3), seed: int = 0) -> jnp.ndarray:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _init(model: nn.Module, x, real: bool):
  fn = lambda k, inp: model.init(k, inp, train=False)  # noqa: E731
  return fn(jax.random.key(0), x) if real else jax.eval_shape(fn, jax.random.key(0), x)


def _count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def test_available_models_sorted_and_complete():
  names = available_models()
  assert isinstance(names, tuple)
  assert names == tuple(sorted(names))
  assert set(names) == set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_features_and_train_mode(name):
  model = get_model(name, num_classes=10)
  real = name in REAL_FORWARD
  x = _x()
  variables = _init(model, x, real)
  assert set(variables) == {"params", "batch_stats"}
  for leaf in jax.tree.leaves(variables["params"]):
    assert leaf.dtype == jnp.float32

  def eval_fn(v, inp):
    return model.apply(v, inp, train=False, mutable=["intermediates"])

  def train_fn(v, inp):
    return model.apply(v, inp, train=True, mutable=["batch_stats"])

  if real:
    logits, state = jax.jit(eval_fn)(variables, x)
    assert np.all(np.isfinite(np.asarray(logits)))
  else:
    logits, state = jax.eval_shape(eval_fn, variables, x)
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32

  inter = state["intermediates"]
  (feats,) = inter["features"]
  assert feats.shape == (2, FEATURE_DIMS[name])
  for i in range(1, NUM_STAGES[name] + 1):
    (stage,) = inter[f"stage{i}"]
    assert stage.ndim == 4 and stage.shape[0] == 2
  assert f"stage{NUM_STAGES[name] + 1}" not in inter

  if real:
    out, new_state = jax.jit(train_fn)(variables, x)
    old_stats = jax.tree.leaves(variables["batch_stats"])
    new_stats = jax.tree.leaves(new_state["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(old_stats, new_stats))
    # Running means move from 0 towards the batch mean, so at least one is nonzero.
    assert any(np.abs(np.asarray(b)).max() > 0 for b in new_stats)
  else:
    out, new_state = jax.eval_shape(train_fn, variables, x)
    assert jax.tree.structure(new_state["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"]
    )
  assert out.shape == (2, 10)
  assert set(new_state) == {"batch_stats"}


def test_small_cnn_on_digits_shape():
  model = get_model("small_cnn", num_classes=10)
  x = _x((2, 8, 8, 1), seed=1)
  variables = model.init(jax.random.key(0), x)
  logits, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  assert logits.shape == (2, 10)
  assert state["intermediates"]["features"][0].shape == (2, 128)
  assert state["intermediates"]["stage1"][0].shape == (2, 8, 8, 64)
  assert state["intermediates"]["stage2"][0].shape == (2, 4, 4, 128)
  # Inference mode is deterministic and does not touch batch_stats.
  logits2 = model.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits2), rtol=1e-6)


def test_bf16_compute_keeps_float32_params_and_logits():
  model = get_model("small_cnn", num_classes=10, dtype=jnp.bfloat16)
  x = _x((2, 8, 8, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  logits = jax.eval_shape(lambda v, inp: model.apply(v, inp), variables, x)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize(
  "name,num_classes,expected",
  [
    # He et al. 2016 (Table 6) / RepDistiller / standard CIFAR ResNet-18 counts.
    ("resnet20", 10, 0.27e6),
    ("resnet56", 10, 0.85e6),
    ("resnet18", 10, 11.17e6),
    ("resnet32x4", 100, 7.43e6),
  ],
)
def test_parameter_counts_match_published(name, num_classes, expected):
  model = get_model(name, num_classes=num_classes)
  variables = _init(model, jnp.zeros((1, 32, 32, 3)), real=False)
  n = _count(variables["params"])
  assert abs(n - expected) / expected < 0.03, f"{name}: {n} params vs ~{expected:.0f}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_head_is_the_only_classifier(name):
  num_classes = 7
  model = get_model(name, num_classes=num_classes)
  variables = _init(model, jnp.zeros((1, 32, 32, 3)), real=False)
  params = variables["params"]
  assert "head" in params
  assert params["head"]["kernel"].shape[-1] == num_classes
  flat = flatten_dict(params)
  dense_to_classes = [
    path
    for path, leaf in flat.items()
    if path[-1] == "kernel" and leaf.ndim == 2 and leaf.shape[-1] == num_classes
  ]
  assert dense_to_classes == [("head", "kernel")]
  # Convolutions followed by BatchNorm carry no bias.
  for path, _ in flat.items():
    if path[-1] == "bias" and "conv" in path[-2]:
      pytest.fail(f"conv {path} has a bias")


def test_unknown_model_raises():
  with pytest.raises(ValueError) as exc:
    get_model("resnet1000", num_classes=10)
  msg = str(exc.value)
  assert "'resnet1000'" in msg
  for name in ALL_MODELS:
    assert name in msg


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_bad_num_classes_raises(bad):
  with pytest.raises(ValueError, match=str(bad)):
    get_model("resnet20", num_classes=bad)
