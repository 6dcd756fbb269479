"""prunebias_jax.metrics.streaming: similarity from sums accumulated batch by batch, against
independent float64 references (n x n Gram forms, the SVD of the data matrices) and the
in-memory functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunebias_jax.metrics import debiased_linear_cka, linear_cka, svcca_distance
from prunebias_jax.metrics import streaming as st


def golden_xy():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  return x, y


def ill_conditioned(n=3000, seed=0):
  """Features with a large common offset (1e3, -5e2) and a spectrum over three decades: a
  one-pass X^T X - n m m^T in float32 loses every digit of the smallest directions here."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 40)) * np.logspace(0, -3, 40) + 1000.0
  y = (x[:, :30] - 1000.0) @ rng.normal(size=(30, 25)) + 0.1 * rng.normal(size=(n, 25)) - 500.0
  return x.astype(np.float32), y.astype(np.float32)


def gram_cka(x, y, debiased=False):
  """n x n Gram-matrix CKA in float64: tr(K H L H), or Song et al.'s unbiased HSIC."""
  # Centred first: both forms are shift-invariant, and float64 Gram entries of features
  # offset by 1e3 would cancel away the digits compared here.
  x, y = (np.asarray(a, np.float64) - np.mean(a, 0) for a in (x, y))
  n = len(x)

  def hsic(k, l_):
    if not debiased:
      centre = lambda g: g - g.mean(0) - g.mean(1)[:, None] + g.mean()
      return np.sum(centre(k) * centre(l_))
    k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
    k1, l1 = k.sum(1), l_.sum(1)
    return (
      np.sum(k * l_) + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)
    ) / (n * (n - 3))

  k, l_ = x @ x.T, y @ y.T
  return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def svcca_data_matrix(x, y, threshold=0.99, anatome=True):
  """SVCCA from the SVDs of the float64 data matrices (the anatome recipe), no covariances."""
  eps = np.finfo(np.float32).eps

  def basis(a):
    n, d = a.shape
    if not anatome:
      a = a - a.mean(0)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    ratio = np.cumsum(s) / s.sum()
    k = int(np.sum(ratio < threshold)) + (0 if anatome else 1)
    k = int(np.clip(k, 1, max(int(np.sum(s > s[0] * max(n, d) * eps)), 1)))
    if not anatome:
      return u[:, :k], k
    z = (u * s)[:, :k]
    z = z - z.mean(0)
    u2, s2, _ = np.linalg.svd(z, full_matrices=False)
    return u2[:, s2 > s2[0] * max(n, d) * eps], k

  bx, kx = basis(np.asarray(x, np.float64))
  by, ky = basis(np.asarray(y, np.float64))
  corr = np.linalg.svd(bx.T @ by, compute_uv=False)
  m = min(kx, ky)
  return 1.0 - np.clip(corr[:m], 0, 1).sum() / m


def test_golden_values_from_streamed_sums():
  x, y = golden_xy()
  s = st.similarity_stats(x, y, batch_size=7)  # 15 batches, the last one short
  assert round(st.linear_cka_from_stats(s), 5) == 0.55761
  assert round(st.debiased_cka_from_stats(s), 5) == 0.51346
  assert st.linear_cka_from_stats(s) == pytest.approx(gram_cka(x, y), abs=1e-7)
  assert st.debiased_cka_from_stats(s) == pytest.approx(gram_cka(x, y, True), abs=1e-7)


def test_ill_conditioned_offset_features_agree_with_float64():
  """The stated error bound: float32 sums of shifted rows, compensated over 24 batches, give
  every metric within 1e-6 of float64 (the in-memory float32 SVCCA is 5e-5 off here)."""
  x, y = ill_conditioned()
  s = st.similarity_stats(x, y, batch_size=128)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  xc, yc = x64 - x64.mean(0), y64 - y64.mean(0)
  cka = np.sum((xc.T @ yc) ** 2) / np.linalg.norm(xc.T @ xc) / np.linalg.norm(yc.T @ yc)
  assert st.linear_cka_from_stats(s) == pytest.approx(cka, abs=1e-7)
  assert st.debiased_cka_from_stats(s) == pytest.approx(gram_cka(x, y, True), abs=1e-6)
  assert st.debiased_cka_from_stats(s) == pytest.approx(float(debiased_linear_cka(x, y)), abs=2e-6)
  for anatome in (True, False):
    want = svcca_data_matrix(x, y, anatome=anatome)
    assert st.svcca_from_stats(s, anatome_compat=anatome) == pytest.approx(want, abs=1e-6)


def test_debiased_cka_against_the_n_by_n_form_with_an_offset():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(300, 12)) + 50.0
  y = x[:, :8] @ rng.normal(size=(8, 9)) + rng.normal(size=(300, 9)) - 20.0
  s = st.similarity_stats(x, y, batch_size=64)
  assert st.debiased_cka_from_stats(s) == pytest.approx(gram_cka(x, y, True), abs=1e-6)


