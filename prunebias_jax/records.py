"""Records: what a run concludes from its models' test-set outputs, as JSON-ready dicts.

- per model (`model_record`): accuracy, per-class FPR/FNR and their change vs the dense
  reference, CEV and SDE, linear/debiased CKA and SVCCA with the dense model at every layer,
  prediction agreement, group fairness (DPD/EOD) where the dataset has a sensitive attribute,
  and bootstrap intervals of CEV, SDE (and DPD, EOD) with test examples resampled;
- per cell (`cell_records`; a cell's seeds are a population): CEV/SDE from the seed-averaged
  rates, mean ± std over seeds, Compression Identified Exemplars against the dense
  population, and class-wise significance when both populations have ≥ 2 models;
- per run (`correlations`): Pearson/Spearman correlation of similarity with bias.

Definitions: docs/metrics.md and `prunebias_jax.metrics`. One rule for numbers: floats are
rounded to 6 digits, and a non-finite value is written as None (JSON null), with the reason
in the record's `undefined_metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from prunebias_jax import metrics as pm
from prunebias_jax.faults import crash_point
from prunebias_jax.pruning import mask_sparsity, sparsity_report

Record = dict[str, Any]


def number(x: Any, digits: int = 6) -> float | list | None:
  """A float rounded to `digits` (a list for an array); None where not finite."""
  a = np.asarray(x, np.float64)
  if a.ndim:
    return [number(v, digits) for v in a]
  v = float(a)
  return round(v, digits) if np.isfinite(v) else None


@dataclasses.dataclass
class Outputs:
  """One model's evaluation on the full test set (host arrays; `device` uploads them once)."""

  predictions: np.ndarray  # (n,) int32
  logits: np.ndarray  # (n, C)
  layers: dict[str, np.ndarray]  # name → (n, d); 'features' is the penultimate layer

  def similarity_layers(self) -> dict[str, np.ndarray]:
    return {**self.layers, "logits": self.logits}

  @functools.cached_property
  def device(self) -> dict[str, jax.Array]:
    """The similarity layers and 'predictions' as device arrays, uploaded on first use."""
    return {
      **{k: jnp.asarray(v) for k, v in self.similarity_layers().items()},
      "predictions": jnp.asarray(self.predictions),
    }


class Reference(NamedTuple):
  """The test set and the dense teacher every model is compared with."""

  labels: np.ndarray
  groups: np.ndarray | None
  num_classes: int
  num_groups: int
  outputs: Outputs  # the teacher's
  fairness: Record | None  # the teacher's DPD/EOD (None without groups)
  device_labels: jax.Array


def reference(labels: np.ndarray, groups: np.ndarray | None, num_classes: int, teacher: Outputs):
  """The comparison point of every record (the teacher's outputs on the test set)."""
  num_groups = int(groups.max()) + 1 if groups is not None else 0
  fair = None
  if groups is not None:
    fair = fairness(labels, groups, teacher.predictions, num_classes, num_groups)
  return Reference(labels, groups, num_classes, num_groups, teacher, fair, jnp.asarray(labels))


# ------------------------------------------------------------------------------------ per model
def bias(ref: Reference, predictions: jax.Array, metrics_cfg: ml_collections.ConfigDict) -> Record:
  """CEV, SDE, the per-class changes and the zero-rate count of `predictions` ((n,) for one
  model or (K, n) for a population, whose rates are averaged first) against the teacher."""
  change = pm.relative_rate_change(
    ref.device_labels,
    ref.outputs.device["predictions"],
    predictions,
    ref.num_classes,
    zero_rate=metrics_cfg.zero_rate,
    convention=metrics_cfg.convention,
  )
  args = (change.dfpr, change.dfnr, change.valid)
  return {
    "cev": number(pm.cev_from_changes(*args, convention=metrics_cfg.convention)),
    "sde": number(pm.sde_from_changes(*args, convention=metrics_cfg.convention)),
    "dfpr": number(change.dfpr),
    "dfnr": number(change.dfnr),
    "zero_rate_classes": int(change.num_zero_rate_classes),
  }


