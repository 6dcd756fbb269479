"""Feature distillation of the Simon Says study: SP, AT, PKT, CRD and feature hints.

A fine-tuning method (`distill.method`) is a name of METHODS; the loss of a step is

    ce                         CE(y, s)
    kd                         (1−α)·CE + α·T²·KL(t_T ‖ s_T)          (train.losses)
    <f>      (f a feature method)  γ·CE + β_f·F_f(student, teacher)
    <f>+kd                     γ·CE + α'·T²·KL(t_T ‖ s_T) + β_f·F_f

with γ = distill.ce_weight, α' = distill.kl_weight and β_f = distill.weights.<f> (the authors'
RepDistiller settings by default). Every F_f reads the stage outputs the models sow
('stage1', ..., and the pooled penultimate 'features'); the teacher runs in inference mode on
the same augmented batch. The losses are pure `jnp` and take the *global* batch: inside the
jitted data-parallel step GSPMD computes the batch statistics (the B×B similarity matrices of
SP and PKT, CRD's normalising constant) over every device, so N devices give the numbers of
one. The papers define them per (single-GPU) batch; with one device that is the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunebias_jax.choices import DISTILL_METHODS as METHODS

PyTree = Any
EPS = 1e-7  # RepDistiller's eps in PKT and in CRD's NCE loss
NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


def parse_method(name: str) -> tuple[str | None, bool]:
  """'sp+kd' → ('sp', True); 'kd' → (None, True); 'ce' → (None, False)."""
  if name not in METHODS:
    raise ValueError(f"distill.method {name!r}; allowed: {', '.join(METHODS)}")
  feature = name.removesuffix("+kd")
  return (None if feature in ("ce", "kd") else feature), name == "kd" or name.endswith("+kd")


def _row_norm(x: jax.Array) -> jax.Array:
  """‖row‖₂ (keepdims) with gradient 0 at a zero row, as PyTorch's norm backward: the plain
  √ would give NaN there, and a ReLU feature map of a pruned student can be all zero."""
  squares = jnp.sum(x * x, axis=-1, keepdims=True)
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Rows divided by max(‖row‖₂, 1e-12), as torch.nn.functional.normalize."""
  return x / jnp.maximum(_row_norm(x), NORM_EPS)


def stage_names(layers: Mapping[str, Any]) -> list[str]:
  """The sown stage outputs in depth order ('stage1', 'stage2', ...; not 'features')."""
  stages = [n for n in layers if n.startswith("stage") and n[5:].isdigit()]
  return sorted(stages, key=lambda n: int(n[5:]))


