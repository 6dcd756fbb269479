"""Tests for the extra similarity measures: debiased / streaming / matrix CKA and SVCCA.

Every reference here is an independent implementation: explicit n x n Gram
matrices for HSIC, NumPy SVD + QR for SVCCA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.metrics.similarity import (
  adaptive_avg_pool,
  cka_matrix,
  debiased_linear_cka,
  linear_cka,
  streaming_linear_cka,
  streaming_linear_cka_init,
  streaming_linear_cka_result,
  streaming_linear_cka_update,
  svcca_conv_distance,
  svcca_distance,
)

# ---------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------


def unbiased_hsic_gram(x, y):
  """Song et al. (2012) unbiased HSIC from explicit n x n linear Gram matrices (float64)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  n = len(x)
  k = x @ x.T
  l_ = y @ y.T
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l_, 0.0)
  one = np.ones(n)
  value = (
    np.trace(k @ l_)
    + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
    - 2.0 / (n - 2) * (one @ k @ l_ @ one)
  )
  return value / (n * (n - 3))


def debiased_cka_gram(x, y):
  return unbiased_hsic_gram(x, y) / np.sqrt(unbiased_hsic_gram(x, x) * unbiased_hsic_gram(y, y))


def linear_cka_gram(x, y):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  n = len(x)
  h = np.eye(n) - 1.0 / n
  k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_))


def svcca_numpy(x, y, threshold=0.99, anatome_compat=False):
  """SVCCA with NumPy SVD + QR; returns (distance, ratios_x, ratios_y) for boundary checks."""

  def reduce(a):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    if not anatome_compat:
      a = a - a.mean(axis=0)
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    ratio = np.cumsum(s) / s.sum()
    k = int(np.sum(ratio < threshold)) + (0 if anatome_compat else 1)
    k = max(1, min(k, len(s)))
    return a @ vt[:k].T, k, ratio

  rx, kx, ratio_x = reduce(x)
  ry, ky, ratio_y = reduce(y)
  qx, _ = np.linalg.qr(rx - rx.mean(axis=0))
  qy, _ = np.linalg.qr(ry - ry.mean(axis=0))
  corr = np.linalg.svd(qx.T @ qy, compute_uv=False)
  m = min(kx, ky)
  return 1.0 - corr[:m].sum() / m, ratio_x, ratio_y


def assert_away_from_threshold(ratios, threshold, margin=1e-4):
  for r in ratios:
    assert np.min(np.abs(r - threshold)) > margin, "test data sits on the SVD threshold"


def golden_xy():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  return x, y


# ---------------------------------------------------------------------------
# Debiased CKA
# ---------------------------------------------------------------------------


def test_debiased_cka_golden_value():
  x, y = golden_xy()
  val = debiased_linear_cka(x, y)
  assert val.shape == () and val.dtype == jnp.float32
  assert round(float(val), 5) == 0.51346
  assert round(float(linear_cka(x, y)), 5) == 0.55761  # unchanged neighbour
  assert float(val) == pytest.approx(debiased_cka_gram(x, y), abs=2e-6)
  assert float(debiased_linear_cka(y, x)) == pytest.approx(float(val), abs=1e-6)
  with jax.enable_x64(True):
    v64 = debiased_linear_cka(x, y)
    assert v64.dtype == jnp.float64
    assert float(v64) == pytest.approx(debiased_cka_gram(x, y), abs=1e-12)


@pytest.mark.parametrize(
  "n,shape_x,shape_y",
  [(30, (7,), (5,)), (12, (40,), (3,)), (10, (2, 3, 4), (30,))],
)
def test_debiased_cka_matches_gram_reference(n, shape_x, shape_y):
  # includes d > n (Gram form inside) and uncentred, shifted, multi-dim features
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, *shape_x)) + 3.0
  proj = rng.normal(size=(int(np.prod(shape_x)), int(np.prod(shape_y))))
  y = np.tanh(x.reshape(n, -1) @ proj / 3.0) + 0.5 * rng.normal(size=(n, int(np.prod(shape_y))))
  y = y.reshape(n, *shape_y) - 7.0
  got = float(debiased_linear_cka(x, y))
  assert got == pytest.approx(debiased_cka_gram(x, y), abs=2e-5)
  assert got < float(linear_cka(x, y))  # debiasing removes positive bias here


