"""CE and KD losses against plain NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.train import cross_entropy, distillation_kl, kd_objective


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
def test_kd_objective_matches_numpy(alpha, temperature):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(8, 5)) * 3
  t = rng.normal(size=(8, 5)) * 3
  y = rng.integers(0, 5, 8)
  ce = -_np_log_softmax(s)[np.arange(8), y].mean()
  p_t = np.exp(_np_log_softmax(t / temperature))
  kl = (p_t * (np.log(p_t) - _np_log_softmax(s / temperature))).sum(-1).mean()
  expected = (1 - alpha) * ce + alpha * temperature**2 * kl
  loss, ce_out = kd_objective(
    jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), alpha, temperature
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(ce_out), ce, rtol=1e-5)


def test_kl_zero_for_identical_logits_and_finite_for_saturated_teacher():
  s = jnp.asarray([[1.0, 2.0, 3.0]])
  assert abs(float(distillation_kl(s, s, 4.0))) < 1e-6
  teacher = jnp.asarray([[1000.0, -1000.0, 0.0]])  # softmax underflows to exact zeros
  assert np.isfinite(float(distillation_kl(s, teacher, 1.0)))
  np.testing.assert_allclose(
    float(cross_entropy(s, jnp.asarray([2]))),
    -_np_log_softmax(np.array([[1.0, 2.0, 3.0]]))[0, 2],
    rtol=1e-6,
  )
