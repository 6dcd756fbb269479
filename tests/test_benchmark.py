"""scripts/benchmark.py: its NumPy / scikit-learn references agree with the project's jnp kernels,
and the --quick path of the JAX-only sections runs (PyTorch not needed)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import jax
import numpy as np
import pytest

from prunebias_jax.metrics import (
  cev_from_changes,
  linear_cka,
  per_class_rates,
  relative_rate_change,
  sde_from_changes,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _project(labels, ref, pred, x, y, c):
  ch = relative_rate_change(labels, ref, pred, c)
  return (
    float(cev_from_changes(ch.dfpr, ch.dfnr, ch.valid)),
    float(sde_from_changes(ch.dfpr, ch.dfnr, ch.valid)),
    float(linear_cka(x, y)),
  )


def test_metric_references_agree_with_project_kernels(bench):
  labels, ref, pred, x, y = bench.metric_inputs(3000, 24, 10, seed=3)
  want = _project(labels, ref, pred, x, y, 10)
  got_np = bench.numpy_metrics(labels, ref, pred, x, y, 10)
  got_paper = bench.paper_metrics(labels, ref, pred, x, y, 10, torch_mod=None)  # NumPy Gram CKA
  got_jax = bench.jax_metrics_fn(10)(labels, ref, pred, x, y)
  assert want[0] > 1.0 and want[1] > 0.1 and 0.05 < want[2] < 0.99  # non-trivial values
  for got in (got_np, got_paper, got_jax):
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_numpy_rates_match_confusion_rates(bench):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 7, 500).astype(np.int32)
  pred = np.where(rng.random(500) < 0.3, rng.integers(0, 7, 500), labels).astype(np.int32)
  fpr, fnr, neg, pos = bench.numpy_rates(labels, pred, 7)
  want = per_class_rates(labels, pred, 7)
  np.testing.assert_allclose(fpr, want.fpr, rtol=1e-6)
  np.testing.assert_allclose(fnr, want.fnr, rtol=1e-6)
  np.testing.assert_array_equal(pos, np.bincount(labels, minlength=7))
  sk = bench.sklearn_rates(labels, pred, 7)
  for a, b in zip(sk, (fpr, fnr, neg, pos)):
    np.testing.assert_allclose(a, b)


def test_numpy_cev_sde_floor_rule_for_zero_reference_rates(bench):
  # class 0 is never predicted wrongly by the reference (FPR = FNR = 0): the floor rule applies
  labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 1], np.int32)
  ref = np.array([0, 0, 1, 2, 1, 2, 1, 2, 2, 1], np.int32)
  pred = np.array([0, 1, 1, 1, 0, 2, 2, 2, 1, 1], np.int32)
  got = bench.numpy_cev_sde(bench.numpy_rates(labels, ref, 3), bench.numpy_rates(labels, pred, 3))
  want = _project(labels, ref, pred, np.eye(10, 3), np.eye(10, 3), 3)[:2]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gram_cka_equals_feature_cka_golden(bench):
  # the reference notebook's golden value (docs/metrics.md)
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  assert bench.gram_linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
  assert bench.numpy_linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)


def test_peak_table_and_markdown_block(bench, tmp_path):
  assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
  assert bench.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
  assert bench.peak_bf16_flops("cpu") is None
  doc = tmp_path / "b.md"
  doc.write_text("# Title\n\nhand-written\n")
  bench.write_markdown(str(doc), "table 1\n")
  bench.write_markdown(str(doc), "table 2\n")  # replaces the generated block, keeps the rest
  text = doc.read_text()
  assert "hand-written" in text and "table 2" in text and "table 1" not in text
  assert text.count(bench.MARK_BEGIN) == 1


def test_quick_run_of_the_jax_sections(bench, tmp_path):
  out = tmp_path / "r.json"
  report = bench.main(
    [
      "--quick",
      "--sections",
      "train,metrics,stream,population,loop",
      "--torch-variants=",
      "--json",
      str(out),
      "--markdown",
      str(tmp_path / "r.md"),
    ]
  )
  saved = json.loads(out.read_text())
  # Every derived figure is the stated function of the timings it was made from.
  train_row = saved["train"][0]
  train = train_row["variants"]["jax"]
  assert len(train["seconds_all"]) == 2  # --quick: 2 repeats
  assert train["seconds_median"] == statistics.median(train["seconds_all"])
  assert train["flops_per_step"] > 1e6  # a ResNet-20 step at batch 16 is ~1 GFLOP, not ~0
  steps = train_row["steps"]
  assert train["tflops"] == pytest.approx(
    train["flops_per_step"] * steps / train["seconds_median"] / 1e12, rel=1e-12
  )
  assert train["items_per_s"] == pytest.approx(
    train_row["batch"] * steps / train["seconds_median"], rel=1e-12
  )
  stream = saved["stream"][0]
  assert "error" not in stream, stream.get("error")
  assert stream["gflops"] == pytest.approx(6.0 * 5000 * 32 * 32 / stream["seconds"] / 1e9)
  # The streamed CKA of the cycled pool equals the in-memory CKA of the same rows.
  x, y = bench.metric_inputs(8 * 1024, 32, 10)[3:]
  rows = np.concatenate([np.arange(8 * 1024)] * 2)[:5000]
  assert stream["values"][2] == pytest.approx(float(linear_cka(x[rows], y[rows])), abs=2e-6)
  metrics = saved["metrics"][0]
  assert "error" not in metrics, metrics.get("error")
  values = {k: v["values"] for k, v in metrics["variants"].items()}
  np.testing.assert_allclose(values["numpy"], values["jax"], rtol=1e-3)
  np.testing.assert_allclose(values["paper"], values["jax"], rtol=1e-3)
  variants = metrics["variants"]
  assert metrics["ratios"] == {
    k: pytest.approx(variants[k]["seconds_median"] / variants["jax"]["seconds_median"], rel=1e-12)
    for k in ("numpy", "paper")
  }
  population = saved["population"][0]
  seq, vmap = population["variants"]["sequential"], population["variants"]["vmap"]
  assert population["speedup_vs_sequential"] == pytest.approx(
    seq["seconds_median"] / vmap["seconds_median"], rel=1e-12
  )
  assert vmap["seconds_median"] == statistics.median(vmap["seconds_all"])
  assert population["map_speedup_vs_sequential"] == pytest.approx(
    seq["seconds_median"] / population["variants"]["map"]["seconds_median"], rel=1e-12
  )
  noop, real = saved["loop"]
  assert noop["steps"] == 16 and real["steps"] == 8  # --quick: 8 steps an epoch; 2 and 1 epochs
  for row in (noop, real):
    for v in row["variants"].values():
      assert v["seconds_median"] == statistics.median(v["seconds_all"])
  assert noop["variants"]["fit_scan_noop"]["ms_per_step"] == pytest.approx(
    1e3 * noop["variants"]["fit_scan_noop"]["seconds_median"] / 16, rel=1e-12
  )
  assert real["variants"]["fit_step"]["vs_bare"] == pytest.approx(
    real["variants"]["bare"]["seconds_median"] / real["variants"]["fit_step"]["seconds_median"],
    rel=1e-12,
  )
  if jax.default_backend() == "cpu":
    assert set(real["variants"]) == {"bare", "fit_step"} and "jax-ml/jax#12868" in str(real)
  md = (tmp_path / "r.md").read_text()
  assert "Masked CE+KD train step" in md and "Metric kernels" in md and "Population" in md
  assert f"{population['speedup_vs_sequential']:.2f}×" in md
  assert "The training loop" in md and f"{real['variants']['fit_step']['vs_bare']:.2f}×" in md
  assert report["environment"]["platform"] == jax.devices()[0].platform


def test_peak_rss_increase_counts_memory_touched_and_freed_inside_the_call(bench):
  size_mb = 64

  def touch_and_free():
    a = np.ones(size_mb * 2**20 // 8)  # written, so resident; freed when the call returns
    return float(a[::4096].sum())

  value, mb = bench.peak_rss_increase_mb(touch_and_free)
  assert value == len(range(0, size_mb * 2**20 // 8, 4096))
  if mb is None:
    pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
  # the peak, not the resident set after the call (which is back near the start)
  assert size_mb * 0.9 <= mb <= size_mb * 1.5
  _, idle = bench.peak_rss_increase_mb(lambda: None)
  assert idle < size_mb * 0.25  # the peak of the earlier call was reset, not carried over


def test_the_gpu_check_script_lists_every_part_issue_15_asks_for():
  """scripts/gpu_check.sh --dry-run: the parts, each bounded in time, within 8 minutes in all."""
  import re
  import subprocess

  proc = subprocess.run(
    ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "/tmp/unused"],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  parts = dict(re.findall(r"^== (\S+) \(at most (\d+) s\)", proc.stdout, re.M))
  assert set(parts) == {
    "train_resnet20",
    "train_resnet18",
    "population",
    "metrics",
    "flag_conv_nhwc",
    "flag_graph_min_1",
    "loop",
  }
  assert sum(map(int, parts.values())) <= 8 * 60
  text = proc.stdout
  assert "--models resnet20 --batches 128,512 --jax-dtypes float32,bfloat16" in text
  assert "--models resnet18 --batches 512" in text
  assert "compile_max_cl" in text and "--population 8" in text and "--metric-n 1000000" in text
  assert "XLA_FLAGS=--xla_gpu_force_conv_nhwc=true" in text
  assert "XLA_FLAGS=--xla_gpu_graph_min_graph_size=1" in text
  assert "--sections loop --loop-model resnet20 --loop-batch 128" in text
