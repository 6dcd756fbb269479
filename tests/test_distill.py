"""The distillation methods in the pipeline: the train step computes γ·CE [+ α'·T²·KL] + β·F
from the right layers of student and teacher, CRD's state trains and resumes bit-exactly,
4 devices give the losses of 1, every method runs through the CLI with records, tables and
figures grouped by method, and bad settings are one line before any training.

(The loss formulas themselves are checked against NumPy in tests/test_distill_losses.py.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cli import (
  assert_kill_resumes_to_the_same_bytes,
  finished_run,
  one_line_error,
  read_jsonl,
  run_main,
)

from prunebias_jax.config import base_config
from prunebias_jax.models import get_model
from prunebias_jax.provenance import student_identity
from prunebias_jax.train import create_state, distillation_kl, make_train_step
from prunebias_jax.train import distill as d
from prunebias_jax.train.steps import DistillWeights

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.3, 0.2
ALL = d.METHODS
CRD_STAGE = "l1_filter_s0.5_crd_seed0"
ARGS = [
  "--config",
  "configs/default.py",
  "--config.dense.epochs=2",
  "--config.finetune.epochs=1",
  "--config.pruning.methods=('l1_filter',)",
  "--config.pruning.sparsities=(0.5,)",
  f"--config.distill.method={ALL!r}".replace(" ", ""),
  "--config.distill.crd.negatives=64",
  "--config.checkpoint.every_steps=5",
  "--config.monitor.every_steps=1",
  "--config.monitor.test_accuracy=False",
  "--config.analysis.bootstrap_resamples=0",
  "--config.analysis.correlation_resamples=20",
  "--config.analysis.permutations=50",
]


def _run(workdir: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
  return run_main([*ARGS, *extra], workdir, **kwargs)


# ------------------------------------------------------------------------------ the train step
@pytest.fixture(scope="module")
def models():
  model = get_model("small_cnn", 5)
  student = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)), train=False)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
  return model, student, teacher, images, labels


def _by_hand(model, student, teacher, images):
  """Student (train mode) and teacher (inference) logits and sown layers, without the step."""
  x = (images.astype(np.float32) / 255.0 - MEAN) / STD
  s_logits, s_state = model.apply(student, x, train=True, mutable=["batch_stats", "intermediates"])
  t_logits, t_state = model.apply(teacher, x, train=False, mutable=["intermediates"])
  layers = lambda st: {k: v[0] for k, v in st["intermediates"].items()}
  return s_logits, layers(s_state), t_logits, layers(t_state)


@pytest.mark.parametrize("method", ["sp", "at", "pkt", "hint", "sp+kd", "at+kd", "hint+kd"])
def test_step_loss_is_gamma_ce_plus_kl_plus_beta_feature_of_the_right_layers(models, method):
  """The step's loss is γ·CE + [α'·T²·KL] + β·F with F from the layers the method names:
  SP the last stage, AT / hints every stage, PKT the pooled features; the teacher's in
  inference mode on the student's batch."""
  model, student, teacher, images, labels = models
  opt = optax.sgd(0.01)
  w = DistillWeights(ce=0.7, kl=1.3, beta=11.0)
  step = make_train_step(
    model, opt, mean=(MEAN,), std=(STD,), crop_padding=0, flip=False, method=method, weights=w
  )
  state = create_state(student["params"], student["batch_stats"], opt)
  t = 3.0
  _, metrics = step(state, images, labels, jax.random.key(0), teacher, 0.9, jnp.float32(t))
  s_logits, s_layers, t_logits, t_layers = _by_hand(model, student, teacher, images)
  feature = method.removesuffix("+kd")
  last = "stage2"  # small_cnn sows stage1, stage2 and features
  f = {
    "sp": lambda: d.similarity_preserving(s_layers[last], t_layers[last]),
    "at": lambda: sum(d.attention_transfer(s_layers[n], t_layers[n]) for n in ("stage1", last)),
    "pkt": lambda: d.probabilistic_kt(s_layers["features"], t_layers["features"]),
    "hint": lambda: d.feature_hints(
      [s_layers["stage1"], s_layers[last]], [t_layers["stage1"], t_layers[last]]
    ),
  }[feature]()
  ce = optax.softmax_cross_entropy_with_integer_labels(s_logits, labels).mean()
  want = 0.7 * ce + 11.0 * f
  if method.endswith("+kd"):
    kl = 1.3 * t**2 * distillation_kl(s_logits, t_logits, t)
    assert float(metrics["kd_loss"]) == pytest.approx(float(kl), rel=1e-5)
    want += kl
  else:
    assert "kd_loss" not in metrics
  # PKT is a KL of two nearly uniform distributions: float32 rounding of p and q is ~1e-3 of
  # it (jitted here, eager there); the other losses agree to 1e-5.
  rtol = 1e-3 if feature == "pkt" else 1e-5
  assert float(metrics["feature_loss"]) == pytest.approx(11.0 * float(f), rel=rtol)
  assert float(metrics["ce"]) == pytest.approx(float(ce), rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)


