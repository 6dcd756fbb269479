"""Quantization as a compression method: Qwix's quantized layers against a NumPy reference of
the same rounding, the static calibration, the deployed size, QAT keeping pruned weights at
zero, and the CLI: PTQ and QAT (CE and KD) cells with their records, tables and figures, a
killed quantized fine-tuning resuming to the same bytes, bad settings as one line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import flax.linen as nn
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

from prunebias_jax import quantization as qz
from prunebias_jax.models import get_model
from prunebias_jax.pruning import apply_masks, dense_masks, prune
from prunebias_jax.train import create_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the rounding
def _round(r: np.ndarray, bits: int) -> np.ndarray:
  """clip(round(r), −2^(b−1), 2^(b−1) − 1), round half to even (as jnp.round)."""
  return np.clip(np.round(r), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _positive_extremes(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  """`a` with each group's largest-magnitude value made positive (the group's sign flipped).
  A group's extreme is an exact tie in real numbers, r = ±(2^(b−1) − ½): a positive one maps
  to 2^(b−1) − 1 however float32 rounds the quotient, a negative one to −2^(b−1) or
  −2^(b−1) + 1 as the last bit falls (measured both ways within one layer). With positive
  extremes every value has one right answer."""
  flat = np.moveaxis(
    a, [i for i in range(a.ndim) if i not in axes], list(range(a.ndim - len(axes)))
  )
  flat = flat.reshape(flat.shape[: a.ndim - len(axes)] + (-1,))
  extreme = np.take_along_axis(flat, np.abs(flat).argmax(-1)[..., None], -1)[..., 0]
  sign = np.sign(extreme)
  shape = [1 if i in axes else a.shape[i] for i in range(a.ndim)]
  return a * sign.reshape(shape)


def _quantize_per_channel(w: np.ndarray, bits: int) -> np.ndarray:
  """NumPy: symmetric per-output-channel (last axis) rounding, s = max|w| / (2^(b−1) − ½),
  ŵ = s·_round(w/s)."""
  axes = tuple(range(w.ndim - 1))
  scale = np.abs(w).max(axis=axes, keepdims=True) / (2 ** (bits - 1) - 0.5)
  return _round(w / scale, bits) * scale


def _quantize_rows(x: np.ndarray, bits: int = 8) -> np.ndarray:
  """NumPy: each example (row) rounded with its own absmax scale (dynamic activations)."""
  scale = np.abs(x).max(axis=tuple(range(1, x.ndim)), keepdims=True) / (2 ** (bits - 1) - 0.5)
  return _round(x / scale, bits) * scale


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(6, name="fc")(x)


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(4, (3, 3), padding="VALID", use_bias=False, name="conv")(x)


def _conv_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
  """NumPy NHWC × HWIO 'VALID' convolution (cross-correlation, as XLA's)."""
  kh, kw = k.shape[:2]
  n, h, w, _ = x.shape
  out = np.zeros((n, h - kh + 1, w - kw + 1, k.shape[-1]))
  for i in range(h - kh + 1):
    for j in range(w - kw + 1):
      out[:, i, j] = np.einsum("nhwc,hwco->no", x[:, i : i + kh, j : j + kw], k)
  return out


@pytest.mark.parametrize("scheme,bits", [("int8_weights", 8), ("int4_weights", 4)])
def test_a_quantized_dense_layer_is_the_numpy_rounding_of_its_weights(scheme, bits):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 10)).astype(np.float32)
  module = _Dense()
  variables = module.init(jax.random.key(0), x)
  kernel = _positive_extremes(np.asarray(variables["params"]["fc"]["kernel"]), (0,))
  variables["params"]["fc"]["kernel"] = jnp.asarray(kernel)
  out = np.asarray(qz.quantized_model(module, scheme).apply(variables, x))
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["fc"]["bias"], np.float64)
  want = x.astype(np.float64) @ _quantize_per_channel(w, bits) + b
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert (out.argmax(-1) == want.argmax(-1)).all()  # the predictions too
  # The rounding is really there: the float layer differs by more than the tolerance.
  assert np.abs(np.asarray(module.apply(variables, x)) - want).max() > 1e-3