@pytest.mark.parametrize("anatome", [True, False])
def test_svcca_from_sums_equals_the_data_matrix_form(anatome):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 3.0
  y = np.tanh(x[:, :10] @ rng.normal(size=(10, 12))) + 0.3 * rng.normal(size=(500, 12))
  s = st.similarity_stats(x, y, batch_size=100)
  want = svcca_data_matrix(x, y, anatome=anatome)
  assert st.svcca_from_stats(s, anatome_compat=anatome) == pytest.approx(want, abs=1e-6)
  got32 = float(svcca_distance(x, y, anatome_compat=anatome))  # the in-memory float32 path
  assert st.svcca_from_stats(s, anatome_compat=anatome) == pytest.approx(got32, abs=1e-5)
  same = st.similarity_stats(x, x, batch_size=100)
  assert st.svcca_from_stats(same, anatome_compat=anatome) == pytest.approx(0.0, abs=1e-6)


# Two orders of float32 summation of the same rows: CKA moves in the 8th digit, SVCCA of the
# ill-conditioned features (singular values over three decades) in the 6th (both are ~2e-6
# from float64 here).
TOLERANCES = [
  (st.linear_cka_from_stats, 2e-7),
  (st.debiased_cka_from_stats, 2e-7),
  (st.svcca_from_stats, 5e-6),
]


def test_weights_equal_dropping_rows_and_batching_does_not_matter():
  x, y = ill_conditioned(1000, seed=1)
  keep = np.random.default_rng(2).random(1000) < 0.4
  sub = st.similarity_stats(x[keep], y[keep], batch_size=50)
  for batch in (64, 1000):
    masked = st.similarity_stats(x, y, batch_size=batch, weights=keep.astype(np.float32))
    for fn, tol in TOLERANCES:
      assert fn(masked) == pytest.approx(fn(sub), abs=tol)
  assert float(masked.sums.count) == keep.sum()


def test_partials_add_up_to_one_set_of_sums():
  """Four partials (four devices' rows) reduced at the end equal one running sum."""
  x, y = ill_conditioned(512, seed=4)
  one = st.similarity_stats(x, y, batch_size=128)
  stats = st.similarity_stats_init(40, 25, partials=4)
  stats = jax.jit(st.with_shift)(stats, x[:128], y[:128])
  update = jax.jit(st.similarity_stats_update)
  for start in range(0, 512, 128):
    stats = update(stats, x[start : start + 128], y[start : start + 128])
  assert stats.sums.xx.shape == (4, 40, 40)
  assert np.asarray(stats.sums.count).tolist() == [128.0] * 4  # 32 rows of each batch each
  four = jax.device_get(st.similarity_stats_total(stats))
  for fn, tol in TOLERANCES:
    assert fn(four) == pytest.approx(fn(one), abs=tol)
  with pytest.raises(ValueError, match="partial axis"):
    st.linear_cka_from_stats(stats)
  with pytest.raises(ValueError, match="does not split over 4 partials"):
    update(stats, x[:6], y[:6])


def test_compensated_sums_do_not_drift_with_the_number_of_batches():
  """After one large row, 20,000 rows of 1e-4 are each below half an ulp of the float32 sum:
  plain addition keeps 10000 and loses all of them, Kahan's summation keeps 10002."""
  stats = st.similarity_stats_init(1, 1)

  def body(_, s):
    return st.similarity_stats_update(s, jnp.full((1, 1), 1e-4), jnp.full((1, 1), 1e-4))

  stats = st.similarity_stats_update(stats, jnp.full((1, 1), 1e4), jnp.ones((1, 1)))
  stats = jax.jit(lambda s: jax.lax.fori_loop(0, 20000, body, s))(stats)
  total = st.similarity_stats_total(stats)
  assert float(total.sums.sum_x[0]) == pytest.approx(10002.0, abs=1e-3)
  assert float(total.sums.count) == 20001.0


def test_degenerate_inputs():
  x, y = golden_xy()
  const = st.similarity_stats(np.ones((50, 3)), y[:50])
  assert st.linear_cka_from_stats(const) == 0.0
  assert st.debiased_cka_from_stats(const) == 0.0
  assert np.isnan(st.svcca_from_stats(const))
  three = st.similarity_stats(x[:3], y[:3])
  assert np.isnan(st.debiased_cka_from_stats(three))
  with pytest.raises(ValueError, match="threshold must be in"):
    st.svcca_from_stats(st.similarity_stats(x, y), threshold=0.0)
  with pytest.raises(ValueError, match="100 rows and features_y 99"):
    st.similarity_stats(x, y[:99])
  with pytest.raises(ValueError, match="partials must be at least 1, got 0"):
    st.similarity_stats_init(3, 3, partials=0)


def test_in_memory_linear_cka_agrees():
  x, y = ill_conditioned(2000, seed=7)
  s = st.similarity_stats(x, y, batch_size=256)
  assert st.linear_cka_from_stats(s) == pytest.approx(float(linear_cka(x, y)), abs=2e-6)
