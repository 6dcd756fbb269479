"""`make_eval_fn`: the one compiled pass over the test set gives what a plain `model.apply` of
the masked model gives, batch by batch (logits, pooled stage outputs, spatial maps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prunebias_jax.models import get_model
from prunebias_jax.pruning import prune
from prunebias_jax.train import create_state, make_optimizer, make_train_step
from prunebias_jax.train.steps import make_eval_fn

MEAN, STD = 0.3, 0.2  # per channel, one channel


@pytest.fixture(scope="module")
def setup():
  model = get_model("small_cnn", 5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(3, 4, 8, 8, 1), dtype=np.uint8)  # 3 batches of 4
  # a mask that zeroes half of conv2's kernel and all of fc's first 64 inputs
  masks = jax.tree.map(lambda p: None, variables["params"], is_leaf=lambda x: x is None)
  masks["conv2"]["kernel"] = jnp.asarray(
    rng.random(variables["params"]["conv2"]["kernel"].shape) < 0.5
  )
  fc = np.ones(variables["params"]["fc"]["kernel"].shape, bool)
  fc[:64] = False
  masks["fc"]["kernel"] = jnp.asarray(fc)
  return model, variables, images, masks


def _masked(variables, masks):
  params = jax.tree.map(
    lambda p, m: p if m is None else p * np.asarray(m, np.float32),
    variables["params"],
    masks,
    is_leaf=lambda x: x is None,
  )
  return {**variables, "params": params}


def _by_hand(model, variables, images):
  """Per batch: normalise in NumPy, apply, read the sown intermediates."""
  logits, inter = [], []
  for batch in images:
    x = (batch.astype(np.float32) / 255.0 - MEAN) / STD
    out, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    logits.append(np.asarray(out))
    inter.append({k: np.asarray(v[0]) for k, v in state["intermediates"].items()})
  joined = {k: np.concatenate([b[k] for b in inter]) for k in inter[0]}
  return np.concatenate(logits), joined


def _adaptive_pool(maps, out):
  """adaptive_avg_pool2d bins: bin i of an axis of length L is [floor(iL/out), ceil((i+1)L/out))."""
  n, h, w, c = maps.shape
  oh, ow = min(out, h), min(out, w)
  res = np.zeros((n, oh, ow, c), np.float32)
  for i in range(oh):
    for j in range(ow):
      r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
      c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
      res[:, i, j] = maps[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return res


def test_eval_fn_equals_masked_apply_batch_by_batch(setup):
  model, variables, images, masks = setup
  logits, layers = make_eval_fn(model, mean=(MEAN,), std=(STD,))(variables, masks, images)
  want_logits, inter = _by_hand(model, _masked(variables, masks), images)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  assert logits.dtype == jnp.float32 and logits.shape == (12, 5)
  assert set(layers) == {"stage1", "stage2", "features"}
  np.testing.assert_allclose(layers["features"], inter["features"], rtol=1e-5, atol=1e-5)
  for stage in ("stage1", "stage2"):  # spatial maps averaged to (n, channels)
    np.testing.assert_allclose(layers[stage], inter[stage].mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
  # the mask matters: the unmasked model's logits are not these
  plain, _ = _by_hand(model, variables, images)
  assert np.abs(plain - want_logits).max() > 1e-2


def test_eval_fn_spatial_maps_are_adaptive_average_pooled(setup):
  model, variables, images, masks = setup
  _, layers = make_eval_fn(model, mean=(MEAN,), std=(STD,), map_size=3)(variables, masks, images)
  _, inter = _by_hand(model, _masked(variables, masks), images)
  assert set(layers) == {"stage1", "stage2"}  # maps only: 'features' has no spatial axes
  assert layers["stage1"].shape == (12, 3, 3, 64) and layers["stage2"].shape == (12, 3, 3, 128)
  for stage in ("stage1", "stage2"):
    np.testing.assert_allclose(layers[stage], _adaptive_pool(inter[stage], 3), rtol=1e-5, atol=1e-5)
  # a map smaller than map_size is kept whole: 8x8 → 4x4 after pooling, so map_size=6 keeps 4x4
  _, big = make_eval_fn(model, mean=(MEAN,), std=(STD,), map_size=6)(variables, masks, images)
  assert big["stage2"].shape == (12, 4, 4, 128)
  np.testing.assert_allclose(big["stage2"], inter["stage2"], rtol=1e-5, atol=1e-5)


def test_eval_fn_population_is_each_member_on_its_own(setup):
  model, variables, images, masks = setup
  other = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), variables, other)
  no_mask = jax.tree.map(
    lambda m: None if m is None else jnp.ones_like(m), masks, is_leaf=lambda x: x is None
  )
  stacked_masks = jax.tree.map(
    lambda a, b: None if a is None else jnp.stack([a, b]),
    masks,
    no_mask,
    is_leaf=lambda x: x is None,
  )
  fn = make_eval_fn(model, mean=(MEAN,), std=(STD,), population=2, shared_masks=False)
  logits, layers = fn(stacked, stacked_masks, images)
  assert logits.shape == (2, 12, 5)
  for k, member in enumerate((_masked(variables, masks), other)):
    want, inter = _by_hand(model, member, images)
    np.testing.assert_allclose(logits[k], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers["features"][k], inter["features"], rtol=1e-5, atol=1e-5)
  shared = make_eval_fn(model, mean=(MEAN,), std=(STD,), population=2)(stacked, masks, images)[0]
  np.testing.assert_allclose(shared[0], logits[0], rtol=1e-5, atol=1e-5)
  want_other, _ = _by_hand(model, _masked(other, masks), images)
  np.testing.assert_allclose(shared[1], want_other, rtol=1e-5, atol=1e-5)


def _sgd(momentum: float, weight_decay: float = 0.0):
  """SGD at a constant learning rate of 0.1 (the optimizers of the step tests below)."""
  cfg = dict(learning_rate=0.1, momentum=momentum, nesterov=False, weight_decay=weight_decay)
  cfg |= dict(schedule="constant", decay_epochs=(), decay_factor=0.1)
  return make_optimizer(ml_collections.ConfigDict(cfg), steps_per_epoch=1, epochs=1)


def _one_step(params, skip_nonfinite=None):
  model = get_model("small_cnn", 5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  opt = _sgd(momentum=0.9)
  kw = {} if skip_nonfinite is None else {"skip_nonfinite": skip_nonfinite}
  step = make_train_step(
    model, opt, mean=(MEAN,), std=(STD,), crop_padding=0, flip=False, kd=False, **kw
  )
  state = create_state(params(variables["params"]), variables["batch_stats"], opt)
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(4, dtype=np.int32)
  before = jax.tree.map(np.asarray, state.params)
  new, metrics = step(
    state, images, labels, jax.random.key(0), None, jnp.float32(0), jnp.float32(1)
  )
  return before, jax.tree.map(np.asarray, new.params), metrics


def _poisoned(params):
  """A NaN in the head's bias: a NaN logit, so the loss and every gradient are NaN."""
  params = jax.tree.map(jnp.array, params)
  params["head"]["bias"] = params["head"]["bias"].at[0].set(jnp.nan)
  return params


