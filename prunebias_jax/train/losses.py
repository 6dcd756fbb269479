"""Cross-entropy and temperature-scaled knowledge distillation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over the batch of −log softmax(logits)[label]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def distillation_kl(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.Array | float
) -> jax.Array:
  """KL(softmax(t/T) ‖ softmax(s/T)), summed over classes and averaged over the batch.

  Uses log-space targets so a teacher probability that underflows to 0 cannot give 0·(−∞).
  """
  log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  log_teacher = jax.nn.log_softmax(
    jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  )
  return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher).mean()


def kd_objective(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  alpha: jax.Array | float,
  temperature: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
  """(1−α)·CE(y, s) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al. 2015; the T² keeps
  the soft-target gradients on the CE scale). Returns (loss, ce)."""
  ce = cross_entropy(student_logits, labels)
  kl = distillation_kl(student_logits, teacher_logits, temperature)
  return (1.0 - alpha) * ce + alpha * temperature**2 * kl, ce
