"""The feature-distillation losses (prunebias_jax.train.distill) against independent float64
NumPy versions written from the published definitions as RepDistiller (Tian et al.) implements
them, which the Simon Says study used: SP (`Similarity`), AT (`Attention`), PKT
(`PKT.cosine_similarity_loss`), feature hints (MSE per layer), and CRD (`CRDLoss`,
`ContrastMemory`, `ContrastLoss`, `Embed`, and the 'exact' negative sampling of
`CIFAR100InstanceSample`). Our feature maps are NHWC, so "the channel axis" is the last one."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunebias_jax.train import distill

EPS = 1e-7  # RepDistiller's eps (PKT, ContrastLoss)


# ------------------------------------------------------------- NumPy (float64) references
def np_normalize(x):
  """torch.nn.functional.normalize(x, p=2, dim=1): x / max(||x||, 1e-12), row-wise."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.sqrt((x**2).sum(axis=1, keepdims=True)), 1e-12)


def ref_sp(f_s, f_t):
  """RepDistiller Similarity.similarity_loss."""
  bsz = f_s.shape[0]
  f_s = np.asarray(f_s, np.float64).reshape(bsz, -1)
  f_t = np.asarray(f_t, np.float64).reshape(bsz, -1)
  g_s = np_normalize(f_s @ f_s.T)
  g_t = np_normalize(f_t @ f_t.T)
  diff = g_t - g_s
  return (diff * diff).sum() / (bsz * bsz)


def ref_at_map(f, p=2.0):
  """RepDistiller Attention.at, for an NHWC map: the mean over channels is over axis -1."""
  f = np.asarray(f, np.float64)
  nchw = np.transpose(f, (0, 3, 1, 2))  # written the torch way, on the NCHW layout
  return np_normalize((nchw**p).mean(axis=1).reshape(f.shape[0], -1))


def ref_at(f_s, f_t, p=2.0):
  return ((ref_at_map(f_s, p) - ref_at_map(f_t, p)) ** 2).mean()


def ref_pkt(output_net, target_net, eps=EPS):
  """RepDistiller PKT.cosine_similarity_loss."""
  out = np.asarray(output_net, np.float64)
  tgt = np.asarray(target_net, np.float64)
  out = out / (np.sqrt((out**2).sum(axis=1, keepdims=True)) + eps)
  out[out != out] = 0
  tgt = tgt / (np.sqrt((tgt**2).sum(axis=1, keepdims=True)) + eps)
  tgt[tgt != tgt] = 0
  model_sim = (out @ out.T + 1.0) / 2.0
  target_sim = (tgt @ tgt.T + 1.0) / 2.0
  model_sim = model_sim / model_sim.sum(axis=1, keepdims=True)
  target_sim = target_sim / target_sim.sum(axis=1, keepdims=True)
  return np.mean(target_sim * np.log((target_sim + eps) / (model_sim + eps)))


def ref_hints(list_s, list_t):
  """Sum over layers of nn.MSELoss()(f_s, f_t)."""
  total = 0.0
  for s, t in zip(list_s, list_t):
    total += np.mean((np.asarray(s, np.float64) - np.asarray(t, np.float64)) ** 2)
  return total