def test_a_nonfinite_step_is_applied_by_default_and_skipped_only_when_asked():
  before, after, metrics = _one_step(_poisoned)  # the default: skip_nonfinite=False
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert np.isnan(after["head"]["kernel"]).all()  # the NaN update was applied
  before, after, metrics = _one_step(_poisoned, skip_nonfinite=True)
  assert int(metrics["nonfinite"]) == 1
  jax.tree.map(np.testing.assert_array_equal, after, before)  # every parameter as it was
  _, after, metrics = _one_step(lambda p: p, skip_nonfinite=True)
  assert int(metrics["nonfinite"]) == 0 and np.isfinite(after["head"]["kernel"]).all()
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])  # it moves


def test_kd_step_loss_is_the_kd_objective_of_student_and_teacher_on_the_same_batch():
  """KD: the teacher (other weights, inference mode) sees the student's batch; the reported
  loss is (1-a) CE + a T^2 KL of those logits, computed here with SciPy-free NumPy."""
  model = get_model("small_cnn", 5)
  student = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)), train=False)
  opt = _sgd(momentum=0.0)
  step = make_train_step(model, opt, mean=(MEAN,), std=(STD,), crop_padding=0, flip=False, kd=True)
  images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
  state = create_state(student["params"], student["batch_stats"], opt)
  alpha, temp = 0.7, 3.0
  _, metrics = step(
    state, images, labels, jax.random.key(0), teacher, jnp.float32(alpha), jnp.float32(temp)
  )
  x = (images.astype(np.float32) / 255.0 - MEAN) / STD
  s_logits, _ = model.apply(student, x, train=True, mutable=["batch_stats"])  # as trained
  t_logits = model.apply(teacher, x, train=False)
  s, t = np.asarray(s_logits, np.float64), np.asarray(t_logits, np.float64)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ce = -log_softmax(s)[np.arange(6), labels].mean()
  pt = np.exp(log_softmax(t / temp))
  kl = (pt * (log_softmax(t / temp) - log_softmax(s / temp))).sum(-1).mean()
  assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx((1 - alpha) * ce + alpha * temp**2 * kl, rel=1e-5)