def test_a_quantized_conv_layer_rounds_each_output_channel_on_its_own_scale():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
  module = _Conv()
  variables = module.init(jax.random.key(1), x)
  # Channels of very different ranges: one scale per output channel, not one per tensor.
  k = np.asarray(variables["params"]["conv"]["kernel"]) * np.array([1.0, 10.0, 0.1, 3.0])
  k = _positive_extremes(k, (0, 1, 2))
  variables = {"params": {"conv": {"kernel": jnp.asarray(k, jnp.float32)}}}
  out = np.asarray(qz.quantized_model(module, "int8_weights").apply(variables, x))
  want = _conv_valid(x.astype(np.float64), _quantize_per_channel(k.astype(np.float64), 8))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  step = np.abs(k).max() / 127.5
  per_tensor = step * np.clip(np.round(k / step), -128, 127)
  assert np.abs(_conv_valid(x, per_tensor) - out).max() > 1e-3


def test_int8_dynamic_also_rounds_each_examples_activations_on_its_own_scale():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(8, 10)) * rng.uniform(0.1, 20, size=(8, 1))).astype(np.float32)
  x = _positive_extremes(x, (1,))
  module = _Dense()
  variables = module.init(jax.random.key(2), x)
  kernel = _positive_extremes(np.asarray(variables["params"]["fc"]["kernel"]), (0,))
  variables["params"]["fc"]["kernel"] = jnp.asarray(kernel)
  out = np.asarray(qz.quantized_model(module, "int8_dynamic").apply(variables, x))
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["fc"]["bias"], np.float64)
  want = _quantize_rows(x.astype(np.float64)) @ _quantize_per_channel(w, 8) + b
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  weights_only = x.astype(np.float64) @ _quantize_per_channel(w, 8) + b
  assert np.abs(weights_only - out).max() > 1e-3


def test_static_calibration_is_the_mean_per_image_range_over_equal_chunks():
  """int8_static's range at the first layer's input: the mean over the calibration images of
  each image's max |x| (normalised), whatever the chunking into equal chunks."""
  model = get_model("small_cnn", 4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  qm = qz.quantized_model(model, "int8_static")
  images = np.random.default_rng(3).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  mean, std = 0.3, 0.2
  normalized = (images / 255.0 - mean) / std
  want = np.abs(normalized).max(axis=(1, 2, 3)).mean()
  for chunk in (12, 4, 3):
    assert qz.calibration_chunk(12, chunk) == chunk
    stats = qz.calibrate(qm, variables, images.reshape(12 // chunk, chunk, 8, 8, 1), mean, std)
    first = stats[qz.STATS]["conv1"]["conv_general_dilated0_lhs"]
    assert int(first["count"]) == 12 // chunk
    got = float(first["sum_of_absmax"].ravel()[0]) / int(first["count"])
    assert got == pytest.approx(want, rel=1e-5), chunk
  assert qz.calibration_chunk(512, 256) == 256 and qz.calibration_chunk(100, 64) == 50
  assert qz.calibration_chunk(13, 8) == 1  # a prime: one image per chunk


def test_model_bytes_counts_precision_sparse_storage_and_scales_by_hand():
  kernel = np.zeros((3, 3, 1, 4), np.float32)
  kernel.reshape(-1)[:9] = 1.0  # 9 of 36 weights non-zero
  variables = {
    "params": {
      "conv": {"kernel": kernel, "bias": np.ones(4, np.float32)},
      "head": {"kernel": np.ones((4, 3), np.float32)},
    },
    "batch_stats": {"bn": {"mean": np.zeros(4, np.float32)}},
  }
  # float32: conv kernel min(144, 5 + 36) = 41; bias 16; head min(48, 2 + 48) = 48; stats 16.
  assert qz.model_bytes(variables) == 41 + 16 + 48 + 16
  # int8: conv min(36, 5 + 9) + 4 scales · 4; head min(12, 2 + 12) + 3 · 4.
  assert qz.model_bytes(variables, "int8_weights") == (14 + 16) + 16 + (12 + 12) + 16
  # int4: conv min(18, 5 + 5) + 16; head min(6, 2 + 6) + 12.
  assert qz.model_bytes(variables, "int4_weights") == (10 + 16) + 16 + (6 + 12) + 16


def test_split_method_reads_schemes_pruning_and_both():
  assert qz.split_method("int8_weights") == (None, "int8_weights")
  assert qz.split_method("l1_filter+int4_weights") == ("l1_filter", "int4_weights")
  assert qz.split_method("global_magnitude") == ("global_magnitude", None)
  assert qz.split_method("sp+kd") == ("sp+kd", None)  # not a scheme: as it is
  assert qz.is_quantized("random+int8_dynamic") and not qz.is_quantized("random")


# ------------------------------------------------------------------------------ QAT
def test_qat_keeps_pruned_weights_exactly_zero_under_momentum_and_weight_decay():
  """Dense quantization-aware steps first (momentum builds up on every weight), then pruning
  that keeps the optimizer state, then more steps: momentum and weight decay push on the
  pruned weights, and they stay exactly zero while the others train."""
  model = get_model("small_cnn", 5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  teacher = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  opt = optax.chain(optax.add_decayed_weights(5e-3), optax.sgd(0.05, momentum=0.9))
  step = make_train_step(
    qz.quantized_model(model, "int8_weights"),
    opt,
    mean=(0.3,),
    std=(0.2,),
    crop_padding=1,
    flip=False,
    method="kd",
    teacher_model=model,
  )
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 5, 16).astype(np.int32)
  params = variables["params"]
  state = create_state(params, variables["batch_stats"], opt, masks=dense_masks(params))
  run = lambda state, k: step(state, images, labels, jax.random.key(k), teacher, 0.9, 4.0)[0]
  for k in range(3):
    state = run(state, k)
  masks = prune(jax.device_get(state.params), "global_magnitude", 0.7)
  state = state.replace(
    params=apply_masks(state.params, masks), masks=jax.tree.map(jnp.array, masks)
  )
  before = jax.device_get(state.params)
  for k in range(3, 7):
    state = run(state, k)
  after = jax.device_get(state.params)
  moved = 0
  flat = lambda tree: [x for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None)]
  for m, p, p0 in zip(flat(masks), flat(after), flat(before), strict=True):
    if m is None:
      continue
    m = np.asarray(m)
    assert (np.asarray(p)[~m] == 0.0).all()  # exactly zero, not small
    moved += int((np.asarray(p)[m] != np.asarray(p0)[m]).sum())
  assert moved > 0.9 * sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(masks))
  assert sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(masks)) > 0


