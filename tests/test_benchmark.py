"""scripts/benchmark.py: its NumPy / scikit-learn references agree with the project's jnp kernels,
and the --quick path of the JAX-only sections runs (PyTorch not needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
      "train,metrics,population",
      "--torch-variants=",
      "--json",
      str(out),
      "--markdown",
      str(tmp_path / "r.md"),
    ]
  )
  saved = json.loads(out.read_text())
  train = saved["train"][0]["variants"]["jax"]
  assert train["items_per_s"] > 0 and train["flops_per_step"] > 0 and train["tflops"] > 0
  metrics = saved["metrics"][0]
  assert "error" not in metrics, metrics.get("error")
  values = {k: v["values"] for k, v in metrics["variants"].items()}
  np.testing.assert_allclose(values["numpy"], values["jax"], rtol=1e-3)
  np.testing.assert_allclose(values["paper"], values["jax"], rtol=1e-3)
  assert all(
    v["peak_rss_increase_mb"] is None or v["peak_rss_increase_mb"] >= 0
    for v in metrics["variants"].values()
  )
  assert saved["population"][0]["speedup_vs_sequential"] > 0
  md = (tmp_path / "r.md").read_text()
  assert "Masked CE+KD train step" in md and "Metric kernels" in md and "Population" in md
  assert report["environment"]["platform"] == "cpu" or report["environment"]["platform"]