def _crd_setup(models, population: int = 1):
  model, student, teacher, images, labels = models
  opt = optax.sgd(0.05, momentum=0.9)
  w = DistillWeights(beta=0.8, crd_negatives=9)
  kw = dict(mean=(MEAN,), std=(STD,), crop_padding=1, flip=True, method="crd+kd", weights=w)
  step = make_train_step(model, opt, population=population, **kw)
  train_labels = np.arange(40) % 5
  crd = [d.init_crd(jax.random.key(k), train_labels, 5, 128, 128, 16, opt) for k in range(3)]
  return model, student, teacher, images, labels, opt, step, crd


def test_crd_step_trains_heads_and_updates_only_the_batch_rows_of_the_banks(models):
  model, student, teacher, images, labels, opt, step, crd = _crd_setup(models)
  state = create_state(student["params"], student["batch_stats"], opt, distill=crd[0])
  before = jax.device_get(state.distill)
  indices = jnp.asarray([1, 4, 9, 16, 25, 36], jnp.int32)
  args = (teacher, jnp.float32(0.9), jnp.float32(4.0), indices)
  state, metrics = step(state, images, labels, jax.random.key(0), *args)
  after = jax.device_get(state.distill)
  rows = np.zeros(40, bool)
  rows[np.asarray(indices)] = True
  for bank in ("memory_student", "memory_teacher"):
    old, new = getattr(before, bank), getattr(after, bank)
    np.testing.assert_array_equal(new[~rows], old[~rows])  # untouched rows stay bit-equal
    assert np.all(np.abs(new[rows] - old[rows]).max(axis=1) > 0)
    np.testing.assert_allclose(np.linalg.norm(new[rows], axis=1), 1.0, rtol=1e-5)
  for head in ("student", "teacher"):  # both heads are trained by the stage's optimizer
    assert not np.allclose(after.params[head]["kernel"], before.params[head]["kernel"])
  assert before.z_student == -1.0 and after.z_student > 0 and after.z_teacher > 0
  assert np.any(jax.device_get(state.distill.opt_state[0].trace["student"]["bias"]))  # momentum
  z = (float(after.z_student), float(after.z_teacher))
  state, _ = step(state, images, labels, jax.random.key(1), *args)
  assert (float(state.distill.z_student), float(state.distill.z_teacher)) == z  # fixed once set
  assert np.isfinite(float(metrics["loss"])) and float(metrics["feature_loss"]) > 0


def test_crd_population_step_is_each_members_own_step(models):
  """population=2: CRD state per member (own heads, banks, Z), one vmapped step."""
  model, student, teacher, images, labels, opt, single, crd = _crd_setup(models)
  pop = _crd_setup(models, population=2)[6]
  states = [
    create_state(student["params"], student["batch_stats"], opt, distill=c) for c in crd[:2]
  ]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  keys = jax.random.split(jax.random.key(3), 2)
  idx = np.array([[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]], np.int32)
  images2 = np.stack([images, images[::-1]])
  labels2 = np.stack([labels, labels[::-1]])
  args = (teacher, jnp.float32(0.9), jnp.float32(4.0))
  got, metrics = pop(stacked, images2, labels2, keys, *args, jnp.asarray(idx))
  for k, s in enumerate(states):
    want, m = single(s, images2[k], labels2[k], keys[k], *args, jnp.asarray(idx[k]))
    np.testing.assert_allclose(metrics["loss"][k], m["loss"], rtol=1e-5)
    jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g[k], w, rtol=1e-4, atol=1e-6),
      (got.params, got.distill),
      (want.params, want.distill),
    )