def ref_embed(kernel, bias, x):
  """RepDistiller Embed: view(b, -1), nn.Linear, Normalize(2) (no floor)."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  v = x @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
  return v / np.power((v**2).sum(axis=1, keepdims=True), 0.5)


def ref_nce(x, n_data, eps=EPS):
  """RepDistiller ContrastLoss."""
  x = np.asarray(x, np.float64)
  bsz = x.shape[0]
  m = x.shape[1] - 1
  pn = 1.0 / float(n_data)
  p_pos = x[:, 0]
  log_d1 = np.log(p_pos / (p_pos + m * pn + eps))
  p_neg = x[:, 1:]
  log_d0 = np.log(np.full_like(p_neg, m * pn) / (p_neg + m * pn + eps))
  return -(log_d1.sum() + log_d0.sum()) / bsz


def ref_crd(heads, memory_v1, memory_v2, z_v1, z_v2, f_s, f_t, y, contrast_idx, t, momentum):
  """RepDistiller CRDLoss.forward with ContrastMemory.forward (v1 = the student's embedding,
  memory_v1 the student's bank; v2 and memory_v2 the teacher's). Returns the loss, the two
  updated banks and the two normalising constants."""
  v1 = ref_embed(heads["student"]["kernel"], heads["student"]["bias"], f_s)
  v2 = ref_embed(heads["teacher"]["kernel"], heads["teacher"]["bias"], f_t)
  memory_v1 = np.array(memory_v1, np.float64)
  memory_v2 = np.array(memory_v2, np.float64)
  output_size, input_size = memory_v1.shape
  idx = np.asarray(contrast_idx)
  batch, k1 = idx.shape
  weight_v1 = memory_v1[idx.reshape(-1)].reshape(batch, k1, input_size)
  out_v2 = np.exp(np.matmul(weight_v1, v2[:, :, None])[:, :, 0] / t)
  weight_v2 = memory_v2[idx.reshape(-1)].reshape(batch, k1, input_size)
  out_v1 = np.exp(np.matmul(weight_v2, v1[:, :, None])[:, :, 0] / t)
  if z_v1 < 0:
    z_v1 = out_v1.mean() * output_size
  if z_v2 < 0:
    z_v2 = out_v2.mean() * output_size
  out_v1 = out_v1 / z_v1
  out_v2 = out_v2 / z_v2
  loss = ref_nce(out_v1, output_size) + ref_nce(out_v2, output_size)
  y = np.asarray(y)
  l_pos = memory_v1[y] * momentum + v1 * (1 - momentum)
  memory_v1[y] = l_pos / np.power((l_pos**2).sum(axis=1, keepdims=True), 0.5)
  ab_pos = memory_v2[y] * momentum + v2 * (1 - momentum)
  memory_v2[y] = ab_pos / np.power((ab_pos**2).sum(axis=1, keepdims=True), 0.5)
  return loss, memory_v1, memory_v2, z_v1, z_v2


def central_difference(f, x, h=1e-6):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    g[i] = (f(up) - f(down)) / (2 * h)
  return g


def chi2_quantile(df, z=4.753):
  """The chi-square quantile of df degrees of freedom at the normal quantile z (4.753: the
  1 − 1e-6 point), by the Wilson–Hilferty approximation (≤ 2% above the exact value for
  df = 10..30)."""
  return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# The module's functions, jitted as the training step runs them, each test reusing a few
# shapes: one compilation per shape rather than one per primitive keeps the file fast on CPU.
SP = jax.jit(distill.similarity_preserving)
AT = jax.jit(
  lambda s, t, p: (
    distill.attention_map(s, p),
    distill.attention_map(t, p),
    distill.attention_transfer(s, t, p),
  ),
  static_argnums=2,
)
PKT = jax.jit(distill.probabilistic_kt)
HINTS = jax.jit(distill.feature_hints)
SAMPLE = jax.jit(distill.sample_negatives, static_argnums=3)
CRD = jax.jit(distill.crd)  # temperature and momentum traced: one program for every case


def _pair(shape_s, shape_t=None, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape_s).astype(np.float32)
  t = rng.normal(size=shape_t or shape_s).astype(np.float32)
  return s, t


# ------------------------------------------------------------------------- parse_method
@pytest.mark.parametrize(
  "name, expected",
  [
    ("ce", (None, False)),
    ("kd", (None, True)),
    ("sp", ("sp", False)),
    ("at", ("at", False)),
    ("pkt", ("pkt", False)),
    ("crd", ("crd", False)),
    ("hint", ("hint", False)),
    ("sp+kd", ("sp", True)),
    ("at+kd", ("at", True)),
    ("pkt+kd", ("pkt", True)),
    ("crd+kd", ("crd", True)),
    ("hint+kd", ("hint", True)),
  ],
)
def test_parse_method(name, expected):
  assert distill.parse_method(name) == expected


def test_parse_method_names_are_exactly_these():
  assert set(distill.METHODS) == {
    "ce",
    "kd",
    *("sp", "at", "pkt", "crd", "hint"),
    *("sp+kd", "at+kd", "pkt+kd", "crd+kd", "hint+kd"),
  }


@pytest.mark.parametrize("bad", ["", "SP", "ce+kd", "kd+kd", "kd+sp", "sp+", "sp+kd+kd", "fitnet"])
def test_parse_method_rejects_bad_names(bad):
  with pytest.raises(ValueError, match="distill.method"):
    distill.parse_method(bad)


# ----------------------------------------------------------------------------------- SP
SP_SHAPE = (5, 3, 3, 4)


@pytest.mark.parametrize(
  "shape_s, shape_t", [(SP_SHAPE, SP_SHAPE), ((6, 2, 4, 3), (6, 2, 2, 5)), ((4, 7), (4, 7))]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_sp_matches_numpy(shape_s, shape_t, seed):
  s, t = _pair(shape_s, shape_t, seed)
  got = float(SP(_f32(s), _f32(t)))
  np.testing.assert_allclose(got, ref_sp(s, t), rtol=1e-5, atol=1e-9)
  assert got > 0


def test_sp_hand_computed_two_examples():
  # G_s = I (rows already unit);  G_t = [[1, 1], [1, 1]] → rows (1, 1)/√2.
  # ‖G_t − G_s‖² = 2(1 − 1/√2)² + 2(1/√2)² = 4 − 2√2;  / b² = 1 − √2/2.
  s = np.array([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
  t = np.array([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
  np.testing.assert_allclose(float(SP(_f32(s), _f32(t))), 1 - 0.5**0.5, rtol=1e-6)
  np.testing.assert_allclose(ref_sp(s, t), 1 - 0.5**0.5, rtol=1e-12)


def test_sp_zero_for_identical_and_for_rescaled_teacher():
  s, _ = _pair(SP_SHAPE, seed=2)
  assert abs(float(SP(_f32(s), _f32(s)))) < 1e-7
  # Each Gram row is normalised, so a global rescaling of one model changes nothing.
  assert abs(float(SP(_f32(s), _f32(3.0 * s)))) < 1e-7


def test_sp_tiny_features_still_normalised():
  # Gram entries ~1e-9 (features ~1e-5) are far above the 1e-12 floor: SP is scale-free there.
  s, t = _pair(SP_SHAPE, seed=4)
  np.testing.assert_allclose(float(SP(_f32(1e-5 * s), _f32(t))), ref_sp(s, t), rtol=1e-4)


def test_sp_zero_example_uses_norm_floor():
  # An all-zero example gives a zero Gram row: normalize divides by 1e-12, no NaN.
  s, t = _pair(SP_SHAPE, seed=3)
  s[1] = 0.0
  got = float(SP(_f32(s), _f32(t)))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, ref_sp(s, t), rtol=1e-5)


# ----------------------------------------------------------------------------------- AT
AT_SHAPE = (4, 4, 4, 3)


@pytest.mark.parametrize(
  "shape, p",
  [
    ((5, 2, 3, 4), 2.0),
    (AT_SHAPE, 2.0),
    ((6, 3, 2, 6), 2.0),
    ((5, 2, 3, 4), 1.0),
    ((5, 2, 3, 4), 3.0),
  ],
)
def test_at_matches_numpy(shape, p):
  s, t = _pair(shape, seed=int(p))  # normal values: negative entries included
  a_s, a_t, loss = AT(_f32(s), _f32(t), p)
  assert a_s.shape == (shape[0], shape[1] * shape[2])
  np.testing.assert_allclose(np.asarray(a_s), ref_at_map(s, p), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(a_t), ref_at_map(t, p), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(loss), ref_at(s, t, p), rtol=1e-5, atol=1e-9)


def test_at_default_p_is_two():
  for fn in (distill.attention_map, distill.attention_transfer):
    assert inspect.signature(fn).parameters["p"].default == 2.0


def test_at_hand_computed_two_examples_channel_last():
  # b = 2, h = 1, w = 2, c = 2. Example 0: student channel vectors (1, 1) and (0, 0) at the
  # two positions → a_s = (1, 0); teacher (0, 0) and (2, 0) → a_t = (0, 1) (a mean over a
  # wrong axis would mix the positions). Example 1 is the same map in both.
  # L = mean of (1, 1, 0, 0) = 0.5.
  s = np.array([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
  t = np.array([[[[0.0, 0.0], [2.0, 0.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
  assert s.shape == (2, 1, 2, 2)
  a_s, a_t, loss = AT(_f32(s), _f32(t), 2.0)
  np.testing.assert_allclose(np.asarray(a_s)[0], [1.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(np.asarray(a_t)[0], [0.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(np.asarray(a_s)[1], np.array([2.5, 12.5]) / np.hypot(2.5, 12.5))
  np.testing.assert_allclose(float(loss), 0.5, rtol=1e-6)
  np.testing.assert_allclose(ref_at(s, t), 0.5, rtol=1e-12)


def test_at_zero_for_identical_and_exact_for_zero_student():
  s, t = _pair(AT_SHAPE, seed=5)
  assert abs(float(AT(_f32(s), _f32(s), 2.0)[2])) < 1e-7
  # A zero map is normalised by the 1e-12 floor to a zero map; every teacher row has unit
  # norm, so L = mean(a_t²) = 1/(h·w).
  a_zero, _, loss = AT(_f32(np.zeros_like(s)), _f32(t), 2.0)
  np.testing.assert_array_equal(np.asarray(a_zero), 0.0)
  np.testing.assert_allclose(float(loss), 1 / 16, rtol=1e-6)


def test_at_tiny_maps_still_normalised_floor_is_torch_1e_12():
  # Values ~1e-5: the rows of mean_c f² have norms ~1e-10, far above torch's 1e-12 floor, so
  # the map is the unit-row map of the unscaled features (a larger floor would shrink it).
  s, t = _pair(AT_SHAPE, seed=6)
  a_tiny, a_t, loss = AT(_f32(1e-5 * s), _f32(t), 2.0)
  np.testing.assert_allclose(np.asarray(a_tiny), ref_at_map(s), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(a_tiny), ref_at_map(1e-5 * s.astype(np.float64)), 1e-4)
  np.testing.assert_allclose(float(loss), ref_at(s, t), rtol=1e-4)


# ---------------------------------------------------------------------------------- PKT
@pytest.mark.parametrize("b, d", [(4, 3), (6, 5), (8, 6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pkt_matches_numpy(b, d, seed):
  s, t = _pair((b, d), seed=seed)
  got = float(PKT(_f32(s), _f32(t)))
  np.testing.assert_allclose(got, ref_pkt(s, t), rtol=1e-5, atol=1e-9)
  assert got > 0


def test_pkt_matches_numpy_on_relu_features():
  # Pooled ReLU features are non-negative, where the similarities are all in [0.5, 1].
  s, t = _pair((6, 5), seed=9)
  s, t = np.abs(s), np.abs(t)
  # float32's floor, not a looser check: the loss (~5e-4 here) is a mean of t·log(t/m) terms of
  # ~0.17 whose logs nearly cancel, so float32 rounding leaves ~1e-8 absolute. Measured over 40
  # seeds on jax 0.12.1: at most 1.02e-8 (2.2e-9 median), and 3 of 40 seeds above rtol 1e-5
  # alone (this one, 1.1e-5: it failed there with atol 1e-10). The KL taken the other way round
  # moves it by 1.2e-5.
  np.testing.assert_allclose(float(PKT(_f32(s), _f32(t))), ref_pkt(s, t), rtol=1e-5, atol=2e-8)


def test_pkt_zero_for_identical_and_near_zero_for_rescaled():
  s, _ = _pair((6, 5), seed=2)
  assert abs(float(PKT(_f32(s), _f32(s)))) < 1e-7
  assert abs(float(PKT(_f32(s), _f32(2.0 * s)))) < 1e-7


# -------------------------------------------------------------------------------- hints
def test_hints_match_numpy():
  rng = np.random.default_rng(4)
  shapes = [(4, 4, 4, 3), (4, 2, 2, 5), (4, 6)]
  s = [rng.normal(size=sh).astype(np.float32) for sh in shapes]
  t = [rng.normal(size=sh).astype(np.float32) for sh in shapes]
  got = float(HINTS([_f32(x) for x in s], [_f32(x) for x in t]))
  np.testing.assert_allclose(got, ref_hints(s, t), rtol=1e-5)
  assert float(HINTS([_f32(x) for x in s], [_f32(x) for x in s])) == 0.0


def test_hints_hand_computed():
  # Layer 1: every difference 1 → MSE 1. Layer 2: differences (2, 0, 0, 0) → MSE 1. Sum 2.
  s = [jnp.zeros((2, 1, 1, 3)), jnp.asarray([[2.0, 0.0], [0.0, 0.0]])]
  t = [jnp.ones((2, 1, 1, 3)), jnp.zeros((2, 2))]
  np.testing.assert_allclose(float(HINTS(s, t)), 2.0, rtol=1e-7)


# --------------------------------------------------------------------- feature_loss / names
def test_feature_loss_dispatch_and_stage_order():
  rng = np.random.default_rng(11)
  shapes = {
    "stage1": (4, 4, 4, 3),
    "stage2": (4, 2, 2, 5),
    "stage10": (4, 2, 2, 6),
    "features": (4, 6),
    "stem": (4, 4, 4, 3),
  }
  s = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
  t = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
  assert distill.stage_names(s) == ["stage1", "stage2", "stage10"]
  js = {k: _f32(v) for k, v in s.items()}
  jt = {k: _f32(v) for k, v in t.items()}
  stages = ["stage1", "stage2", "stage10"]
  expected = {
    "sp": ref_sp(s["stage10"], t["stage10"]),
    "at": sum(ref_at(s[n], t[n]) for n in stages),
    "pkt": ref_pkt(s["features"], t["features"]),
    "hint": ref_hints([s[n] for n in stages], [t[n] for n in stages]),
  }
  all_losses = jax.jit(lambda s, t: {m: distill.feature_loss(m, s, t) for m in expected})
  got = all_losses(js, jt)
  for method, value in expected.items():
    np.testing.assert_allclose(float(got[method]), value, rtol=1e-5, err_msg=method)
  with pytest.raises(ValueError):
    distill.feature_loss("crd", js, jt)


# ---------------------------------------------------------------------------------- CRD
OPT = optax.sgd(0.05, momentum=0.9)
# 30 training examples of classes 0..2 (8, 10 and 12 of them, shuffled); class 3 is empty.
LABELS = np.random.default_rng(123).permutation(np.repeat([0, 1, 2], [8, 10, 12]))
N = len(LABELS)
D_S, D_T, FEAT = 5, 6, 4


@functools.cache
def _state():
  """init_crd for LABELS (4 classes, one of them empty), made once (its fields are arrays)."""
  init = jax.jit(lambda key: distill.init_crd(key, LABELS, 4, D_S, D_T, FEAT, OPT))
  return init(jax.random.key(0, impl="rbg"))  # any key type; rbg compiles faster on CPU


def test_init_crd_banks_heads_and_class_index():
  state = _state()
  stdv = 1.0 / np.sqrt(FEAT / 3.0)
  for bank in (state.memory_student, state.memory_teacher):
    bank = np.asarray(bank)
    assert bank.shape == (N, FEAT) and bank.dtype == np.float32
    assert np.all(np.abs(bank) <= stdv)
    assert np.abs(bank).max() > 0.8 * stdv  # spread over the interval, not a narrower one
    assert abs(bank.mean()) < 0.2 * stdv
  assert not np.allclose(state.memory_student, state.memory_teacher)
  assert float(state.z_student) == -1.0 and float(state.z_teacher) == -1.0
  for name, d_in in (("student", D_S), ("teacher", D_T)):
    head = state.params[name]
    assert head["kernel"].shape == (d_in, FEAT) and head["bias"].shape == (FEAT,)
    bound = 1.0 / np.sqrt(d_in)
    assert np.all(np.abs(np.asarray(head["kernel"])) <= bound)
    assert np.all(np.abs(np.asarray(head["bias"])) <= bound)
  order = np.asarray(state.order)
  np.testing.assert_array_equal(order, np.argsort(LABELS, kind="stable"))
  np.testing.assert_array_equal(np.sort(order), np.arange(N))
  assert np.all(np.diff(LABELS[order]) >= 0)
  np.testing.assert_array_equal(np.asarray(state.class_count), [8, 10, 12, 0])
  np.testing.assert_array_equal(np.asarray(state.class_start), [0, 8, 18, 30])
  for c in range(3):
    start, count = int(state.class_start[c]), int(state.class_count[c])
    block = order[start : start + count]
    assert np.all(LABELS[block] == c) and np.all(np.diff(block) > 0)
  # The optimizer state is the optimizer's own for these heads.
  ref = OPT.init(state.params)
  assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(ref)


def test_embed_matches_numpy():
  state = _state()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, D_S)).astype(np.float32)
  head = state.params["student"]
  # A (b, 1, 1, d) map flattens to (b, d).
  both = jax.jit(lambda h, x: (distill.embed(h, x), distill.embed(h, x.reshape(5, 1, 1, D_S))))
  v, v4 = map(np.asarray, both(head, _f32(x)))
  np.testing.assert_allclose(v, ref_embed(head["kernel"], head["bias"], x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(v4, v, rtol=1e-6)


# Every training example 25 times in a batch, K = 16 negatives each (K ≤ 18, the fewest
# other-class examples): 400·n_y draws over the n − n_y examples of other classes for class y.
BATCH_LABELS = np.tile(LABELS, 25)
K = 16


def _negatives(seed):
  return np.asarray(SAMPLE(jax.random.PRNGKey(seed), _state(), jnp.asarray(BATCH_LABELS), K))


def test_sample_negatives_from_other_classes_and_uniform():
  neg = _negatives(0)
  assert neg.shape == (len(BATCH_LABELS), K)
  assert neg.min() >= 0 and neg.max() < N
  assert np.all(LABELS[neg] != BATCH_LABELS[:, None])
  for c, n_c in zip(range(3), (8, 10, 12)):
    draws = neg[BATCH_LABELS == c].ravel()
    counts = np.bincount(draws, minlength=N)
    assert np.all(counts[LABELS == c] == 0)
    other = counts[LABELS != c]
    assert len(other) == N - n_c and other.min() > 0  # every other-class example is drawn
    expected = draws.size / (N - n_c)
    chi2 = ((other - expected) ** 2 / expected).sum()
    assert chi2 < chi2_quantile(N - n_c - 1), (c, chi2)
  # A different key draws differently; the same key the same.
  np.testing.assert_array_equal(_negatives(0), neg)
  assert not np.array_equal(_negatives(1), neg)


def test_sample_negatives_without_replacement_when_enough():
  # K = 16 ≤ 18 (the fewest other-class examples): RepDistiller never repeats an index in a row.
  neg = _negatives(3)
  for row in neg:
    assert len(set(row.tolist())) == len(row)


def test_nce_loss_matches_numpy_and_hand_case():
  rng = np.random.default_rng(6)
  x = rng.uniform(1e-4, 0.2, size=(4, 6)).astype(np.float32)
  # b = 1, m = 1, n = 2 (m·P_n = 1/2), x = (1/2, 1/2): −2·log((1/2)/(1 + ε)) = 2·log 2 + O(ε).
  half = jnp.asarray([[0.5, 0.5]])
  both = jax.jit(lambda x, h: (distill.nce_loss(x, 50), distill.nce_loss(h, 2)))
  got, got_half = both(_f32(x), half)
  np.testing.assert_allclose(float(got), ref_nce(x, 50), rtol=1e-5)
  np.testing.assert_allclose(float(got_half), 2 * np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(ref_nce(np.array([[0.5, 0.5]]), 2), 2 * np.log(2.0), rtol=1e-6)


def _crd_case(seed=0, b=4, k=5):
  """A state whose banks hold known (seeded, unit-row) contents, its heads, a batch of b
  distinct training indices, their negatives, and student/teacher features."""
  rng = np.random.default_rng(seed)
  state = _state()
  mem_s = rng.normal(size=(N, FEAT))
  mem_t = rng.uniform(-1, 1, size=(N, FEAT))
  mem_s = (mem_s / np.linalg.norm(mem_s, axis=1, keepdims=True)).astype(np.float32)
  mem_t = (mem_t / np.linalg.norm(mem_t, axis=1, keepdims=True)).astype(np.float32)
  state = state.replace(memory_student=_f32(mem_s), memory_teacher=_f32(mem_t))
  heads = {
    name: {
      "kernel": _f32(rng.normal(size=(d, FEAT)) / np.sqrt(d)),
      "bias": _f32(rng.normal(size=FEAT) * 0.1),
    }
    for name, d in (("student", D_S), ("teacher", D_T))
  }
  indices = rng.choice(N, size=b, replace=False)
  negatives = np.stack([rng.choice(np.flatnonzero(LABELS != LABELS[i]), k) for i in indices])
  f_s = rng.normal(size=(b, D_S)).astype(np.float32)
  f_t = rng.normal(size=(b, D_T)).astype(np.float32)
  return state, heads, indices, negatives, f_s, f_t


def _np_heads(heads):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), heads)


@pytest.mark.parametrize("temperature, momentum", [(0.07, 0.5), (0.5, 0.9)])
@pytest.mark.parametrize("given_z", [False, True])
def test_crd_matches_numpy(given_z, temperature, momentum):
  state, heads, indices, negatives, f_s, f_t = _crd_case(int(given_z) + int(10 * momentum))
  if given_z:  # a later step: the constants the first step fixed (any positive values)
    state = dataclasses.replace(state, z_student=jnp.float32(2.5), z_teacher=jnp.float32(40.0))
  loss, banks = CRD(
    heads,
    state,
    _f32(f_s),
    _f32(f_t),
    jnp.asarray(indices),
    jnp.asarray(negatives),
    temperature,
    momentum,
  )
  exp = ref_crd(
    _np_heads(heads),
    state.memory_student,
    state.memory_teacher,
    float(state.z_student),
    float(state.z_teacher),
    f_s,
    f_t,
    indices,
    np.concatenate([indices[:, None], negatives], axis=1),
    temperature,
    momentum,
  )
  ref_loss, ref_mem_s, ref_mem_t, ref_z_s, ref_z_t = exp
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(banks["z_student"]), ref_z_s, rtol=1e-5)
  np.testing.assert_allclose(float(banks["z_teacher"]), ref_z_t, rtol=1e-5)
  if given_z:
    assert float(banks["z_student"]) == 2.5 and float(banks["z_teacher"]) == 40.0
  else:
    assert ref_z_s > 0 and ref_z_t > 0
  others = np.setdiff1d(np.arange(N), indices)
  for key, ref_bank, old in (
    ("memory_student", ref_mem_s, state.memory_student),
    ("memory_teacher", ref_mem_t, state.memory_teacher),
  ):
    new = np.asarray(banks[key])
    assert new.shape == (N, FEAT) and new.dtype == np.float32
    np.testing.assert_allclose(new[indices], ref_bank[indices], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(new[indices], axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(new[indices], np.asarray(old)[indices])
    np.testing.assert_array_equal(new[others], np.asarray(old)[others])  # untouched rows


def test_crd_first_step_z_has_no_gradient():
  # Z is a constant (RepDistiller stores Z.item()): the gradient at the first step (Z computed
  # from this batch) equals the gradient with that Z given, for the heads and the student.
  state, heads, indices, negatives, f_s, f_t = _crd_case(5)
  args = (jnp.asarray(indices), jnp.asarray(negatives))

  def loss_fn(h, st, fs):
    return distill.crd(h, st, fs, _f32(f_t), *args, 0.07, 0.5)[0]

  _, banks = CRD(heads, state, _f32(f_s), _f32(f_t), *args, 0.07, 0.5)
  fixed = state.replace(z_student=banks["z_student"], z_teacher=banks["z_teacher"])
  grad = jax.jit(jax.grad(loss_fn, argnums=(0, 2)))
  g_first = grad(heads, state, _f32(f_s))
  g_fixed = grad(heads, fixed, _f32(f_s))
  for a, b in zip(jax.tree_util.tree_leaves(g_first), jax.tree_util.tree_leaves(g_fixed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- gradients
@functools.cache
def _loss_fns():
  """Each loss as f(student, teacher), the shapes it is checked on, and its jitted gradient
  with respect to both (CRD at a later step: Z given)."""
  state, heads, indices, negatives, _, _ = _crd_case(7)
  state = state.replace(z_student=jnp.float32(3.0), z_teacher=jnp.float32(5.0))
  crd_fn = lambda s, t: distill.crd(
    heads, state, s, t, jnp.asarray(indices), jnp.asarray(negatives), 0.07, 0.5
  )[0]
  fns = {
    "sp": (distill.similarity_preserving, (4, 2, 3, 4), (4, 2, 3, 5)),
    "at": (distill.attention_transfer, (4, 3, 2, 4), (4, 3, 2, 6)),
    "pkt": (distill.probabilistic_kt, (6, 5), (6, 4)),
    "hint": (lambda s, t: distill.feature_hints([s], [t]), (4, 2, 2, 3), (4, 2, 2, 3)),
    "crd": (crd_fn, (4, D_S), (4, D_T)),
  }
  return {k: (jax.jit(jax.grad(f, argnums=(0, 1))), s, t) for k, (f, s, t) in fns.items()}


@pytest.mark.parametrize("name", ["sp", "at", "pkt", "hint", "crd"])
def test_gradient_wrt_student_is_finite(name):
  grad, shape_s, shape_t = _loss_fns()[name]
  s, t = _pair(shape_s, shape_t, seed=8)
  g_s, g_t = map(np.asarray, grad(_f32(s), _f32(t)))
  assert g_s.shape == shape_s
  assert np.all(np.isfinite(g_s)) and np.abs(g_s).max() > 0
  assert np.all(np.isfinite(g_t))
  if name in ("pkt", "crd"):  # the teacher side is stop_gradient'ed (no_grad in RepDistiller)
    np.testing.assert_array_equal(g_t, 0.0)


def _crd_ref():
  state, heads, indices, negatives, _, _ = _crd_case(7)
  idx = np.concatenate([indices[:, None], negatives], axis=1)
  np_heads = _np_heads(heads)
  mem_s, mem_t = np.asarray(state.memory_student), np.asarray(state.memory_teacher)
  return lambda s, t: ref_crd(np_heads, mem_s, mem_t, 3.0, 5.0, s, t, indices, idx, 0.07, 0.5)[0]


@pytest.mark.parametrize("name", ["sp", "at", "pkt", "hint", "crd"])
def test_gradient_matches_finite_difference_of_numpy_reference(name):
  grad, shape_s, shape_t = _loss_fns()[name]
  ref = {
    "sp": ref_sp,
    "at": ref_at,
    "pkt": ref_pkt,
    "hint": lambda s, t: ref_hints([s], [t]),
    "crd": _crd_ref(),
  }[name]
  s, t = _pair(shape_s, shape_t, seed=12)
  g = np.asarray(grad(_f32(s), _f32(t))[0], np.float64)
  t64 = t.astype(np.float64)
  fd = central_difference(lambda x: ref(x, t64), s.astype(np.float64))
  scale = np.abs(fd).max()
  assert scale > 0
  np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-4 * scale)


@pytest.mark.parametrize("name", ["sp", "at"])
def test_gradient_finite_with_an_all_zero_student_example(name):
  grad, shape_s, shape_t = _loss_fns()[name]
  s, t = _pair(shape_s, shape_t, seed=13)
  s[0] = 0.0  # e.g. a dead (all-ReLU-zero) stage output of one example in a pruned net
  g = np.asarray(grad(_f32(s), _f32(t))[0])
  assert np.all(np.isfinite(g))
  if name == "at":  # ∂(f²)/∂f = 2f = 0 on the zero example (torch gives exactly 0 there)
    np.testing.assert_array_equal(g[0], 0.0)