def test_debiased_cka_can_be_negative_and_self_is_one():
  rng = np.random.default_rng(7)
  vals = []
  for _ in range(20):
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    v = float(debiased_linear_cka(x, y))
    assert v == pytest.approx(debiased_cka_gram(x, y), abs=1e-5)
    vals.append(v)
  assert min(vals) < 0.0  # independent features: centred on 0, unlike linear CKA
  x = rng.normal(size=(20, 4))
  assert float(debiased_linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_debiased_cka_jit_weights_and_degenerate_cases():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 6))
  y = x @ rng.normal(size=(6, 4)) + rng.normal(size=(40, 4))
  eager = float(debiased_linear_cka(x, y))
  pad_x = np.concatenate([x, 50.0 * rng.normal(size=(9, 6))])
  pad_y = np.concatenate([y, -20.0 + rng.normal(size=(9, 4))])
  w = np.concatenate([np.ones(40), np.zeros(9)])
  perm = rng.permutation(49)
  got = float(jax.jit(debiased_linear_cka)(pad_x[perm], pad_y[perm], w[perm]))
  assert got == pytest.approx(eager, abs=1e-5)
  assert abs(float(debiased_linear_cka(pad_x, pad_y)) - eager) > 1e-2

  with pytest.raises(ValueError):
    debiased_linear_cka(np.ones((3, 2)), np.ones((3, 2)))
  with pytest.raises(ValueError):
    debiased_linear_cka(np.ones((5, 2)), np.ones((6, 2)))
  # fewer than 4 weighted rows -> NaN
  w3 = np.zeros(49)
  w3[:3] = 1
  assert np.isnan(float(debiased_linear_cka(pad_x, pad_y, w3)))
  # constant features -> 0.0, like linear_cka
  assert float(debiased_linear_cka(np.full((10, 3), 2.0), x[:10])) == 0.0
  # a feature non-zero on one example only: the unbiased self-HSIC is exactly 0
  # (the reference says so), float32 cancellation must give NaN, not noise
  spike = np.array([[0.0], [0.0], [0.0], [0.0], [1.0]])
  assert unbiased_hsic_gram(spike, spike) == pytest.approx(0.0, abs=1e-15)
  assert np.isnan(float(debiased_linear_cka(spike, y[:5])))


# ---------------------------------------------------------------------------
# Streaming (exact) CKA
# ---------------------------------------------------------------------------


def test_streaming_linear_cka_equals_full_batch():
  rng = np.random.default_rng(11)
  n = 230
  x = rng.normal(size=(n, 4, 3)) * 2.0 + 100.0  # large offset: tests the stable merge
  y = np.tanh(x.reshape(n, -1)[:, :5] - 100.0) + 0.3 * rng.normal(size=(n, 5)) - 40.0
  full = float(linear_cka(x, y))
  cuts = [0, 1, 1, 101, 201, n]  # uneven, a size-1 and an empty batch
  batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
  assert float(streaming_linear_cka(batches)) == pytest.approx(full, abs=1e-5)
  assert full == pytest.approx(linear_cka_gram(x, y), abs=1e-5)

  # jitted update with padded fixed-size batches and 0/1 weights
  update = jax.jit(streaming_linear_cka_update)
  state = streaming_linear_cka_init(12, 5)
  size = 64
  for start in range(0, n, size):
    xb, yb = x[start : start + size], y[start : start + size]
    m = len(xb)
    w = np.concatenate([np.ones(m), np.zeros(size - m)])
    xb = np.concatenate([xb, 1e3 * np.ones((size - m, 4, 3))])
    yb = np.concatenate([yb, -1e3 * np.ones((size - m, 5))])
    state = update(state, xb, yb, w)
  assert float(state.count) == n
  assert float(streaming_linear_cka_result(state)) == pytest.approx(full, abs=1e-5)
  np.testing.assert_allclose(state.mean_x, x.reshape(n, -1).mean(0), rtol=1e-5)
  assert float(streaming_linear_cka([])) == 0.0
  with pytest.raises(ValueError):
    streaming_linear_cka_update(streaming_linear_cka_init(3, 5), x[:10], y[:10])


