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


# --------------------------------------------------------------- above one chunk: streamed rows
@pytest.fixture()
def small_chunks(monkeypatch):
  """Chunks of 64 rows, so that a few hundred examples take the streamed paths."""
  from prunebias_jax.metrics import similarity

  monkeypatch.setattr(similarity, "CHUNK_ROWS", 64)
  return similarity


def feature_cka_reference(x, y):
  """Feature-space form in float64, centred before any product: unlike the Gram form, exact
  for features far from zero (at an offset of 1e4 the Gram form is off by 1.2e-4)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
  return np.sum((yc.T @ xc) ** 2) / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def _offset_pair(n: int, offset: float):
  rng = np.random.default_rng(11)
  x = rng.normal(size=(n, 3, 4)).astype(np.float32)
  y = np.tanh(x.reshape(n, -1)[:, :10]) + 0.3 * rng.normal(size=(n, 10))
  weights = (rng.random(n) > 0.3).astype(np.float32)
  return x + np.float32(offset), (y - offset).astype(np.float32), weights


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_linear_cka_above_one_chunk_agrees_with_float64_on_every_path(small_chunks, offset):
  """3 full chunks and a 17-row tail, features 1e4 standard deviations off zero: the host-BLAS
  path (NumPy input, and a JAX array on the CPU), the accelerators' jitted loop and the
  two-pass form (under jit) against float64. Measured: at most 5.9e-7 relative on the
  streamed paths, 3.6e-6 on the two-pass one (its centring is in float32)."""
  x, y, w = _offset_pair(3 * 64 + 17, offset)
  keep = w > 0
  want = feature_cka_reference(x, y)
  want_w = feature_cka_reference(x[keep], y[keep])
  jx, jy, jw = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)
  streamed = {
    "numpy": (linear_cka(x, y), linear_cka(x, y, w)),
    "jax on cpu": (linear_cka(jx, jy), linear_cka(jx, jy, jw)),
    "jitted loop": (
      small_chunks._linear_cka_chunked_jit(jx, jy, None, chunk=64),
      small_chunks._linear_cka_chunked_jit(jx, jy, jw, chunk=64),
    ),
  }
  for path, (plain, weighted) in streamed.items():
    assert float(plain) == pytest.approx(want, rel=2e-6), path
    assert float(weighted) == pytest.approx(want_w, rel=2e-6), path
    assert plain.dtype == jnp.float32
  traced = jax.jit(linear_cka)
  assert float(traced(x, y)) == pytest.approx(want, rel=1e-5)
  assert float(traced(x, y, w)) == pytest.approx(want_w, rel=1e-5)


def test_linear_cka_above_one_chunk_never_copies_the_inputs(small_chunks):
  """The host path holds one chunk's centred copies (1/200 of the rows here) and d x d sums:
  its peak of traced allocations (NumPy's) stays far below one input's size."""
  import tracemalloc

  rng = np.random.default_rng(5)
  x = rng.normal(size=(64 * 200, 64)).astype(np.float32)
  y = (x[:, ::-1] + rng.normal(size=x.shape)).astype(np.float32)
  want = feature_cka_reference(x, y)
  tracemalloc.start()
  try:
    got = float(linear_cka(x, y))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert got == pytest.approx(want, rel=2e-6)
  assert peak < x.nbytes / 4, (peak, x.nbytes)


def test_linear_cka_above_one_chunk_keeps_the_degenerate_cases(small_chunks):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(300, 3))
  const = np.full((300, 4), 2.5)
  for a, b in ((x, const), (const, x), (const, const)):
    assert float(linear_cka(a, b)) == 0.0
  assert float(linear_cka(x, x[:, ::-1] * 3.0 + 1.0)) == pytest.approx(1.0, abs=1e-6)
  assert float(linear_cka(x, x, np.zeros(300))) == 0.0  # no example weighted in
  with pytest.raises(ValueError, match=r"weights must have shape \(300,\)"):
    linear_cka(x, x, np.ones(299))
  with pytest.raises(ValueError, match="same number of examples"):
    linear_cka(x, x[:299])


def test_debiased_cka_and_svcca_above_one_chunk_come_from_streamed_sums(small_chunks):
  """Above CHUNK_ROWS the two other similarity functions stream their rows too (no centred
  copy, no SVD of the data matrix): equal to their in-memory forms up to float32 rounding,
  weights included, with the features 1e4 off zero."""
  from prunebias_jax.metrics import debiased_linear_cka, svcca_distance

  x, y, w = _offset_pair(3 * 64 + 17, 1e4)
  keep = w > 0
  calls = []
  real = small_chunks.streaming.similarity_stats
  spy = lambda *a, **k: calls.append(k["batch_size"]) or real(*a, **k)
  small_chunks.streaming.similarity_stats = spy
  try:
    got = {
      "debiased": float(debiased_linear_cka(x, y)),
      "debiased_w": float(debiased_linear_cka(x, y, w)),
      "svcca": float(svcca_distance(x, y)),
      "svcca_anatome": float(svcca_distance(x, y, anatome_compat=True)),
    }
  finally:
    small_chunks.streaming.similarity_stats = real
  assert calls == [64] * 4  # every one of them streamed, in chunks of CHUNK_ROWS
  # The in-memory forms, on the centred data (they are shift-invariant; centring first keeps
  # their float32 two-pass arithmetic exact enough to compare), through jit (no streaming).
  xc, yc = x - x.mean(0), y - y.mean(0)
  xk, yk = x[keep] - x[keep].mean(0), y[keep] - y[keep].mean(0)
  want = {
    "debiased": float(jax.jit(debiased_linear_cka)(xc, yc)),
    "debiased_w": float(jax.jit(debiased_linear_cka)(xk, yk)),
    "svcca": float(jax.jit(svcca_distance)(xc, yc)),
  }
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=2e-6), key
  assert 0.0 < got["svcca_anatome"] < 1.0
  with pytest.raises(ValueError, match=r"weights must have shape \(209,\)"):
    debiased_linear_cka(x, y, np.ones(208))


def _peak_rss_increase_mb(fn):
  """(fn(), MB): the rise of the process's peak resident set over its resident set before the
  call (the kernel's high-water mark reset first); skips where /proc does not allow that."""
  import gc

  def kb(field):
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

  gc.collect()
  base = kb("VmRSS")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pytest.skip("the peak resident set cannot be reset here")
  value = fn()
  return value, (kb("VmHWM") - base) / 1024


def test_similarity_of_large_inputs_needs_about_one_chunk_of_memory():
  """600,000 × 64 float32 per input (146 MB each): each function's peak memory over the
  inputs stays below one copy of an input (measured alone: 16 MB linear, 52 MB debiased, 32 MB
  SVCCA; 81 MB debiased in a full test session, whose allocator holds more per thread). Fails
  with a centred copy of an input, or with the chunks queued without waiting (async dispatch
  held a copy of every batch: 330 MB)."""
  from prunebias_jax.metrics import debiased_linear_cka, similarity, svcca_distance

  rng = np.random.default_rng(0)
  n, chunk = 600_000, similarity.CHUNK_ROWS
  x = rng.standard_normal((n, 64), dtype=np.float32)
  y = x[:, ::-1] + rng.standard_normal((n, 64), dtype=np.float32)
  for fn in (linear_cka, debiased_linear_cka, svcca_distance):
    warm = chunk + n % chunk  # compiles the chunk and the tail before the measured call
    fn(x[:warm], y[:warm])
    value, mb = _peak_rss_increase_mb(lambda: float(fn(x, y)))
    assert mb < 0.9 * x.nbytes / 2**20, (fn.__name__, mb)
    assert 0.0 < value < 1.0
