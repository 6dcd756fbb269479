"""The jitted train step (CE, KD or a feature distillation, masks applied) and the jitted
full-test-set evaluation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prunebias_jax.data.pipeline import augment, normalize
from prunebias_jax.metrics import streaming
from prunebias_jax.metrics.similarity import adaptive_avg_pool
from prunebias_jax.pruning.masks import apply_masks
from prunebias_jax.train import distill
from prunebias_jax.train.losses import cross_entropy, distillation_kl, kd_objective
from prunebias_jax.train.state import TrainState

PyTree = Any


class DistillWeights(NamedTuple):
  """The static weights of a distillation objective (`config.distill`): γ (ce), α' (kl),
  β of the method's feature loss, and CRD's negatives per example, τ and memory momentum."""

  ce: float = 1.0
  kl: float = 1.0
  beta: float = 0.0
  crd_negatives: int = 16384
  crd_temperature: float = 0.07
  crd_momentum: float = 0.5


def _sown(collections: dict) -> dict[str, jax.Array]:
  """{'stage1': ..., 'features': ...}: the float32 outputs a model sowed in one apply."""
  return {
    name: value.astype(jnp.float32) for name, (value, *_) in collections["intermediates"].items()
  }


def make_train_step(
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  *,
  mean,
  std,
  crop_padding: int,
  flip: bool,
  kd: bool = False,
  population: int = 1,
  shared_masks: bool = True,
  skip_nonfinite: bool = False,
  method: str | None = None,
  weights: DistillWeights | None = None,
  teacher_model: nn.Module | None = None,
  members: str = "vmap",
) -> TrainStep:
  """Returns the jitted `step(state, images_u8, labels, rng, teacher_variables, alpha, T,
  indices)` as a `TrainStep` (which also holds the function it jits, for the scanned loop).

  The forward pass uses params ⊙ state.masks (so pruned weights get zero gradient); after the
  optimizer update the params are re-masked, so momentum and weight decay cannot revive a
  pruned weight. With kd=True the teacher sees the same augmented batch in inference mode.
  `state` is donated. `alpha` and `T` are traced, so a temperature sweep compiles once.

  population > 1: the same step over a leading member axis of state, images, labels and rng
  (and `state.masks` unless `shared_masks`); the teacher is shared. N students of a cell then
  train together, as `members` says: 'vmap' batches the members into each operation of one
  compiled step (what keeps an accelerator busy); 'map' runs them one after the other inside
  that step (`lax.map`); 'sequential' calls the one-member step once per member (K programs
  per step, the state split and joined on the device: on the CPU, where a vmapped step's
  grouped convolutions and a mapped step's loop both run far slower than plain steps).

  skip_nonfinite: a step whose loss is NaN/Inf leaves params, batch stats and optimizer state
  as they were (the step counter still advances, so the learning-rate schedule and the data
  order stay those of the uninterrupted run). Either way `metrics['nonfinite']` is 1 for such
  a step, so the loop can stop or count without an extra host sync.

  method: a `train.distill.METHODS` name (None: 'kd' if kd else 'ce'); a feature method reads
  the stage outputs both models sow and weighs its loss with `weights`. 'crd' and 'crd+kd'
  train `state.distill` (a CRDState: heads updated by `optimizer`, memory banks by momentum)
  and need the batch's training-set `indices`; the other methods ignore them. Feature losses
  take the global batch (see `train.distill`), so N devices compute what one does.

  teacher_model: the module the teacher's variables run in (None: `model`); a quantized
  student (a Qwix-wrapped `model`) learns from the float teacher. The collections in
  `state.frozen` (a static scheme's calibrated ranges) are read, never updated.
  """
  teacher = model if teacher_model is None else teacher_model
  method = ("kd" if kd else "ce") if method is None else method
  feature, with_kl = distill.parse_method(method)
  weights = DistillWeights() if weights is None else weights
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def step(
    state: TrainState, images, labels, rng, teacher_variables, alpha, temperature, indices=None
  ):
    masks = state.masks
    x = normalize(augment(rng, images, crop_padding, flip), mean, std)
    collections = ["batch_stats"] + (["intermediates"] if feature else [])
    crd_state = state.distill

    def feature_term(heads, student_layers, teacher_layers):
      """(β·F, CRD's bank updates or None) of the batch."""
      if feature != "crd":
        return weights.beta * distill.feature_loss(feature, student_layers, teacher_layers), None
      negatives = distill.sample_negatives(
        jax.random.fold_in(rng, 1), crd_state, labels, weights.crd_negatives
      )
      f, banks = distill.crd(
        heads,
        crd_state,
        student_layers["features"],
        teacher_layers["features"],
        indices,
        negatives,
        weights.crd_temperature,
        weights.crd_momentum,
      )
      return weights.beta * f, banks

    def loss_fn(params, heads):
      variables = {
        "params": apply_masks(params, masks),
        "batch_stats": state.batch_stats,
        **(state.frozen or {}),
      }
      logits, updates = model.apply(variables, x, train=True, mutable=collections)
      logits = logits.astype(jnp.float32)  # softmax, CE and KL in float32 under mixed precision
      aux = lambda *terms: (logits, updates["batch_stats"], terms)
      if feature is None:  # CE, or KD as (1−α)·CE + α·T²·KL: the project's original objective
        if with_kl:
          teacher_logits = teacher.apply(teacher_variables, x, train=False).astype(jnp.float32)
          loss, ce = kd_objective(logits, teacher_logits, labels, alpha, temperature)
        else:
          loss = ce = cross_entropy(logits, labels)
        return loss, aux(ce, None, None, None)
      # γ·CE [+ α'·T²·KL] + β·F; the teacher in inference mode on the same batch, its stage
      # outputs sown.
      teacher_logits, teacher_state = teacher.apply(
        teacher_variables, x, train=False, mutable=["intermediates"]
      )
      ce = cross_entropy(logits, labels)
      kl = jnp.float32(0.0)
      if with_kl:
        t_logits = teacher_logits.astype(jnp.float32)
        kl = weights.kl * temperature**2 * distillation_kl(logits, t_logits, temperature)
      f, banks = feature_term(heads, _sown(updates), _sown(teacher_state))
      return weights.ce * ce + kl + f, aux(ce, kl, f, banks)

    heads = crd_state.params if crd_state is not None else None
    (loss, (logits, batch_stats, (ce, kl, f, banks))), (grads, head_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True
    )(state.params, heads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_masks(optax.apply_updates(state.params, updates), masks)
    new_distill = crd_state
    if crd_state is not None:
      head_updates, head_opt = optimizer.update(head_grads, crd_state.opt_state, heads)
      new_distill = crd_state.replace(
        params=optax.apply_updates(heads, head_updates), opt_state=head_opt, **banks
      )
    finite = jnp.isfinite(loss)
    if skip_nonfinite:  # keep the old values where the loss was not finite
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, batch_stats, opt_state, new_distill = keep(
        (params, batch_stats, opt_state, new_distill),
        (state.params, state.batch_stats, state.opt_state, crd_state),
      )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      distill=new_distill,
    )
    metrics = {
      "loss": loss,
      "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
      "ce": ce,
      "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
    }
    if feature:  # the terms a feature method adds to γ·CE (KD's is derived by the loop)
      metrics["feature_loss"] = f
      if with_kl:
        metrics["kd_loss"] = kl
    return new_state, metrics

  if population > 1:
    # Shared masks are one unbatched pytree inside the otherwise stacked state.
    state_axes = TrainState(
      step=0,
      params=0,
      batch_stats=0,
      opt_state=0,
      masks=None if shared_masks else 0,
      distill=0,
      frozen=0,
    )
    if members == "vmap":
      batched = jax.vmap(
        step, in_axes=(state_axes, 0, 0, 0, None, None, None, 0), out_axes=(state_axes, 0)
      )
    elif members == "map":
      batched = _members_one_by_one(step, shared_masks)
    elif members == "sequential":
      return TrainStep(_members_in_turn(jax.jit(step, donate_argnums=(0,)), shared_masks), None)
    else:
      raise ValueError(f"members must be 'vmap', 'map' or 'sequential', got {members!r}")
    step = lambda state, images, labels, rng, teacher_variables, alpha, temperature, indices=None: (
      batched(state, images, labels, rng, teacher_variables, alpha, temperature, indices)
    )
  return TrainStep(jax.jit(step, donate_argnums=(0,)), step)


class TrainStep:
  """A train step: calling it runs the jitted step (`jitted`, state donated); `body` is the
  function it jits, which the scanned loop (`train.loop`) runs inside its own `lax.scan`, or
  None where the step is several programs (population_step='sequential'). Anything else
  (`lower`, ...) is the jitted function's."""

  def __init__(self, jitted: Callable, body: Callable | None):
    self.jitted = jitted
    self.body = body
    self.chunks: dict = {}  # the scanned loop's jitted chunks of this step, by their settings

  def __call__(self, *args, **kwargs):
    return self.jitted(*args, **kwargs)

  def __getattr__(self, name: str):
    return getattr(self.jitted, name)


def _members_in_turn(single: Callable, shared_masks: bool) -> Callable:
  """The population step as K calls of the jitted one-member step `single` (one program per
  member, as K separate runs would take), the stacked state split and joined by one jitted
  call each."""

  @functools.partial(jax.jit, static_argnums=1)
  def split(stacked, k):
    return [jax.tree.map(lambda a: a[j], stacked) for j in range(k)]

  @jax.jit
  def join(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

  def step(state, images, labels, rng, teacher_variables, alpha, temperature, indices=None):
    k = images.shape[0]
    masks = state.masks if shared_masks else None
    parts = split(state.replace(masks=None) if shared_masks else state, k)
    out = []
    for j, member in enumerate(parts):
      if shared_masks:  # the step donates its state, masks included: pass on what it returns
        member = member.replace(masks=masks)
      batch = (images[j], labels[j], rng[j])
      index = None if indices is None else indices[j]
      new, metrics = single(member, *batch, teacher_variables, alpha, temperature, index)
      if shared_masks:
        masks, new = new.masks, new.replace(masks=None)
      out.append((new, metrics))
    new, metrics = join(out)
    return (new.replace(masks=masks) if shared_masks else new), metrics

  return step


def _members_one_by_one(step: Callable, shared_masks: bool) -> Callable:
  """The population step as `lax.map` of the one-member `step` over the member axis (shared
  masks and the teacher's inputs held fixed)."""

  def batched(state, images, labels, rng, teacher_variables, alpha, temperature, indices):
    masks = state.masks if shared_masks else None

    def one(member):
      member_state, *batch = member
      if shared_masks:
        member_state = member_state.replace(masks=masks)
      new, metrics = step(member_state, *batch[:3], teacher_variables, alpha, temperature, batch[3])
      return (new.replace(masks=None) if shared_masks else new), metrics

    stacked = state.replace(masks=None) if shared_masks else state
    new, metrics = jax.lax.map(one, (stacked, images, labels, rng, indices))
    return (new.replace(masks=masks) if shared_masks else new), metrics

  return batched


def make_eval_fn(
  model: nn.Module,
  *,
  mean,
  std,
  out_shardings=None,
  population: int = 1,
  shared_masks: bool = True,
  map_size: int = 0,
) -> Callable:
  """Returns jitted `evaluate(variables, masks, images (B,bs,...)) -> (logits, layers)`.

  `layers` maps 'features' (the penultimate vector) and every sown stage output
  ('stage1', ...; feature maps averaged over space, so each is (n, channels)) to float32
  arrays: what the per-layer similarity analysis compares. With `map_size` > 0 it holds
  the stage outputs only, as spatial maps average-pooled to at most map_size × map_size
  ((n, h, w, channels), adaptive-average bins): what per-position SVCCA compares.

  One compiled pass over the whole padded test set (`lax.map` over batches keeps memory at one
  batch of activations); callers drop the padded rows using the valid mask. `out_shardings`
  (e.g. replicated) makes the outputs readable on every process of a multi-host run.
  population > 1: vmapped over stacked member variables (and masks unless shared) →
  (members, n, ·) outputs.
  """
  layers_of = _layers_fn(model, mean, std, map_size)

  def evaluate(variables, masks, images):
    variables = {**variables, "params": apply_masks(variables["params"], masks)}
    one_batch = lambda batch_images: layers_of(variables, batch_images)
    logits, layers = jax.lax.map(one_batch, images)
    merge = lambda x: x.reshape((-1,) + x.shape[2:])  # (batches, batch, ...) → (n, ...)
    return merge(logits), {name: merge(v) for name, v in layers.items()}

  if population > 1:
    evaluate = jax.vmap(evaluate, in_axes=(0, None if shared_masks else 0, None))
  return jax.jit(evaluate, out_shardings=out_shardings)


def _layers_fn(model: nn.Module, mean, std, map_size: int = 0) -> Callable:
  """`layers_of(variables, images) -> (logits, layers)` of one batch in eval mode: float32
  logits and {'features', 'stage1', ...} as `make_eval_fn` describes them."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def layers_of(variables, batch_images):
    logits, state = model.apply(
      variables, normalize(batch_images, mean, std), train=False, mutable=["intermediates"]
    )
    layers = {}
    for name, (value, *_) in state["intermediates"].items():
      value = value.astype(jnp.float32)
      if map_size and value.ndim == 4:
        h, w = min(map_size, value.shape[1]), min(map_size, value.shape[2])
        layers[name] = adaptive_avg_pool(value, h, w)
      elif not map_size:
        layers[name] = value.mean(axis=tuple(range(1, value.ndim - 1))) if value.ndim > 2 else value
    return logits.astype(jnp.float32), layers

  return layers_of


def make_compare_fn(
  model: nn.Module,
  reference_model: nn.Module,
  *,
  mean,
  std,
  out_shardings=None,
  partials: int = 1,
  partial_sharding=None,
  population: int = 1,
  shared_masks: bool = True,
) -> Callable:
  """Returns jitted `compare(reference_variables, variables, masks, images (B, bs, ...),
  labels (B, bs), valid (B, bs), subset (B, bs)) -> (logits (n_pad, C), (stats, joint,
  confusion))`: the evaluation pass that also measures similarity to a reference model,
  without keeping any features, and counts the model's confusion matrix (`confusion[t, p]`,
  int32 (C, C), over the valid rows).

  Each batch goes through the reference and the evaluated model, and every similarity layer
  ('logits', 'features', 'stage1', ...; as `make_eval_fn`) of the pair is added into the sums
  of `metrics.streaming` twice: over the `valid` rows (CKA, debiased CKA) and over the
  `valid * subset` rows (SVCCA's subset). `stats` maps each layer to that pair of totals
  (`SimilarityStats`, no partial axis); `joint` are the sums of all layers concatenated in
  sorted name order (the layer × layer CKA matrix, `streaming.cka_matrix_from_stats`). The
  shift is the first batch's mean over its valid rows (that batch goes through the models
  once more, before the loop). `partials` = the devices the batch
  rows are sharded over: each device adds its own rows into its own sums (`partial_sharding`
  keeps them there), and the partials are added once, after the last batch. population > 1:
  vmapped over stacked member variables (and masks unless shared), one reference: outputs
  with a leading member axis.
  """
  layers_of = _layers_fn(model, mean, std)
  reference_layers_of = _layers_fn(reference_model, mean, std)

  def pair(reference_variables, variables, batch_images):
    ref_logits, ref_layers = reference_layers_of(reference_variables, batch_images)
    logits, layers = layers_of(variables, batch_images)
    return logits, {**ref_layers, "logits": ref_logits}, {**layers, "logits": logits}

  def pin(a):  # a (partials, ...) accumulator stays split over the devices
    return a if partial_sharding is None else jax.lax.with_sharding_constraint(a, partial_sharding)

  def keep_partials(stats):
    return stats._replace(
      sums=jax.tree.map(pin, stats.sums), compensation=jax.tree.map(pin, stats.compensation)
    )

  def compare(reference_variables, variables, masks, images, labels, valid, subset):
    variables = {**variables, "params": apply_masks(variables["params"], masks)}
    names = sorted(jax.eval_shape(pair, reference_variables, variables, images[0])[1])
    stack = lambda tree: jnp.concatenate([tree[name] for name in names], axis=-1)
    # The shifts: the means of batch 0's valid rows, from a pass over it before the loop (a
    # cross-device mean inside the loop would be a reduction per batch).
    _, ref0, layers0 = pair(reference_variables, variables, images[0])

    def start(x, y):
      empty = streaming.similarity_stats_init(x.shape[-1], y.shape[-1], partials)
      return keep_partials(streaming.with_shift(empty, x, y, valid[0]))

    classes = layers0["logits"].shape[-1]
    begin = (
      {name: (start(ref0[name], layers0[name]),) * 2 for name in names},
      start(stack(ref0), stack(layers0)),
      pin(jnp.zeros((partials, classes, classes), jnp.int32)),
    )

    def count(confusion, batch_labels, logits, v):
      """Each device's rows into its own (C, C) counts (as the similarity sums)."""
      split = lambda a: a.reshape((partials, -1) + a.shape[1:])
      truth = jax.nn.one_hot(split(batch_labels), classes, dtype=jnp.int32)
      guess = jax.nn.one_hot(split(jnp.argmax(logits, -1)), classes, dtype=jnp.int32)
      guess = guess * split(v).astype(jnp.int32)[..., None]
      return pin(confusion + jnp.einsum("pmt,pmq->ptq", truth, guess))

    def step(carry, inputs):
      batch_images, batch_labels, v, sub = inputs
      logits, ref_layers, layers = pair(reference_variables, variables, batch_images)
      per_layer, joint, confusion = carry
      add = lambda stats, x, y, w: keep_partials(streaming.similarity_stats_update(stats, x, y, w))
      per_layer = {
        name: (add(every, ref_layers[name], layers[name], v),
               add(chosen, ref_layers[name], layers[name], v * sub))
        for name, (every, chosen) in per_layer.items()
      }  # fmt: skip
      joint = add(joint, stack(ref_layers), stack(layers), v)
      confusion = count(confusion, batch_labels, logits, v)
      return (per_layer, joint, confusion), logits

    (per_layer, joint, confusion), logits = jax.lax.scan(
      step, begin, (images, labels, valid, subset)
    )
    is_stats = lambda s: isinstance(s, streaming.SimilarityStats)
    totals = jax.tree.map(streaming.similarity_stats_total, (per_layer, joint), is_leaf=is_stats)
    return logits.reshape((-1,) + logits.shape[2:]), (*totals, confusion.sum(axis=0))

  if population > 1:
    compare = jax.vmap(
      compare, in_axes=(None, 0, None if shared_masks else 0, None, None, None, None)
    )
  return jax.jit(compare, out_shardings=out_shardings)