# ------------------------------------------------------------------------------ the CLI
ARGS = [
  "--config",
  "configs/quantization.py",
  "--config.dense.epochs=3",
  "--config.finetune.epochs=1",
  "--config.pruning.sparsities=(0.5,)",
  "--config.quantization.schemes=('int8_weights','int8_static')",
  "--config.quantization.calibration_examples=96",
  "--config.checkpoint.every_steps=5",
  "--config.monitor.every_steps=5",
  "--config.monitor.test_accuracy=False",
  "--config.analysis.bootstrap_resamples=0",
  "--config.analysis.correlation_resamples=20",
  "--config.analysis.permutations=50",
]
STAGE = "global_magnitude_int8_static_s0.5_kd_seed0"  # a pruned + quantized KD fine-tuning


def _run(workdir: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
  return run_main([*ARGS, *extra], workdir, **kwargs)


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory) -> Path:
  return finished_run(ARGS, tmp_path_factory.mktemp("quantized"))


def test_every_compression_method_has_ptq_and_qat_ce_kd_records(quantized_run):
  records = read_jsonl(quantized_run / "results.jsonl")
  cells = [(r["method"], r["sparsity"], r["distill"]) for r in records]
  methods = [
    ("int8_weights", 0.0),
    ("int8_static", 0.0),
    ("global_magnitude+int8_weights", 0.5),
    ("global_magnitude+int8_static", 0.5),
  ]
  want = [("dense", 0.0, None), ("none", 0.0, "ce"), ("none", 0.0, "kd")]  # + the control
  want += [("global_magnitude", 0.5, "ce"), ("global_magnitude", 0.5, "kd")]
  want += [(m, s, d) for m, s in methods for d in ("ptq", "ce", "kd")]
  assert cells == want
  dense = records[0]
  for r in records:  # every record, the dense reference included, has its deployed size
    assert isinstance(r["model_bytes"], int) and r["model_bytes"] > 0
  by = {(r["method"], r["distill"]): r for r in records}
  assert by[("int8_weights", "ptq")]["model_bytes"] < dense["model_bytes"] / 3.5
  assert (
    by[("global_magnitude+int8_weights", "ce")]["model_bytes"]
    < by[("int8_weights", "ce")]["model_bytes"]
  )
  # An int8 weight-only PTQ of the default CNN stays within 0.01 of the float model's accuracy
  # (measured: equal on the 719 digits) and agrees with it on almost every prediction.
  ptq = by[("int8_weights", "ptq")]
  assert abs(ptq["accuracy"] - dense["accuracy"]) <= 0.01
  assert ptq["agreement"] >= 0.98
  # QAT keeps the pruning exact: the realised sparsity of the pruned + quantized students is
  # the masks' (every pruned weight is exactly zero after fine-tuning).
  for r in records:
    if r["method"].startswith("global_magnitude") and r["distill"] != "ptq":
      assert r["realized_sparsity"] == r["target_sparsity"] == pytest.approx(0.5, abs=1e-4)
  for r in records[1:]:
    assert r["cev"] is not None and r["sde"] is not None and 0.0 < r["cka"] <= 1.0
  # The trained models have checkpoints (a static scheme's calibrated ranges inside); PTQ
  # models are computed, not trained: none.
  ckpts = {p.name for p in (quantized_run / "checkpoints").iterdir()}
  assert {"int8_static_s0_ce_seed0", "int8_static_s0_kd_seed0", STAGE} <= ckpts
  assert not any("ptq" in name for name in ckpts)


