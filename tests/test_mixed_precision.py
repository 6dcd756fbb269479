"""Mixed precision: `get_model(..., dtype="bfloat16")` computes in bf16 with float32 params,
float32 BatchNorm statistics and float32 logits, and trains like the float32 model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.config import sgd
from prunebias_jax.models import COMPUTE_DTYPES, get_model
from prunebias_jax.pruning import apply_masks, prune
from prunebias_jax.pruning.masks import masks_to_flat, prunable_layers
from prunebias_jax.train import create_state, make_optimizer, make_train_step


def test_compute_dtypes_and_validation():
  assert COMPUTE_DTYPES == ("float32", "bfloat16")
  assert get_model("resnet20", 10).dtype == jnp.float32
  assert get_model("resnet20", 10, dtype="bfloat16").dtype == jnp.bfloat16
  assert get_model("resnet20", 10, dtype=jnp.bfloat16).dtype == jnp.bfloat16  # dtype objects too
  for bad in ("float16", "fp32", "int8", None):
    with pytest.raises(ValueError, match="compute dtype"):
      get_model("resnet20", 10, dtype=bad)


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
def test_bf16_model_has_f32_params_and_logits_and_bf16_activations(name):
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  f32, bf16 = get_model(name, 10), get_model(name, 10, dtype="bfloat16")
  variables = bf16.init(jax.random.key(0), x, train=False)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32  # params and batch stats
  logits, state = jax.jit(lambda v, x: bf16.apply(v, x, train=False, mutable=["intermediates"]))(
    variables, x
  )
  ref, ref_state = jax.jit(lambda v, x: f32.apply(v, x, train=False, mutable=["intermediates"]))(
    variables, x
  )
  assert logits.dtype == jnp.float32 and ref.dtype == jnp.float32
  assert state["intermediates"]["features"][0].dtype == jnp.bfloat16  # the compute really is bf16
  assert ref_state["intermediates"]["features"][0].dtype == jnp.float32
  # same function up to bf16 rounding
  np.testing.assert_allclose(
    np.asarray(logits), np.asarray(ref), atol=0.1 * float(jnp.abs(ref).max()) + 1e-2
  )
  # BatchNorm statistics in train mode stay float32 and are close to the float32 model's
  _, upd = bf16.apply(variables, x, train=True, mutable=["batch_stats"])
  _, ref_upd = f32.apply(variables, x, train=True, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(ref_upd)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.05, atol=0.02)


def test_bf16_kd_train_step_runs_and_matches_f32_loss():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (16,)).astype(np.int32))
  f32 = get_model("small_cnn", 10)
  teacher = f32.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  masks = prune(teacher["params"], "l1_filter", 0.5)
  opt = make_optimizer(sgd(0.05, schedule="constant"), steps_per_epoch=10, epochs=1)
  out = {}
  for dtype in COMPUTE_DTYPES:
    model = get_model("small_cnn", 10, dtype=dtype)
    step = make_train_step(
      model, opt, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=0, flip=False, kd=True
    )
    state = create_state(
      apply_masks(teacher["params"], masks), teacher["batch_stats"], opt, masks=masks
    )
    losses = []
    for _ in range(2):
      state, metrics = step(
        state, images, labels, jax.random.key(1), teacher, jnp.float32(0.9), jnp.float32(4.0)
      )
      assert metrics["loss"].dtype == jnp.float32
      losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and int(metrics["nonfinite"]) == 0
    for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
      assert leaf.dtype in (jnp.float32, jnp.int32)
    kernels = prunable_layers(state.params)
    for layer, m in masks_to_flat(masks).items():  # masks still hold under bf16
      assert np.all(np.asarray(kernels[layer])[~np.asarray(m)] == 0), layer
    out[dtype] = losses
  np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=0.03)
