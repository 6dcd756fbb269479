"""Bias analysis beyond CEV/SDE: for whom, which examples, beyond seed noise, and why.

Layered on the pipeline's evaluated outputs (predictions, logits, per-layer features):
- per model: CKA (linear and debiased) and SVCCA distance with the dense model at every
  layer (stage outputs averaged over space, penultimate features, logits); group fairness
  (DPD/EOD) where the dataset has a sensitive attribute; bootstrap confidence intervals of
  CEV, SDE (and DPD, EOD), examples resampled;
- per cell (method × sparsity × CE/KD, its seeds a population): Compression Identified
  Exemplars against the dense population, and class-wise significance of the accuracy change
  (Welch and permutation tests, Benjamini–Hochberg) when both populations have ≥ 2 models;
- per run: Pearson/Spearman correlation of similarity with bias, with bootstrap intervals.
Definitions: ../shared/METRICS.md and `prunebias_jax.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prunebias_jax import metrics as pm

Record = dict[str, Any]


@dataclasses.dataclass
class Outputs:
  """One model's evaluation on the full test set."""

  predictions: np.ndarray  # (n,) int32
  logits: np.ndarray  # (n, C)
  layers: dict[str, np.ndarray]  # name → (n, d); 'features' is the penultimate layer

  def similarity_layers(self) -> dict[str, np.ndarray]:
    return {**self.layers, "logits": self.logits}


def _f(x) -> float | None:
  v = float(np.asarray(x))
  return round(v, 6) if np.isfinite(v) else None


def similarity_by_layer(reference: Outputs, model: Outputs, svcca_examples: int) -> Record:
  """{'layer_cka', 'layer_svcca': {layer: value}, 'cka_debiased', 'svcca'} against the
  reference. SVCCA uses the first `svcca_examples` test examples (the authors used 6,400);
  'svcca' is the SVCCA distance of the logits, the layer the authors plotted against CEV."""
  ref_layers, layers = reference.similarity_layers(), model.similarity_layers()
  m = svcca_examples or reference.logits.shape[0]
  layer_cka, layer_svcca = {}, {}
  for name in sorted(ref_layers):
    x, y = jnp.asarray(ref_layers[name]), jnp.asarray(layers[name])
    layer_cka[name] = _f(pm.linear_cka(x, y))
    layer_svcca[name] = _f(pm.svcca_distance(x[:m], y[:m]))
  return {
    "layer_cka": layer_cka,
    "layer_svcca": layer_svcca,
    "cka_debiased": _f(
      pm.debiased_linear_cka(
        jnp.asarray(reference.layers["features"]), jnp.asarray(model.layers["features"])
      )
    ),
    "svcca": layer_svcca["logits"],
  }


def fairness(
  labels: np.ndarray, groups: np.ndarray, predictions: np.ndarray, num_classes: int, num_groups: int
) -> Record:
  """DPD and EOD (worst case and mean over the TPR/FPR gaps). Binary tasks: the positive
  class; multiclass: one-vs-rest per class, aggregated by max and by mean over classes."""
  y, p, g = jnp.asarray(labels), jnp.asarray(predictions), jnp.asarray(groups)
  if num_classes == 2:
    return {
      "dpd": _f(pm.demographic_parity_difference(p, g, num_groups=num_groups)),
      "eod": _f(pm.equalized_odds_difference(y, p, g, num_groups=num_groups)),
      "eod_mean": _f(pm.equalized_odds_difference(y, p, g, agg="mean", num_groups=num_groups)),
    }
  out = {}
  for aggregate in ("max", "mean"):
    suffix = "" if aggregate == "max" else "_classmean"
    out[f"dpd{suffix}"] = _f(
      pm.demographic_parity_difference_multiclass(
        p, g, num_classes, aggregate=aggregate, num_groups=num_groups
      )
    )
    out[f"eod{suffix}"] = _f(
      pm.equalized_odds_difference_multiclass(
        y, p, g, num_classes, aggregate=aggregate, num_groups=num_groups
      )
    )
    out[f"eod_mean{suffix}"] = _f(
      pm.equalized_odds_difference_multiclass(
        y, p, g, num_classes, agg="mean", aggregate=aggregate, num_groups=num_groups
      )
    )
  return out