def test_kd_and_ce_quantized_fine_tuning_train_with_their_losses(quantized_run):
  rows = read_jsonl(quantized_run / "metrics.jsonl")
  for stage, kd in (("int8_weights_s0_ce_seed0", False), ("int8_weights_s0_kd_seed0", True)):
    losses = [r for r in rows if r["stage"] == stage and "loss" in r]
    assert losses and all(np.isfinite(r["loss"]) for r in losses), stage
    assert all(("kd_loss" in r) == kd for r in losses), stage
  cells = read_jsonl(quantized_run / "cells.jsonl")
  kd = next(c for c in cells if c["method"] == "int8_weights" and c["distill"] == "kd")
  assert kd["paired_vs_ce"]["n_pairs"] == 1  # QAT KD against QAT CE, as for pruning
  ptq = next(c for c in cells if c["method"] == "int8_weights" and c["distill"] == "ptq")
  assert "paired_vs_ce" not in ptq and ptq["model_bytes"] == kd["model_bytes"]


def test_results_md_lists_every_method_with_accuracy_bias_cka_and_size(quantized_run):
  text = (quantized_run / "results.md").read_text()
  section = text.split("## Compression methods and model size")[1].split("\n## ")[0]
  rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")][1:]
  labels = [(r[0].lstrip("| "), r[2]) for r in rows]
  assert labels[0] == ("dense", "–")
  for method in ("int8_weights", "int8_static", "global_magnitude+int8_weights"):
    for label in ("PTQ", "QAT CE", "QAT KD T=4"):
      assert (method, label) in labels, (method, label)
  assert ("global_magnitude", "CE") in labels and ("global_magnitude", "KD T=4") in labels
  for r in rows[1:]:  # accuracy, CEV, SDE, CKA, size and ratio: all given
    assert all(v.strip() not in ("", "–") for v in r[4:10]), r
    assert r[8].endswith("KiB")
  assert (quantized_run / "plots" / "bias_vs_size.png").stat().st_size > 10_000
  # The pruning curves show the pruned models only.
  assert (quantized_run / "plots" / "bias_vs_sparsity.png").exists()


def test_a_killed_quantized_fine_tuning_resumes_to_the_same_bytes(quantized_run, tmp_path):
  """The run's workdir without one pruned + quantized KD student (int8_static: calibrated
  ranges frozen in the state): SIGKILL after its first mid-stage checkpoint (step 5), the
  rerun continues from it and every result file equals the uninterrupted run's."""
  shutil.copytree(quantized_run / "checkpoints", tmp_path / "checkpoints")
  shutil.copy(quantized_run / "config.json", tmp_path / "config.json")
  shutil.rmtree(tmp_path / "checkpoints" / STAGE)
  assert_kill_resumes_to_the_same_bytes(ARGS, tmp_path, STAGE, quantized_run)


