"""Training: state and optimizer, CE/KD losses, jitted steps, the loop."""

from prunebias_jax.train.loop import NONFINITE_RULES, NonFiniteLossError, compare, evaluate, fit
from prunebias_jax.train.losses import cross_entropy, distillation_kl, kd_objective
from prunebias_jax.train.state import (
  SCHEDULES,
  TrainState,
  create_state,
  learning_rate_schedule,
  make_optimizer,
)
from prunebias_jax.train.steps import make_compare_fn, make_eval_fn, make_train_step

__all__ = [
  "NONFINITE_RULES",
  "NonFiniteLossError",
  "SCHEDULES",
  "TrainState",
  "compare",
  "create_state",
  "cross_entropy",
  "distillation_kl",
  "evaluate",
  "fit",
  "kd_objective",
  "learning_rate_schedule",
  "make_compare_fn",
  "make_eval_fn",
  "make_optimizer",
  "make_train_step",
]