def test_feature_identity_names_method_and_weights_and_leaves_ce_kd_as_they_were():
  """Checkpoints of CE and KD students keep the identity they had before feature methods
  existed; a feature student's identity changes with its weight, so a rerun with another β
  cannot restore it."""
  cfg = base_config()

  class Data:  # what student_identity reads of a dataset
    num_classes, mean, std = 10, (0.5,), (0.2,)

  kw = dict(
    method="l1_filter",
    sparsity=0.5,
    plan={0: 0.5},
    seed=0,
    population=(0,),
    split_fingerprint="f",
  )
  ce = student_identity(cfg, Data, {"t": 1}, kd=False, temperature=None, **kw)
  assert "distill" not in ce and ce == student_identity(
    cfg, Data, {"t": 1}, kd=False, temperature=None, distill="ce", **kw
  )
  kd = student_identity(cfg, Data, {"t": 1}, kd=True, temperature=4.0, distill="kd", **kw)
  assert "distill" not in kd and kd["kd.alpha"] == 0.9
  sp = student_identity(cfg, Data, {"t": 1}, kd=True, temperature=4.0, distill="sp+kd", **kw)
  assert sp["distill"] == "sp+kd" and sp["distill.weight"] == 3000.0 and sp["kd.alpha"] is None
  cfg.distill.weights.sp = 30.0
  cfg.distill.learning_rate.sp = 0.001
  other = student_identity(cfg, Data, {"t": 1}, kd=True, temperature=4.0, distill="sp+kd", **kw)
  assert other["distill.weight"] == 30.0 and other["finetune.optim.learning_rate"] == 0.001
  assert student_identity(cfg, Data, {"t": 1}, kd=False, temperature=None, **kw) == ce


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
  return finished_run(ARGS, tmp_path_factory.mktemp("zoo"))


def test_every_method_trains_through_the_cli_with_its_records(zoo):
  records = read_jsonl(zoo / "results.jsonl")
  students = [r for r in records if r["method"] != "dense"]
  assert [r["distill"] for r in students] == list(ALL)
  assert [r["distill"] for r in records if r["method"] == "dense"] == [None]
  for r in students:
    assert r["kd"] == (r["distill"] in ("kd",) or r["distill"].endswith("+kd"))
    assert r["temperature"] == (4.0 if r["kd"] else None)
    assert 0.0 < r["accuracy"] <= 1.0 and np.isfinite(r["cev"]) and r["realized_sparsity"] > 0.4
    name = f"l1_filter_s0.5_{r['distill'].replace('+', '_')}_seed0"
    assert (zoo / "checkpoints" / name).is_dir(), name
  # Training curves: the step's terms add up (γ = α' = 1) and name what they are.
  rows = read_jsonl(zoo / "metrics.jsonl")
  for method in ALL:
    stage = [r for r in rows if r["stage"] == f"l1_filter_s0.5_{method.replace('+', '_')}_seed0"]
    assert stage and all(np.isfinite(r["loss"]) for r in stage), method
    feature = method not in ("ce", "kd")
    assert all(("feature_loss" in r) == feature for r in stage), method
    assert all(("kd_loss" in r) == (method == "kd" or method.endswith("+kd")) for r in stage)
    if feature:
      for r in stage:
        parts = r["ce_loss"] + r["feature_loss"] + r.get("kd_loss", 0.0)
        assert r["loss"] == pytest.approx(parts, rel=1e-5), method


def test_load_run_gives_back_every_methods_student(zoo):
  """`load_run` finds each method's checkpoint from its record and reproduces its logits."""
  from prunebias_jax.data import load_dataset
  from prunebias_jax.load import load_run

  run = load_run(zoo)
  images = load_dataset(run.config.data).test.images
  with np.load(zoo / "predictions.npz") as z:
    logits = z["logits"]
  for i, record in enumerate(run.records):
    if record["method"] != "dense":
      np.testing.assert_allclose(run.model(record).apply(images), logits[i], rtol=1e-4, atol=1e-4)