def test_a_bad_scheme_is_one_line_on_the_cli_before_any_work(tmp_path):
  args = ["--config=configs/quantization.py", "--config.quantization.schemes=('int8','int4')"]
  line = one_line_error(args, tmp_path / "w")
  assert "config.quantization.schemes='int8' is not allowed" in line
  assert "int8_weights, int4_weights, int8_dynamic, int8_static" in line  # what is allowed


def test_a_calibration_size_beyond_the_split_is_refused_before_any_work(tmp_path):
  """(In-process: the same check as the CLI's, which tests/test_bad_input.py runs for every
  field; calibration_examples=0 is one of its cases.)"""
  import importlib.util

  from prunebias_jax import stages
  from prunebias_jax.config import ConfigError

  spec = importlib.util.spec_from_file_location("q", ROOT / "configs" / "quantization.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.quantization.schemes = ("int8_static",)
  cfg.quantization.calibration_examples = 100_000
  with pytest.raises(ConfigError, match=r"calibration_examples=100000 is not allowed; expected at"):
    stages.prepare(cfg, tmp_path / "w")
  assert not (tmp_path / "w" / "checkpoints").exists()
  cfg.quantization.schemes = ("int8_dynamic",)  # a scheme without calibration: not checked
  stages.prepare(cfg, tmp_path / "w2")


def test_load_run_gives_back_quantized_students_with_their_predictions(quantized_run):
  """`load_run` restores a QAT student with its quantized module (and a static scheme's
  ranges) and reproduces the logits the run recorded; a PTQ record is named as computed."""
  from prunebias_jax.data import load_dataset
  from prunebias_jax.errors import CheckpointError
  from prunebias_jax.load import load_run

  run = load_run(quantized_run)
  saved = np.load(quantized_run / "predictions.npz")
  data = load_dataset(run.config.data)
  for i, r in enumerate(run.records):
    if r["method"] in ("int8_static", "global_magnitude+int8_static") and r["distill"] == "kd":
      model = run.model(r)
      assert model.frozen is not None and qz.STATS in model.frozen
      logits = model.apply(data.test.images)
      # Quantized activations amplify float summation order: another batch size (another
      # XLA program) moves an activation across a rounding boundary in a few examples
      # (measured: at most 2 of 719 rows, by up to 0.012; no prediction changed). Every other
      # row agrees to 1e-4.
      off = np.abs(logits - saved["logits"][i]).max(axis=1) > 1e-4
      assert off.mean() <= 0.01 and np.abs(logits - saved["logits"][i]).max() < 0.05
      assert (logits.argmax(-1) == saved["predictions"][i]).mean() >= 0.99
  ptq = next(r for r in run.records if r["distill"] == "ptq")
  with pytest.raises(CheckpointError, match="post-training-quantized models are computed"):
    run.model(ptq)


def test_a_ptq_model_of_a_gradual_schedule_is_pruned_to_the_target(tmp_path):
  """Gradual pruning starts fine-tuning at pruning.initial_sparsity; a post-training model has
  no epochs to get to the target, so it is pruned to it at once (and is labelled with it)."""
  from configs.default import get_config
  from prunebias_jax import stages
  from prunebias_jax.pruning import mask_sparsity

  cfg = get_config()
  cfg.pruning.methods = ("global_magnitude",)
  cfg.pruning.sparsities = (0.8,)
  cfg.pruning.schedule = "gradual"
  cfg.pruning.frequency_epochs = 1  # 0.1 at epoch 0, then 0.50, 0.71, 0.79, 0.8
  cfg.finetune.epochs = 10
  cfg.quantization.schemes = ("int8_weights",)
  cfg.quantization.prune_first = ("global_magnitude",)
  ctx = stages.prepare(cfg, tmp_path)
  model = ctx.model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  teacher = {"params": model["params"], "batch_stats": model["batch_stats"]}
  method = "global_magnitude+int8_weights"
  masks = stages.initial_masks(ctx, teacher, method, 0.8, (0,))
  assert mask_sparsity(masks()[0])["global"] == pytest.approx(0.1, abs=1e-3)  # QAT's start
  (ptq,) = [c for c in stages.variants(cfg, method, 0.8) if c.distill == stages.PTQ]
  (member,) = stages.finetune(ctx, teacher, ptq, (0,), masks)
  assert mask_sparsity(member.masks)["global"] == pytest.approx(0.8, abs=1e-3)
  assert member.scheme == "int8_weights" and member.training == {"steps": 0}
