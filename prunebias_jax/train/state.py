"""Training state and the optax optimizer built from config."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from prunebias_jax.choices import LR_SCHEDULES as SCHEDULES

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and updates.

  `masks` (a pytree shaped like `params`, or None for a dense model) travel with the weights,
  as jaxpruner keeps them in its optimizer state: the step applies them, a gradual schedule
  replaces them between epochs, and a mid-stage checkpoint saves them with the rest. `params`
  are stored already masked. `distill`: what a distillation method trains beside the model
  (CRD's heads, their optimizer state and memory banks: `train.distill.CRDState`), or None.
  `frozen`: variable collections the model reads and training never changes (a static
  quantization scheme's calibrated activation ranges, {'quant_stats': ...}), or None.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  masks: PyTree = None
  distill: PyTree = None
  frozen: PyTree = None

  @property
  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int
) -> optax.Schedule:
  """'cosine': lr·½(1+cos(π t/T)); 'step': lr·factor^(#decay epochs passed); 'constant'."""
  total = max(1, steps_per_epoch * epochs)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=total)
  if cfg.schedule == "step":
    boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
    return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  raise ValueError(f"unknown schedule {cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")


def make_optimizer(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int
) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (PyTorch's SGD semantics):
  g ← g + wd·w;  v ← μ·v + g;  w ← w − lr·v."""
  return optax.chain(
    optax.add_decayed_weights(cfg.weight_decay),
    optax.sgd(
      learning_rate_schedule(cfg, steps_per_epoch, epochs),
      momentum=cfg.momentum,
      nesterov=cfg.nesterov,
    ),
  )


def create_state(
  params: PyTree,
  batch_stats: PyTree,
  optimizer: optax.GradientTransformation,
  masks: PyTree = None,
  distill: PyTree = None,
  frozen: PyTree = None,
) -> TrainState:
  """A fresh state (step 0, new optimizer state) around copies of the given weights.

  The train step donates its state, so the state must own its buffers: without the copy a
  fine-tune would free the teacher's arrays (or the caller's masks) it was started from.
  """
  params, batch_stats, masks = jax.tree.map(jnp.array, (params, batch_stats, masks))
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=optimizer.init(params),
    masks=masks,
    distill=distill,
    frozen=frozen,
  )