def model_record(
  ref: Reference, model: Outputs, seed: int, config: ml_collections.ConfigDict
) -> Record:
  """Metrics of one model against the dense teacher (all on the full test set)."""
  crash_point("compare")
  preds = model.device["predictions"]
  rates = pm.per_class_rates(ref.device_labels, preds, ref.num_classes)
  change = bias(ref, preds, config.metrics)
  record = {
    "accuracy": number(np.mean(model.predictions == ref.labels)),
    "cev": change["cev"],
    "sde": change["sde"],
    "cka": number(pm.linear_cka(ref.outputs.device["features"], model.device["features"])),
    "agreement": number(pm.prediction_agreement(ref.outputs.device["predictions"], preds)),
    "zero_rate_classes": change["zero_rate_classes"],
    "per_class_recall": number(1.0 - np.asarray(rates.fnr)),
    "fpr": number(rates.fpr),
    "fnr": number(rates.fnr),
    "dfpr": change["dfpr"],
    "dfnr": change["dfnr"],
    **similarity_by_layer(ref.outputs, model, config.analysis.svcca_examples),
  }
  if ref.groups is not None:
    fair = fairness(ref.labels, ref.groups, model.predictions, ref.num_classes, ref.num_groups)
    record.update(fair)
    record.update(
      {
        f"{k}_change": None
        if v is None or ref.fairness[k] is None
        else round(v - ref.fairness[k], 6)
        for k, v in fair.items()
      }
    )
  record.update(
    bootstrap_intervals(
      ref.labels,
      ref.outputs.predictions,
      model.predictions,
      ref.groups,
      ref.num_classes,
      ref.num_groups,
      config.analysis,
      config.metrics,
      seed,
    )
  )
  return record


def full_record(
  ref: Reference,
  model: Outputs,
  identity: Record,
  config: ml_collections.ConfigDict,
  params: Any,
  masks: Any | None = None,
) -> Record:
  """One results.jsonl record: `identity` (model, dataset, method, sparsity, kd, temperature,
  seed, ...), the model's metrics against the teacher and its sparsity; metrics that are
  undefined are named with the reason (and logged)."""
  record = {
    **identity,
    **model_record(ref, model, identity["seed"], config),
    **sparsity_fields(params, masks),
  }
  if identity["method"] == "dense":
    what = f"dense seed {identity['seed']}"
  else:
    label = f"KD T={identity['temperature']:g}" if identity["kd"] else "CE"
    what = f"{identity['method']} s={identity['sparsity']:g} {label} seed {identity['seed']}"
  return note_undefined(record, what)


def sparsity_fields(params: Any, masks: Any | None = None) -> Record:
  """Realised sparsity of the kernels (and the sparsity the masks encode, for pruned models)."""
  realized = sparsity_report(params)
  out = {} if masks is None else {"target_sparsity": number(mask_sparsity(masks)["global"])}
  out["realized_sparsity"] = number(realized["global"])
  out["realized_sparsity_per_layer"] = {k: number(v) for k, v in realized["per_layer"].items()}
  return out


def similarity_by_layer(reference: Outputs, model: Outputs, svcca_examples: int) -> Record:
  """{'layer_cka', 'layer_svcca': {layer: value}, 'cka_debiased', 'svcca'} against the
  reference. SVCCA uses the first `svcca_examples` test examples (the authors used 6,400);
  'svcca' is the SVCCA distance of the logits, the layer the authors plotted against CEV."""
  ref_layers, layers = reference.device, model.device
  m = svcca_examples or reference.logits.shape[0]
  layer_cka, layer_svcca = {}, {}
  for name in sorted(reference.similarity_layers()):
    x, y = ref_layers[name], layers[name]
    layer_cka[name] = number(pm.linear_cka(x, y))
    layer_svcca[name] = number(pm.svcca_distance(x[:m], y[:m]))
  return {
    "layer_cka": layer_cka,
    "layer_svcca": layer_svcca,
    "cka_debiased": number(pm.debiased_linear_cka(ref_layers["features"], layers["features"])),
    "svcca": layer_svcca["logits"],
  }