def bootstrap_intervals(
  labels: np.ndarray,
  reference: np.ndarray,
  predictions: np.ndarray,
  groups: np.ndarray | None,
  num_classes: int,
  num_groups: int,
  cfg: ml_collections.ConfigDict,
  metrics_cfg: ml_collections.ConfigDict,
  seed: int,
) -> Record:
  """Percentile bootstrap intervals ({'cev_ci': [lo, hi], ...}) with test examples resampled
  (vmapped over resamples). Resampling duplicates examples, which inflates variance-type
  statistics: the CEV interval can sit above the full-data estimate (see docs/results.md)."""
  if cfg.bootstrap_resamples <= 0:
    return {}
  key = jax.random.key(seed)
  arrays = (jnp.asarray(labels), jnp.asarray(reference), jnp.asarray(predictions))
  out = {}
  for i, name in enumerate(("cev", "sde")):
    fn = _statistic(name, num_classes, 0, metrics_cfg.zero_rate, metrics_cfg.convention)
    _, lo, hi = pm.bootstrap_ci(
      fn,
      *arrays,
      key=jax.random.fold_in(key, i),
      num_resamples=cfg.bootstrap_resamples,
      confidence=cfg.confidence,
    )
    out[f"{name}_ci"] = [_f(lo), _f(hi)]
  if groups is not None:
    for i, name in enumerate(("dpd", "eod")):
      fn = _statistic(name, num_classes, num_groups, "", "")
      _, lo, hi = pm.bootstrap_ci(
        fn,
        arrays[0],
        arrays[2],
        jnp.asarray(groups),
        key=jax.random.fold_in(key, 10 + i),
        num_resamples=cfg.bootstrap_resamples,
        confidence=cfg.confidence,
      )
      out[f"{name}_ci"] = [_f(lo), _f(hi)]
  return out


@functools.lru_cache(maxsize=None)
def _statistic(name: str, num_classes: int, num_groups: int, zero_rate: str, convention: str):
  """The bootstrapped statistic as one cached function object: `bootstrap_ci` compiles per
  function identity, so a fresh partial per model would recompile for every model."""
  if name in ("cev", "sde"):
    fn = pm.combined_error_variance if name == "cev" else pm.symmetric_distance_error
    return functools.partial(
      fn, num_classes=num_classes, zero_rate=zero_rate, convention=convention
    )
  if name == "dpd":
    if num_classes == 2:
      return lambda y, p, g: pm.demographic_parity_difference(p, g, num_groups=num_groups)
    return lambda y, p, g: pm.demographic_parity_difference_multiclass(
      p, g, num_classes, num_groups=num_groups
    )
  if num_classes == 2:
    return lambda y, p, g: pm.equalized_odds_difference(y, p, g, num_groups=num_groups)
  return lambda y, p, g: pm.equalized_odds_difference_multiclass(
    y, p, g, num_classes, num_groups=num_groups
  )