def similarity_preserving(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """SP (Tung & Mori, ICCV 2019), on one layer's outputs of a batch of b examples:

  G = normalize_rows(F Fᵀ),  F the (b, ·) flattened outputs;   L = ‖G_t − G_s‖²_F / b².
  """
  b = student.shape[0]

  def gram(f):
    f = f.reshape(b, -1).astype(jnp.float32)
    return _l2_normalize(f @ f.T)

  return jnp.sum((gram(teacher) - gram(student)) ** 2) / (b * b)


def attention_map(features: jax.Array, p: float = 2.0) -> jax.Array:
  """a(F) = normalize(mean_c F^p) over the spatial positions: (b, h·w) for NHWC maps."""
  f = features.astype(jnp.float32)
  return _l2_normalize(jnp.mean(f**p, axis=-1).reshape(f.shape[0], -1))


def attention_transfer(student: jax.Array, teacher: jax.Array, p: float = 2.0) -> jax.Array:
  """AT (Zagoruyko & Komodakis, ICLR 2017), one layer: mean over batch and positions of
  (a(F_s) − a(F_t))², a the p-norm attention map (`attention_map`; p = 2 as the authors)."""
  return jnp.mean((attention_map(student, p) - attention_map(teacher, p)) ** 2)


def probabilistic_kt(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """PKT (Passalis & Tefas, ECCV 2018) on (b, d) features, as RepDistiller computes it:

  x̂ = x/(‖x‖+ε);  S = (x̂x̂ᵀ + 1)/2;  P = S/rowsum(S)  (student Q, teacher P);
  L = mean_ij P_ij · log((P_ij + ε)/(Q_ij + ε)),  ε = 1e-7.
  """

  def conditional(x):
    x = x.astype(jnp.float32)
    x = x / (_row_norm(x) + EPS)
    s = (x @ x.T + 1.0) / 2.0
    return s / jnp.sum(s, axis=1, keepdims=True)

  q, p = conditional(student), conditional(jax.lax.stop_gradient(teacher))
  return jnp.mean(p * jnp.log((p + EPS) / (q + EPS)))


def feature_hints(student: list[jax.Array], teacher: list[jax.Array]) -> jax.Array:
  """Feature hints ("AllHint" of the authors' notebooks): Σ over layers of the mean squared
  difference of the student's and the teacher's outputs (same architecture: no regressor)."""
  return sum(
    jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2) for s, t in zip(student, teacher)
  )


# ------------------------------------------------------------------------------------- CRD
@flax.struct.dataclass
class CRDState:
  """The trainable state CRD adds to a fine-tuning stage (Tian et al., ICLR 2020).

  `params`: the two embedding heads {'student', 'teacher'} (linear, then L2 normalisation);
  `opt_state`: their optimizer state (the stage's SGD); `memory_student` / `memory_teacher`:
  the (n, D) memory banks of every training example's embedding; `z_student` / `z_teacher`:
  the NCE normalising constants, −1 until the first step sets them; `order`, `class_start`,
  `class_count`: the training indices sorted by class, where negatives are drawn from.
  """

  params: PyTree
  opt_state: PyTree
  memory_student: jax.Array
  memory_teacher: jax.Array
  z_student: jax.Array
  z_teacher: jax.Array
  order: jax.Array
  class_start: jax.Array
  class_count: jax.Array


def _linear_init(key: jax.Array, d_in: int, d_out: int) -> dict[str, jax.Array]:
  """PyTorch's nn.Linear default: weight and bias uniform in ±1/√d_in."""
  k1, k2 = jax.random.split(key)
  bound = 1.0 / np.sqrt(d_in)
  return {
    "kernel": jax.random.uniform(k1, (d_in, d_out), jnp.float32, -bound, bound),
    "bias": jax.random.uniform(k2, (d_out,), jnp.float32, -bound, bound),
  }


def init_crd(
  key: jax.Array,
  labels: np.ndarray,
  num_classes: int,
  student_dim: int,
  teacher_dim: int,
  feat_dim: int,
  optimizer: optax.GradientTransformation,
) -> CRDState:
  """Fresh heads, memory banks uniform in ±1/√(D/3) (as RepDistiller's ContrastMemory) and
  the class index of the n training `labels` (negatives of an example come from other
  classes: the authors' 'exact' sampling)."""
  n = len(labels)
  k_s, k_t, k_ms, k_mt = jax.random.split(key, 4)
  params = {
    "student": _linear_init(k_s, student_dim, feat_dim),
    "teacher": _linear_init(k_t, teacher_dim, feat_dim),
  }
  stdv = 1.0 / np.sqrt(feat_dim / 3.0)
  bank = lambda k: jax.random.uniform(k, (n, feat_dim), jnp.float32, -stdv, stdv)
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  return CRDState(
    params=params,
    opt_state=optimizer.init(params),
    memory_student=bank(k_ms),
    memory_teacher=bank(k_mt),
    z_student=jnp.float32(-1.0),
    z_teacher=jnp.float32(-1.0),
    order=jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
    class_start=jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32),
    class_count=jnp.asarray(counts, jnp.int32),
  )


def embed(head: Mapping[str, jax.Array], features: jax.Array) -> jax.Array:
  """CRD's embedding: v = normalize(W x + b) (L2, no floor: RepDistiller's Normalize)."""
  v = features.astype(jnp.float32).reshape(features.shape[0], -1) @ head["kernel"] + head["bias"]
  return v / jnp.sqrt(jnp.sum(v**2, axis=1, keepdims=True))