def fairness(
  labels: np.ndarray,
  groups: np.ndarray,
  predictions: np.ndarray,
  num_classes: int,
  num_groups: int,
) -> Record:
  """DPD and EOD (worst case and mean over the TPR/FPR gaps). Binary tasks: the positive
  class; multiclass: one-vs-rest per class, aggregated by max and by mean over classes."""
  y, p, g = jnp.asarray(labels), jnp.asarray(predictions), jnp.asarray(groups)
  if num_classes == 2:
    return {
      "dpd": number(pm.demographic_parity_difference(p, g, num_groups=num_groups)),
      "eod": number(pm.equalized_odds_difference(y, p, g, num_groups=num_groups)),
      "eod_mean": number(pm.equalized_odds_difference(y, p, g, agg="mean", num_groups=num_groups)),
    }
  out = {}
  for aggregate in ("max", "mean"):
    suffix = "" if aggregate == "max" else "_classmean"
    kw = dict(aggregate=aggregate, num_groups=num_groups)
    out[f"dpd{suffix}"] = number(
      pm.demographic_parity_difference_multiclass(p, g, num_classes, **kw)
    )
    out[f"eod{suffix}"] = number(
      pm.equalized_odds_difference_multiclass(y, p, g, num_classes, **kw)
    )
    out[f"eod_mean{suffix}"] = number(
      pm.equalized_odds_difference_multiclass(y, p, g, num_classes, agg="mean", **kw)
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
  kw = dict(num_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence)
  out = {}
  for i, name in enumerate(("cev", "sde")):
    fn = _statistic(name, num_classes, 0, metrics_cfg.zero_rate, metrics_cfg.convention)
    _, lo, hi = pm.bootstrap_ci(fn, *arrays, key=jax.random.fold_in(key, i), **kw)
    out[f"{name}_ci"] = [number(lo), number(hi)]
  if groups is not None:
    for i, name in enumerate(("dpd", "eod")):
      fn = _statistic(name, num_classes, num_groups, "", "")
      g = jnp.asarray(groups)
      _, lo, hi = pm.bootstrap_ci(
        fn, arrays[0], arrays[2], g, key=jax.random.fold_in(key, 10 + i), **kw
      )
      out[f"{name}_ci"] = [number(lo), number(hi)]
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


# Why a headline metric can be undefined (docs/metrics.md: no NaN is printed silently).
UNDEFINED_REASONS = {
  "cev": "no class has a defined rate change (metrics.zero_rate='exclude' dropped every class)",
  "sde": "no class has a defined rate change (metrics.zero_rate='exclude' dropped every class)",
  "cka": "the penultimate features contain NaN/Inf",
  "cka_debiased": "constant features or fewer than 4 test examples (the unbiased HSIC "
  "denominator is not positive)",
  "svcca": "constant logits or fewer than 2 examples (analysis.svcca_examples)",
}


def undefined_metrics(record: Record) -> dict[str, str]:
  """{metric: reason} for the headline metrics of `record` that are not finite numbers."""
  out = {}
  for field, reason in UNDEFINED_REASONS.items():
    if field not in record:
      continue
    v = record[field]
    if v is None or isinstance(v, str) or not np.isfinite(v):
      out[field] = reason
  return out


def note_undefined(record: Record, what: str) -> Record:
  """Adds `undefined_metrics` to the record and says so in the log, when there are any."""
  undefined = undefined_metrics(record)
  if undefined:
    record["undefined_metrics"] = undefined
    for field, reason in undefined.items():
      logging.warning(
        "%s: %s is undefined (%s); results.jsonl records it as %r",
        what,
        field,
        reason,
        record[field],
      )
  return record


# ------------------------------------------------------------------------------------ per cell
SEED_FIELDS = (
  "accuracy",
  "cev",
  "sde",
  "cka",
  "cka_debiased",
  "svcca",
  "agreement",
  "realized_sparsity",
  "dpd",
  "eod",
  "dpd_change",
  "eod_change",
)
CellKey = tuple[str, float, bool, Any]  # (method, sparsity, kd, temperature)


def cell_records(
  ref: Reference,
  dense_outputs: Sequence[Outputs],
  records: Sequence[Record],
  outputs: Mapping[CellKey, Sequence[Outputs]],
  config: ml_collections.ConfigDict,
) -> tuple[list[Record], dict[CellKey, np.ndarray]]:
  """One record per (method, sparsity, kd, temperature), in the order of `outputs`: CEV/SDE
  from the per-class rates averaged over the cell's seeds, mean ± std over seeds of the
  per-model values, CIE against the dense population and class-wise significance.

  Also returns each cell's CIE indices, strongest first (they feed the image grid)."""
  cells, cie_indices = [], {}
  dense_predictions = [o.predictions for o in dense_outputs]
  for i, (key, outs) in enumerate(outputs.items()):
    method, sparsity, kd, temperature = key
    members = [r for r in records if (r["method"], r["sparsity"], r["kd"], r["temperature"]) == key]
    preds = np.stack([o.predictions for o in outs])
    change = bias(ref, jnp.asarray(preds), config.metrics)
    cell = {
      "method": method,
      "sparsity": sparsity,
      "kd": kd,
      "temperature": temperature,
      "seeds": [r["seed"] for r in members],
      **change,
    }
    for field in SEED_FIELDS:
      values = np.array([r[field] for r in members if r.get(field) is not None], np.float64)
      if values.size:
        cell[f"{field}_seed_mean"] = number(values.mean())
        cell[f"{field}_seed_std"] = number(values.std(ddof=1) if values.size > 1 else 0.0)
    extra, cie_indices[key] = cell_analysis(
      ref.labels, dense_predictions, list(preds), ref.num_classes, config.analysis, config.seed + i
    )
    cell.update(extra)
    cells.append(cell)
  return cells, cie_indices


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
  optional = lambda v: None if v is None else number(v)
  out: Record = {
    "cie_fraction": optional(cie["cie_fraction"]),
    "num_cie": int(cie["num_cie"]),
    "cie_per_class": np.asarray(cie["per_class_cie_counts"]).astype(int).tolist(),
    "dense_accuracy_on_cie": optional(cie["reference_accuracy_cie"]),
    "dense_accuracy_on_non_cie": optional(cie["reference_accuracy_non_cie"]),
    "pruned_accuracy_on_cie": optional(cie["compressed_accuracy_cie"]),
    "pruned_accuracy_on_non_cie": optional(cie["compressed_accuracy_non_cie"]),
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
        "significant_fraction_welch": number(sig.fraction_significant_welch),
        "significant_fraction_permutation": number(sig.fraction_significant_permutation),
        "significant_classes_welch": np.flatnonzero(np.asarray(sig.welch_rejected)).tolist(),
        "welch_p_adjusted": [number(v) for v in np.asarray(sig.welch_p_adjusted)],
      }
    )
  else:
    out["significance"] = (
      f"not computed: needs >= 2 dense and >= 2 pruned models per cell "
      f"(have {dense.shape[0]} and {members.shape[0]}; set analysis.dense_seeds and seeds)"
    )
  return out, np.asarray(cie["cie_indices"])