def cell_analysis(
  labels: np.ndarray,
  dense_predictions: Sequence[np.ndarray],
  member_predictions: Sequence[np.ndarray],
  num_classes: int,
  cfg: ml_collections.ConfigDict,
  seed: int,
) -> tuple[Record, np.ndarray]:
  """CIE report and class-wise significance of one cell against the dense population.

  Returns (record fields, CIE indices sorted by strength) — the indices feed the image grid.
  """
  dense = np.stack(dense_predictions)
  members = np.stack(member_predictions)
  cie = pm.cie_report(labels, dense, members, num_classes)
  out: Record = {
    "cie_fraction": _f(cie["cie_fraction"]),
    "num_cie": int(cie["num_cie"]),
    "cie_per_class": np.asarray(cie["per_class_cie_counts"]).astype(int).tolist(),
    "dense_accuracy_on_cie": _f(cie["reference_accuracy_cie"])
    if cie["reference_accuracy_cie"] is not None
    else None,
    "dense_accuracy_on_non_cie": _f(cie["reference_accuracy_non_cie"])
    if cie["reference_accuracy_non_cie"] is not None
    else None,
    "pruned_accuracy_on_cie": _f(cie["compressed_accuracy_cie"])
    if cie["compressed_accuracy_cie"] is not None
    else None,
    "pruned_accuracy_on_non_cie": _f(cie["compressed_accuracy_non_cie"])
    if cie["compressed_accuracy_non_cie"] is not None
    else None,
    "num_dense_models": int(dense.shape[0]),
  }
  if dense.shape[0] >= 2 and members.shape[0] >= 2:
    y = jnp.asarray(labels)
    sig = pm.classwise_significance(
      pm.per_class_accuracy(y, jnp.asarray(dense), num_classes),
      pm.per_class_accuracy(y, jnp.asarray(members), num_classes),
      key=jax.random.key(seed),
      q=cfg.fdr_q,
      num_permutations=cfg.permutations,
    )
    out.update(
      {
        "significant_fraction_welch": _f(sig.fraction_significant_welch),
        "significant_fraction_permutation": _f(sig.fraction_significant_permutation),
        "significant_classes_welch": np.flatnonzero(np.asarray(sig.welch_rejected)).tolist(),
        "welch_p_adjusted": [_f(v) for v in np.asarray(sig.welch_p_adjusted)],
      }
    )
  else:
    out["significance"] = (
      f"not computed: needs >= 2 dense and >= 2 pruned models per cell "
      f"(have {dense.shape[0]} and {members.shape[0]}; set analysis.dense_seeds and seeds)"
    )
  return out, np.asarray(cie["cie_indices"])


SIMILARITIES = ("cka", "cka_debiased", "agreement", "svcca")
BIASES = ("cev", "sde")


def correlations(
  records: Sequence[Record], cfg: ml_collections.ConfigDict, seed: int
) -> list[Record]:
  """Pearson and Spearman correlation of each similarity with each bias measure across all
  pruned models of the run, with bootstrap intervals over models."""
  pruned = [r for r in records if r["method"] != "dense"]
  rows = []
  if len(pruned) < 3:
    return rows
  key = jax.random.key(seed)
  for i, sim in enumerate(SIMILARITIES):
    for j, bias in enumerate(BIASES):
      pairs = [(r.get(sim), r.get(bias)) for r in pruned]
      pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
      if len(pairs) < 3:
        continue
      x, y = (jnp.asarray(v, jnp.float32) for v in zip(*pairs))
      row: Record = {"similarity": sim, "bias": bias, "n": len(pairs)}
      for k, method in enumerate(("pearson", "spearman")):
        r, lo, hi = pm.correlation_ci(
          x,
          y,
          method=method,
          key=jax.random.fold_in(key, 100 * i + 10 * j + k),
          num_resamples=cfg.correlation_resamples,
          confidence=cfg.confidence,
        )
        row[method] = [_f(r), _f(lo), _f(hi)]
      rows.append(row)
  return rows


def correlation_table(rows: Sequence[Record]) -> str:
  """Markdown: r [low, high] per similarity × bias."""
  if not rows:
    return "Too few pruned models (< 3) for similarity–bias correlations.\n"
  fmt = lambda v: (
    "–"
    if v[0] is None
    else f"{v[0]:+.3f} [{v[1]:+.2f}, {v[2]:+.2f}]"
    if v[1] is not None
    else f"{v[0]:+.3f}"
  )
  lines = ["| similarity | bias | n | Pearson r [CI] | Spearman ρ [CI] |", "|---|---|---|---|---|"]
  for row in rows:
    lines.append(
      f"| {row['similarity']} | {row['bias']} | {row['n']} | {fmt(row['pearson'])} | {fmt(row['spearman'])} |"
    )
  return "\n".join(lines) + "\n"