def sample_negatives(key: jax.Array, state: CRDState, labels: jax.Array, k: int) -> jax.Array:
  """(b, k) training indices drawn uniformly from the n − n_y examples of a class other than
  each example's label y, as RepDistiller's 'exact' mode: without replacement when k ≤ n − n_y
  (the k smallest of n − n_y uniform keys: a uniform random k-subset, in random order), with
  replacement otherwise. A position u in [0, n − n_y) skips the block of class y in `order`."""
  n = state.order.shape[0]
  start, count = state.class_start[labels][:, None], state.class_count[labels][:, None]
  others = n - count  # (b, 1)
  k_without, k_with = jax.random.split(key)
  if k <= n:
    keys = jax.random.uniform(k_without, (labels.shape[0], n))
    keys = jnp.where(jnp.arange(n)[None, :] < others, keys, 2.0)  # positions past n − n_y: never
    _, u = jax.lax.top_k(-keys, k)
  else:
    u = jnp.zeros((labels.shape[0], k), jnp.int32)
  repeated = jax.random.randint(k_with, (labels.shape[0], k), 0, others)
  u = jnp.where(k <= others, u, repeated)
  return state.order[jnp.where(u < start, u, u + count)]


def nce_loss(x: jax.Array, n_data: int) -> jax.Array:
  """CRD's NCE loss on (b, 1+k) scores x (column 0 the positive), m = k noise samples of
  probability P_n = 1/n:  −(1/b)·Σ [log(x₀/(x₀+m·P_n+ε)) + Σ_j log(m·P_n/(x_j+m·P_n+ε))]."""
  m = x.shape[1] - 1
  pn = 1.0 / n_data
  log_d1 = jnp.log(x[:, 0] / (x[:, 0] + m * pn + EPS))
  log_d0 = jnp.log((m * pn) / (x[:, 1:] + m * pn + EPS))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def crd(
  heads: Mapping[str, Any],
  state: CRDState,
  student: jax.Array,
  teacher: jax.Array,
  indices: jax.Array,
  negatives: jax.Array,
  temperature: float,
  momentum: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CRD loss of a batch and the memory-bank update (RepDistiller's CRDLoss + ContrastMemory).

  v_s = embed_s(f_s), v_t = embed_t(f_t); with idx = [index, negatives] (b, 1+k):
      out_s = exp(⟨M_t[idx], v_s⟩/τ) / Z_s,   out_t = exp(⟨M_s[idx], v_t⟩/τ) / Z_t,
  Z = mean(exp(·/τ))·n fixed at the first step;  L = NCE(out_s) + NCE(out_t). The banks then
  take M[index] ← normalize(μ·M[index] + (1−μ)·v) (values, not gradients).
  Returns (loss, the updated bank fields of `state`)."""
  n = state.memory_student.shape[0]
  v_s = embed(heads["student"], student)
  v_t = embed(heads["teacher"], jax.lax.stop_gradient(teacher))
  idx = jnp.concatenate([indices[:, None], negatives], axis=1)
  scores = lambda bank, v: jnp.exp(jnp.einsum("bkd,bd->bk", bank[idx], v) / temperature)
  out_s = scores(state.memory_teacher, v_s)
  out_t = scores(state.memory_student, v_t)
  constant = lambda z, out: jnp.where(z < 0, jax.lax.stop_gradient(jnp.mean(out)) * n, z)
  z_s, z_t = constant(state.z_student, out_s), constant(state.z_teacher, out_t)
  loss = nce_loss(out_s / z_s, n) + nce_loss(out_t / z_t, n)

  def update(bank, v):
    pos = bank[indices] * momentum + jax.lax.stop_gradient(v) * (1.0 - momentum)
    return bank.at[indices].set(pos / jnp.sqrt(jnp.sum(pos**2, axis=1, keepdims=True)))

  banks = {
    "memory_student": update(state.memory_student, v_s),
    "memory_teacher": update(state.memory_teacher, v_t),
    "z_student": z_s,
    "z_teacher": z_t,
  }
  return loss, banks


def feature_loss(
  method: str,
  student: Mapping[str, jax.Array],
  teacher: Mapping[str, jax.Array],
) -> jax.Array:
  """F_f of a non-CRD feature method from the sown layers of both models: SP on the last
  stage's output, AT and hints over every stage output, PKT on the pooled 'features'."""
  stages = stage_names(student)
  if method == "sp":
    return similarity_preserving(student[stages[-1]], teacher[stages[-1]])
  if method == "at":
    return sum(attention_transfer(student[n], teacher[n]) for n in stages)
  if method == "pkt":
    return probabilistic_kt(student["features"], teacher["features"])
  if method == "hint":
    return feature_hints([student[n] for n in stages], [teacher[n] for n in stages])
  raise ValueError(f"feature method {method!r}; allowed: sp, at, pkt, hint (crd has state)")