# ---------------------------------------------------------------------------
# Layer x layer CKA
# ---------------------------------------------------------------------------


def test_cka_matrix_matches_pairwise():
  rng = np.random.default_rng(2)
  n = 24
  base = rng.normal(size=(n, 5))
  layers_a = [
    base,
    np.tanh(base @ rng.normal(size=(5, 40))),  # d > n: Gram form
    rng.normal(size=(n, 3, 3, 4)) + base[:, :1, None, None],  # conv map (n, H, W, C)
  ]
  layers_b = [
    base @ rng.normal(size=(5, 7)) + 0.2 * rng.normal(size=(n, 7)),
    rng.normal(size=(n, 50)),
  ]
  for debiased in (False, True):
    mat = np.asarray(cka_matrix(layers_a, layers_b, debiased=debiased))
    assert mat.shape == (3, 2)
    ref = debiased_cka_gram if debiased else linear_cka_gram
    fn = debiased_linear_cka if debiased else linear_cka
    for i, a in enumerate(layers_a):
      for j, b in enumerate(layers_b):
        assert mat[i, j] == pytest.approx(ref(a, b), abs=2e-5), (debiased, i, j)
    assert mat[1, 0] == pytest.approx(float(fn(layers_a[1], layers_b[0])), abs=2e-5)
  self_mat = np.asarray(cka_matrix(layers_a, debiased=True))
  assert self_mat.shape == (3, 3)
  np.testing.assert_allclose(np.diag(self_mat), 1.0, atol=1e-5)
  np.testing.assert_allclose(self_mat, self_mat.T, atol=0)
  assert self_mat[0, 1] == pytest.approx(debiased_cka_gram(layers_a[0], layers_a[1]), abs=2e-5)
  with pytest.raises(ValueError):
    cka_matrix([base], [base[:10]])
  with pytest.raises(ValueError):
    cka_matrix([base[:3]], debiased=True)


# ---------------------------------------------------------------------------
# SVCCA
# ---------------------------------------------------------------------------


