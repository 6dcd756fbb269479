"""Tests for prunebias_jax.metrics.similarity (linear CKA, prediction agreement)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.metrics import linear_cka, prediction_agreement


def gram_cka_reference(x, y):
  """Independent n x n Gram-matrix form: HSIC(K, L) = tr(K H L H), float64."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k = x @ x.T
  l_ = y @ y.T

  def hsic(a, b):
    return np.trace(a @ h @ b @ h)

  return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def golden_xy():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  return x, y


def test_linear_cka_golden_value():
  x, y = golden_xy()
  val = linear_cka(x, y)
  assert val.shape == () and val.dtype == jnp.float32
  assert round(float(val), 5) == 0.55761
  assert float(val) == pytest.approx(gram_cka_reference(x, y), abs=1e-6)
  assert float(linear_cka(y, x)) == pytest.approx(float(val), abs=1e-6)


def test_linear_cka_golden_value_x64():
  x, y = golden_xy()
  with jax.enable_x64(True):
    val = linear_cka(x, y)
    assert val.dtype == jnp.float64
    assert float(val) == pytest.approx(gram_cka_reference(x, y), abs=1e-12)


def test_linear_cka_self_is_one():
  x, _ = golden_xy()
  assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 4, 3)) * 50.0 + 7.0
  assert float(linear_cka(z, z)) == pytest.approx(1.0, abs=1e-6)


def test_linear_cka_invariances():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(80, 12))
  y = x[:, :6] @ rng.normal(size=(6, 9)) + 0.5 * rng.normal(size=(80, 9))
  base = float(linear_cka(x, y))
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  assert float(linear_cka(x @ q, y)) == pytest.approx(base, abs=1e-5)
  assert float(linear_cka(x, 3.7 * y)) == pytest.approx(base, abs=1e-5)
  assert float(linear_cka(1e-3 * x, 1e4 * y)) == pytest.approx(base, abs=1e-5)
  # translation (centring) invariance
  assert float(linear_cka(x + 10.0, y - 3.0)) == pytest.approx(base, abs=1e-5)
  # but NOT invariant to a generic (anisotropic) linear map: the test can fail
  a = np.diag(np.linspace(0.1, 10.0, 12))
  assert abs(float(linear_cka(x @ a, y)) - base) > 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_cka_matches_gram_hsic(seed):
  rng = np.random.default_rng(seed)
  n, d1, d2 = 30, 7, 5
  x = rng.normal(size=(n, d1))
  y = np.tanh(x @ rng.normal(size=(d1, d2))) + 0.3 * rng.normal(size=(n, d2))
  assert float(linear_cka(x, y)) == pytest.approx(gram_cka_reference(x, y), abs=1e-5)
  # trailing dims are flattened
  x3 = rng.normal(size=(n, 2, 3, 2))
  assert float(linear_cka(x3, y)) == pytest.approx(gram_cka_reference(x3, y), abs=1e-5)
  np.testing.assert_allclose(
    float(linear_cka(x3, y)), float(linear_cka(x3.reshape(n, -1), y)), atol=1e-7
  )


def test_linear_cka_jit_and_weights():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(40, 6))
  y = x @ rng.normal(size=(6, 4)) + rng.normal(size=(40, 4))
  eager = float(linear_cka(x, y))
  assert float(jax.jit(linear_cka)(x, y)) == pytest.approx(eager, abs=1e-6)

  pad_x = np.concatenate([x, 100.0 * rng.normal(size=(10, 6))])
  pad_y = np.concatenate([y, -50.0 + rng.normal(size=(10, 4))])
  w = np.concatenate([np.ones(40), np.zeros(10)])
  got = float(jax.jit(linear_cka)(pad_x, pad_y, w))
  assert got == pytest.approx(eager, abs=1e-5)
  # without the weights, the padding does change the value
  assert abs(float(linear_cka(pad_x, pad_y)) - eager) > 1e-2
  # weights in a shuffled order equal dropping those rows
  perm = rng.permutation(50)
  assert float(linear_cka(pad_x[perm], pad_y[perm], w[perm])) == pytest.approx(eager, abs=1e-5)


def test_linear_cka_constant_features_give_zero():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(20, 3))
  const = np.full((20, 4), 2.5)
  for a, b in ((x, const), (const, x), (const, const)):
    val = linear_cka(a, b)
    assert np.isfinite(float(val)) and float(val) == 0.0


def test_linear_cka_bad_shapes():
  with pytest.raises(ValueError):
    linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))
  with pytest.raises(ValueError):
    linear_cka(np.zeros((5, 2)), np.zeros((5, 2)), np.ones(4))


def test_prediction_agreement():
  a = np.array([0, 1, 2, 3, 4, 5, 6, 7])
  b = np.array([0, 1, 2, 0, 4, 0, 6, 0])
  assert float(prediction_agreement(a, b)) == pytest.approx(5 / 8)
  assert float(prediction_agreement(a, a)) == 1.0
  w = np.array([1, 1, 1, 0, 1, 0, 1, 0])
  assert float(prediction_agreement(a, b, w)) == pytest.approx(1.0)
  w2 = np.array([0, 0, 0, 1, 0, 1, 0, 1])
  assert float(prediction_agreement(a, b, w2)) == pytest.approx(0.0)
  pop = np.stack([a, b])
  np.testing.assert_allclose(prediction_agreement(pop, a), [1.0, 5 / 8])
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
  assert float(jax.jit(prediction_agreement)(x, y)) == pytest.approx(np.mean(x == y), abs=1e-7)