class Showcase(NamedTuple):
  """What the report shows of one cell: the cell with the most CIEs, its CIE indices
  (strongest first) with the dense and compressed modal labels, and its first member's
  layer-by-layer linear CKA with the dense teacher."""

  cell: Record
  cie_indices: np.ndarray
  dense_predictions: np.ndarray  # the teacher's
  compressed_modes: np.ndarray
  layer_cka: np.ndarray  # (layers, layers): dense rows, compressed columns
  layer_names: list[str]


def showcase(
  ref: Reference,
  cells: Sequence[Record],
  cie_indices: Mapping[CellKey, np.ndarray],
  outputs: Mapping[CellKey, Sequence[Outputs]],
) -> Showcase:
  top = max(cells, key=lambda c: (c["num_cie"], c["sparsity"]))
  key = (top["method"], top["sparsity"], top["kd"], top["temperature"])
  members = outputs[key]
  modes = pm.modal_predictions(np.stack([o.predictions for o in members]), ref.num_classes)
  names = sorted(ref.outputs.similarity_layers())
  matrix = pm.cka_matrix(
    [ref.outputs.device[n] for n in names], [members[0].device[n] for n in names]
  )
  return Showcase(
    top,
    cie_indices[key],
    ref.outputs.predictions,
    np.asarray(modes),
    np.asarray(matrix),
    names,
  )


# ------------------------------------------------------------------------------------ per run
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
    for j, bias_name in enumerate(BIASES):
      pairs = [(r.get(sim), r.get(bias_name)) for r in pruned]
      pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
      if len(pairs) < 3:
        continue
      x, y = (jnp.asarray(v, jnp.float32) for v in zip(*pairs))
      row: Record = {"similarity": sim, "bias": bias_name, "n": len(pairs)}
      for k, method in enumerate(("pearson", "spearman")):
        r, lo, hi = pm.correlation_ci(
          x,
          y,
          method=method,
          key=jax.random.fold_in(key, 100 * i + 10 * j + k),
          num_resamples=cfg.correlation_resamples,
          confidence=cfg.confidence,
        )
        row[method] = [number(r), number(lo), number(hi)]
      rows.append(row)
  return rows