def test_svcca_identity_linear_map_and_symmetry():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 12)) @ np.diag(np.linspace(1.0, 2.0, 12)) + 5.0
  assert float(svcca_distance(x, x)) == pytest.approx(0.0, abs=1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  a = q @ np.diag(np.linspace(0.7, 1.4, 12))  # well-conditioned: all 12 directions kept
  assert float(svcca_distance(x, x @ a - 3.0)) == pytest.approx(0.0, abs=1e-5)
  assert float(svcca_distance(x, x @ a, threshold=1.0)) == pytest.approx(0.0, abs=1e-5)
  y = np.tanh(x @ rng.normal(size=(12, 8)) / 4.0) + 0.5 * rng.normal(size=(300, 8))
  d_xy, d_yx = float(svcca_distance(x, y)), float(svcca_distance(y, x))
  assert d_xy == pytest.approx(d_yx, abs=1e-5)
  assert 0.05 < d_xy < 0.95


@pytest.mark.parametrize("seed", [0, 1])
def test_svcca_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  n = 400
  # decaying spectra so the 99% rule drops directions (k < d)
  x = rng.normal(size=(n, 20)) @ np.diag(np.logspace(0, -3, 20))
  y = np.concatenate([x[:, :6] @ rng.normal(size=(6, 6)), rng.normal(size=(n, 9))], axis=1)
  y = y @ np.diag(np.logspace(0, -2.5, 15)) + 2.0
  ref, rx, ry = svcca_numpy(x, y)
  assert_away_from_threshold([rx, ry], 0.99)
  assert np.sum(rx < 0.99) + 1 < 20  # really truncated
  got = float(svcca_distance(x, y))
  assert got == pytest.approx(ref, abs=2e-5)
  assert float(jax.jit(svcca_distance)(x, y)) == pytest.approx(got, abs=1e-6)
  for t in (0.5, 0.9):
    ref_t, rx, ry = svcca_numpy(x, y, threshold=t)
    assert_away_from_threshold([rx, ry], t)
    assert float(svcca_distance(x, y, threshold=t)) == pytest.approx(ref_t, abs=2e-5)


def test_svcca_independent_features_near_one():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
  ref, rx, ry = svcca_numpy(x, y)
  assert_away_from_threshold([rx, ry], 0.99)
  got = float(svcca_distance(x, y))
  assert got == pytest.approx(ref, abs=2e-5)
  # canonical correlations of independent data are O(sqrt(d / n)): mean well below 0.1
  assert 0.9 < got < 1.0


def test_svcca_anatome_compat_rule():
  rng = np.random.default_rng(9)
  n = 300
  x = rng.normal(size=(n, 10)) @ np.diag(np.logspace(0, -2, 10)) + 0.3
  y = x[:, :5] @ rng.normal(size=(5, 6)) + 0.2 * rng.normal(size=(n, 6)) - 0.5
  ref, rx, ry = svcca_numpy(x, y, anatome_compat=True)
  assert_away_from_threshold([rx, ry], 0.99)
  got = float(svcca_distance(x, y, anatome_compat=True))
  assert got == pytest.approx(ref, abs=2e-5)
  # the default rule keeps one more direction and centres first: a different number
  assert abs(got - float(svcca_distance(x, y))) > 1e-3


def test_svcca_bad_inputs():
  x = np.random.default_rng(0).normal(size=(10, 3))
  with pytest.raises(ValueError):
    svcca_distance(x, x[:9])
  with pytest.raises(ValueError):
    svcca_distance(x, x, threshold=0.0)
  assert np.isnan(float(svcca_distance(np.ones((10, 3)), x)))
  with pytest.raises(ValueError):
    svcca_conv_distance(x, x)


def test_svcca_conv_per_position_average():
  rng = np.random.default_rng(1)
  n, h, w, c = 120, 4, 4, 5
  mx = rng.normal(size=(n, h, w, c))
  my = np.tanh(mx @ rng.normal(size=(c, c))) + 0.4 * rng.normal(size=(n, h, w, c))
  # maps already <= size: no resize, plain average of per-position SVCCA
  # (default position_batch=16 >= 16 positions: one vmapped batch)
  refs = [svcca_numpy(mx[:, i, j], my[:, i, j])[0] for i in range(h) for j in range(w)]
  got = float(svcca_conv_distance(mx, my, size=16))
  assert got == pytest.approx(np.mean(refs), abs=2e-5)
  assert float(svcca_conv_distance(mx, mx, size=16)) == pytest.approx(0.0, abs=1e-5)

  # avg_pool downsampling 4x4 -> 2x2 = mean of 2x2 blocks (adaptive_avg_pool2d bins);
  # position_batch=3 over 4 positions exercises lax.map's remainder path
  px = mx.reshape(n, 2, 2, 2, 2, c).mean(axis=(2, 4))
  py = my.reshape(n, 2, 2, 2, 2, c).mean(axis=(2, 4))
  refs = [svcca_numpy(px[:, i, j], py[:, i, j])[0] for i in range(2) for j in range(2)]
  got = float(svcca_conv_distance(mx, my, size=2, resize_method="avg_pool", position_batch=3))
  assert got == pytest.approx(np.mean(refs), abs=2e-5)

  # bilinear (default) downsampling = jax.image.resize then per-position SVCCA,
  # positions one at a time (position_batch=None)
  bx = np.asarray(jax.image.resize(jnp.asarray(mx, jnp.float32), (n, 3, 3, c), "bilinear"))
  by = np.asarray(jax.image.resize(jnp.asarray(my, jnp.float32), (n, 3, 3, c), "bilinear"))
  refs = [svcca_numpy(bx[:, i, j], by[:, i, j])[0] for i in range(3) for j in range(3)]
  got = float(svcca_conv_distance(mx, my, size=3, position_batch=None))
  assert got == pytest.approx(np.mean(refs), abs=5e-5)


def test_adaptive_avg_pool_uses_pytorch_bins():
  """7 → 3 rows and 5 → 2 columns (uneven, overlapping bins): bin i of an axis of length L
  averages [floor(i L / out), ceil((i + 1) L / out)), written out by hand."""
  rng = np.random.default_rng(4)
  maps = rng.normal(size=(2, 7, 5, 3)).astype(np.float32)
  rows = [(0, 3), (2, 5), (4, 7)]  # floor(0)=0..ceil(7/3)=3, floor(7/3)=2..ceil(14/3)=5, 4..7
  cols = [(0, 3), (2, 5)]  # 0..ceil(2.5)=3, floor(2.5)=2..5
  want = np.stack(
    [np.stack([maps[:, a:b, c:d].mean(axis=(1, 2)) for c, d in cols], 1) for a, b in rows], 1
  )
  got = np.asarray(adaptive_avg_pool(jnp.asarray(maps), 3, 2))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert adaptive_avg_pool(jnp.asarray(maps), 7, 5).shape == maps.shape  # no-op at full size


@pytest.mark.parametrize("anatome_compat", [False, True])
def test_svcca_keep_count_is_clipped_to_the_numerical_rank(anatome_compat):
  """Directions below the rank tolerance are never kept, even when the cumulative-sum rule
  would reach past them (threshold 1: every ratio below 1 counts)."""
  from prunebias_jax.metrics.similarity import _keep_count

  s = jnp.array([1.0, 1.0, 1e-5, 1e-5], jnp.float32)  # numerical rank 2 at tolerance 1e-4
  assert int(_keep_count(s, 1.0, anatome_compat, jnp.float32(1e-4))) == 2
  assert int(_keep_count(s, 1.0, anatome_compat, jnp.float32(1e-6))) == 4 - anatome_compat
  assert int(_keep_count(s, 0.4, anatome_compat, jnp.float32(1e-4))) == 1  # and at least 1


def test_unbiased_hsic_parts_returns_the_estimate_and_its_terms_magnitude():
  """n(n-3) HSIC_1 = cross - n/(n-2) a.b + (sum a)(sum b)/((n-1)(n-2)), and the sum of the
  three terms' absolute values (the scale of its rounding error), by hand."""
  from prunebias_jax.metrics.similarity import _unbiased_hsic_parts

  a, b, n, cross = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([2.0, 0.0, 1.0, 3.0, 1.0]), 5, 4.0
  t2 = n / (n - 2) * a @ b  # 5/3 * 22
  t3 = a.sum() * b.sum() / ((n - 1) * (n - 2))  # 15 * 7 / 12
  h, magnitude = _unbiased_hsic_parts(jnp.float32(cross), jnp.asarray(a), jnp.asarray(b), n)
  assert float(h) == pytest.approx(cross - t2 + t3, rel=1e-6)
  assert float(magnitude) == pytest.approx(abs(cross) + abs(t2) + abs(t3), rel=1e-6)


def test_svcca_bits_do_not_depend_on_the_blas_thread_count():
  """The host LAPACK under SVCCA gives other bits on 1 thread than on several (measured
  without the pin: 0.27674985 on 1 thread, 0.27675009 on 4 for this pair); Ray and SLURM
  set OMP_NUM_THREADS per task, so a sweep's records would depend on where each cell ran."""
  threadpoolctl = pytest.importorskip("threadpoolctl")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1000, 512)).astype(np.float32)
  y = (np.tanh(1.3 * x) + 0.5 * np.roll(x, 1, axis=1) + rng.normal(size=x.shape)).astype(np.float32)
  maps = rng.normal(size=(300, 2, 2, 96)).astype(np.float32)
  got = {}
  for threads in (1, 4):
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
      got[threads] = (
        float(svcca_distance(x, y)),
        float(svcca_distance(x, y, anatome_compat=True)),
        float(svcca_conv_distance(maps, np.tanh(maps), size=2)),
      )
  assert got[1] == got[4]