def test_cells_pair_every_method_with_ce_and_feature_methods_with_kd(zoo):
  records = {r["distill"]: r for r in read_jsonl(zoo / "results.jsonl") if r["method"] != "dense"}
  cells = {c["distill"]: c for c in read_jsonl(zoo / "cells.jsonl")}
  assert list(cells) == list(ALL)
  assert "paired_vs_ce" not in cells["ce"] and "paired_vs_kd" not in cells["kd"]
  for method, c in cells.items():
    if method == "ce":
      continue
    for baseline in ("ce",) + (() if method == "kd" else ("kd",)):
      paired = c[f"paired_vs_{baseline}"]
      assert paired["n_pairs"] == 1
      for field in ("cev", "sde", "accuracy"):  # baseline − it, from the models' own records
        want = records[baseline][field] - records[method][field]
        assert paired[f"{field}_diff"] == pytest.approx(want, rel=1e-9, abs=1e-12)
  md = (zoo / "results.md").read_text()
  section = md.split("## Distillation methods", 1)[1].split("\n## ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| l1_filter | 0.5 |")]
  labels = [row.split(" | ")[2] for row in rows]
  assert labels == ["CE", "KD T=4", "SP", "AT", "PKT", "CRD", "HINT"] + [
    f"{m.upper()}+KD T=4" for m in ("sp", "at", "pkt", "crd", "hint")
  ]
  main = md.split("## ", 1)[0]
  assert main.count("| l1_filter | 0.5 |") == 1  # the main table: CE and KD only, one row
  assert (zoo / "plots" / "distill_methods.png").stat().st_size > 10_000


def _first_steps(workdir: Path) -> dict[tuple[str, int], dict]:
  """metrics.jsonl rows of the first two steps of every fine-tuning stage."""
  rows = read_jsonl(workdir / "metrics.jsonl")
  return {
    (r["stage"], r["step"]): r
    for r in rows
    if "loss" in r and r["step"] <= 2 and r["stage"] != "dense"
  }


def test_every_method_gives_the_losses_of_one_device_on_four(zoo, tmp_path):
  """The CLI on 4 faked CPU devices (batch sharded, state replicated), from the 1-device
  run's teacher: the first two steps of every method (the first a fixed batch, the second
  after an update) report the losses of one device. Trained separately, the teachers would
  differ by float summation order amplified over the dense steps (test_multihost.py)."""
  (tmp_path / "checkpoints").mkdir()
  shutil.copytree(zoo / "checkpoints" / "dense", tmp_path / "checkpoints" / "dense")
  shutil.copy(zoo / "config.json", tmp_path / "config.json")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = _run(tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "devices: 4 × cpu" in proc.stderr and "stage dense: restored" in proc.stderr
  one, four = _first_steps(zoo), _first_steps(tmp_path)
  assert len(one) == 2 * len(ALL) and set(four) == set(one)
  for key, r in one.items():
    terms = [k for k in ("loss", "ce_loss", "kd_loss", "feature_loss") if k in r]
    assert terms == [k for k in ("loss", "ce_loss", "kd_loss", "feature_loss") if k in four[key]]
    for term in terms:  # measured: at most 6e-6 (PKT), 2e-6 (SP), 3e-7 the others
      assert four[key][term] == pytest.approx(r[term], rel=5e-5), (key, term)


def test_a_crd_stage_killed_mid_stage_resumes_to_the_same_bytes(zoo, tmp_path):
  """SIGKILL after CRD's first mid-stage checkpoint (step 5); the rerun continues the stage
  from it (heads, optimizer state, memory banks and Z restored) and every result file equals
  the uninterrupted run's."""
  assert_kill_resumes_to_the_same_bytes(ARGS, tmp_path, CRD_STAGE, zoo)


def test_a_bad_method_is_one_line_before_any_training(tmp_path):
  line = one_line_error(
    ["--config=configs/default.py", "--config.distill.method=('ce','crd+sp')"], tmp_path / "w"
  )
  assert "config.distill.method='crd+sp' is not allowed" in line
  assert "sp+kd" in line  # the allowed names are listed


def test_zoo_config_is_the_papers_grid():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "zoo", ROOT / "configs" / "paper" / "cifar100_distill_zoo.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  assert tuple(cfg.distill.method) == ALL
  assert dict(cfg.distill.weights) == {
    "sp": 3000.0,
    "at": 1000.0,
    "pkt": 30000.0,
    "crd": 0.8,
    "hint": 1.0,
  }
  assert (cfg.distill.ce_weight, cfg.distill.kl_weight, cfg.kd.alpha, cfg.kd.temperature) == (
    1.0,
    1.0,
    0.9,
    4.0,
  )
  assert (cfg.distill.learning_rate.at, cfg.distill.learning_rate.pkt) == (0.005, 0.005)
  assert cfg.distill.learning_rate.sp is None and cfg.finetune.optim.learning_rate == 0.05
  assert [cfg.distill.batch_size[m] for m in ("at", "pkt", "crd")] == [256, 256, 256]
  assert cfg.finetune.batch_size == 512 and cfg.seeds == (0, 1, 2, 3)
  assert tuple(cfg.pruning.sparsities) == (0.45,) and cfg.distill.crd.negatives == 16384