@pytest.mark.parametrize("mode", ["vmap", "map", "sequential"])
@pytest.mark.parametrize("shared_masks", [True, False])
def test_population_step_is_each_members_own_step(shared_masks, mode):
  """population=2: one step, vmapped, mapped or in turn over the members, equals the
  single-member step of each member (its own params, batch and rng; masks shared or per
  member). Mapped, the members run the same operations inside a loop, which XLA fuses
  differently: equal to ~1e-9, not bit for bit; in turn, they are that very step: bit for
  bit."""
  model = get_model("small_cnn", 5)
  members = [model.init(jax.random.key(i), jnp.zeros((1, 8, 8, 1)), train=False) for i in (0, 1)]
  masks = [prune(m["params"], "global_magnitude", 0.5) for m in members]
  opt = _sgd(momentum=0.9, weight_decay=5e-4)
  kw = dict(mean=(MEAN,), std=(STD,), crop_padding=1, flip=True, kd=False)
  single = make_train_step(model, opt, **kw)
  pop = make_train_step(model, opt, population=2, shared_masks=shared_masks, members=mode, **kw)
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (2, 4, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 5, (2, 4)).astype(np.int32)
  keys = jax.random.split(jax.random.key(3), 2)
  member_masks = [masks[0], masks[0]] if shared_masks else masks
  states = [
    create_state(m["params"], m["batch_stats"], opt, masks=mk)
    for m, mk in zip(members, member_masks)
  ]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  if shared_masks:
    stacked = stacked.replace(masks=masks[0])
  shared_before = jax.device_get(masks[0])  # the step donates the state's copy
  a, b = jnp.float32(0), jnp.float32(1)
  want = [single(s, images[k], labels[k], keys[k], None, a, b) for k, s in enumerate(states)]
  got, metrics = pop(stacked, images, labels, keys, None, a, b)
  for k, (state_k, metrics_k) in enumerate(want):
    np.testing.assert_allclose(metrics["loss"][k], metrics_k["loss"], rtol=1e-5)
    jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g[k], w, rtol=1e-4, atol=1e-6),
      got.params,
      state_k.params,
    )
    if mode == "sequential":
      jax.tree.map(lambda g, w: np.testing.assert_array_equal(g[k], w), got.params, state_k.params)
      np.testing.assert_array_equal(metrics["loss"][k], metrics_k["loss"])
  if shared_masks:  # one unbatched set, given back as it came
    jax.tree.map(np.testing.assert_array_equal, got.masks, shared_before)


def test_eval_fn_averages_every_axis_between_examples_and_channels():
  """A sown (n, L, C) value (a sequence model's stage) is averaged over L, like maps over
  (H, W): layers are (n, channels) whatever the model."""
  import flax.linen as nn

  class Seq(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.Dense(3)(x.reshape(x.shape[0], 8, 8))  # (n, 8, 3)
      self.sow("intermediates", "stage1", h)
      feats = h.mean(axis=1)
      self.sow("intermediates", "features", feats)
      return nn.Dense(2)(feats)

  model = Seq()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  images = np.random.default_rng(0).integers(0, 256, (1, 4, 8, 8, 1), dtype=np.uint8)
  _, layers = make_eval_fn(model, mean=(MEAN,), std=(STD,))(variables, None, images)
  _, inter = _by_hand(model, variables, images)
  assert layers["stage1"].shape == (4, 3)
  np.testing.assert_allclose(layers["stage1"], inter["stage1"].mean(axis=1), rtol=1e-5, atol=1e-6)
