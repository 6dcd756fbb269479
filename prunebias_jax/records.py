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
from prunebias_jax.data import stratified_subset
from prunebias_jax.faults import crash_point
from prunebias_jax.pruning import mask_sparsity, sparsity_report
from prunebias_jax.quantization import model_bytes

Record = dict[str, Any]
ArrayLike = Any


def number(x: Any, digits: int = 6) -> float | list | None:
  """A float rounded to `digits` (a list for an array); None where not finite."""
  a = np.asarray(x, np.float64)
  if a.ndim:
    return [number(v, digits) for v in a]
  v = float(a)
  return round(v, digits) if np.isfinite(v) else None


# A model's similarity to the reference, per layer ('logits', 'features', 'stage1', ...): the
# sums over every test example (CKA) and over the SVCCA subset (`metrics.streaming`).
Similarity = dict[str, tuple[pm.streaming.SimilarityStats, pm.streaming.SimilarityStats]]


class LayerCKA(NamedTuple):
  """Linear CKA of every (reference layer, model layer) pair, layers in depth order."""

  names: list[str]
  matrix: np.ndarray  # (layers, layers): reference rows, model columns


@dataclasses.dataclass
class Outputs:
  """One model's evaluation on the full test set (host arrays; `device` uploads them once)."""

  predictions: np.ndarray  # (n,) int32
  logits: np.ndarray | None  # (n, C); None for an audit of predictions alone
  # Against the run's reference (the dense teacher), accumulated during the evaluation pass;
  # None where no features were seen (an audit, a unit read back from its file).
  similarity: Similarity | None = None
  layer_cka: LayerCKA | None = None  # kept in the unit's file: the report's CKA heatmap
  # analysis.svcca_conv: stage name → (m, h, w, c) maps of the m SVCCA examples, pooled.
  maps: dict[str, np.ndarray] | None = None
  # (C, C) counts [true, predicted] accumulated in the evaluation pass (None: an audit);
  # the records' rates and CEV/SDE come from them.
  confusion: np.ndarray | None = None

  def without_maps(self) -> Outputs:
    """The same outputs without the spatial maps: what a run keeps once the model's record
    is written (the maps of a ResNet-20 on 6,400 examples are about 0.4 GB)."""
    return dataclasses.replace(self, maps=None)

  @functools.cached_property
  def device(self) -> dict[str, jax.Array]:
    """'predictions' as a device array, uploaded on first use."""
    return {"predictions": jnp.asarray(self.predictions)}


def layer_cka_of(similarity: Similarity, joint: pm.streaming.SimilarityStats) -> LayerCKA:
  """The layer × layer CKA of a model against the reference from the sums of all its layers
  concatenated in sorted name order (`joint`, as `make_compare_fn` accumulates them)."""
  names = sorted(similarity)
  dims_x = [similarity[n][0].shift_x.shape[-1] for n in names]
  dims_y = [similarity[n][0].shift_y.shape[-1] for n in names]
  matrix = pm.streaming.cka_matrix_from_stats(joint, dims_x, dims_y)
  order = sorted(range(len(names)), key=lambda i: depth_order(names[i]))
  return LayerCKA([names[i] for i in order], matrix[np.ix_(order, order)])


def similarity_of(
  reference_layers: dict[str, ArrayLike], layers: dict[str, ArrayLike], svcca_index: np.ndarray
) -> tuple[Similarity, LayerCKA]:
  """`Outputs.similarity` and `.layer_cka` of features already in memory ({layer: (n, d)} of
  the reference and of the model, the same layers): what the evaluation pass accumulates,
  streamed in batches from the arrays (for features computed elsewhere, and tests)."""
  if set(reference_layers) != set(layers):
    raise ValueError(
      f"layers {sorted(layers)} differ from the reference's {sorted(reference_layers)}"
    )
  similarity = {}
  n = len(next(iter(layers.values())))
  subset = np.zeros(n, np.float32)
  subset[np.asarray(svcca_index)] = 1.0
  for name, x in reference_layers.items():
    similarity[name] = (
      pm.streaming.similarity_stats(x, layers[name]),
      pm.streaming.similarity_stats(x, layers[name], weights=subset),
    )
  flat = lambda tree: np.concatenate(
    [np.asarray(tree[k], np.float32).reshape(n, -1) for k in sorted(tree)], axis=1
  )
  joint = pm.streaming.similarity_stats(flat(reference_layers), flat(layers))
  return similarity, layer_cka_of(similarity, joint)


class Reference(NamedTuple):
  """The test set and the dense teacher every model is compared with."""

  labels: np.ndarray
  groups: np.ndarray | None
  num_classes: int
  num_groups: int
  outputs: Outputs  # the teacher's
  fairness: Record | None  # the teacher's DPD/EOD (None without groups)
  device_labels: jax.Array
  svcca_index: np.ndarray  # the test examples SVCCA sees (a seeded, stratified subset)


def reference(
  labels: np.ndarray,
  groups: np.ndarray | None,
  num_classes: int,
  teacher: Outputs,
  svcca_examples: int = 0,
  seed: int = 0,
) -> Reference:
  """The comparison point of every record (the teacher's outputs on the test set).

  SVCCA runs on a seeded subset of `svcca_examples` test examples stratified by class (the
  authors used 6,400 of a shuffled CIFAR test set; a split stored class by class must never
  be cut at its first n), or on all of them when 0 or when the test set is smaller."""
  num_groups = int(groups.max()) + 1 if groups is not None else 0
  fair = None
  if groups is not None:
    fair = fairness(labels, groups, teacher.predictions, num_classes, num_groups)
  index = svcca_subset(labels, svcca_examples, seed)
  if teacher.maps is not None:
    rows = {len(v) for v in teacher.maps.values()}
    if rows != {len(index)}:  # the maps must be of exactly these examples
      raise ValueError(f"maps of {rows} examples for an SVCCA subset of {len(index)}")
  return Reference(
    labels, groups, num_classes, num_groups, teacher, fair, jnp.asarray(labels), index
  )


def svcca_subset(labels: np.ndarray, svcca_examples: int, seed: int) -> np.ndarray:
  """The sorted indices of the test examples SVCCA sees (see `reference`)."""
  return stratified_subset(labels, svcca_examples, seed=(seed, SVCCA_SUBSET_STREAM))


SVCCA_SUBSET_STREAM = 7  # the subset's own random stream, apart from the data subsets'
SVCCA_RULES = {"anatome": True, "centered": False}  # rule → svcca_distance(anatome_compat=)


# ------------------------------------------------------------------------------------ per model
def bias(
  ref: Reference,
  predictions: jax.Array,
  metrics_cfg: ml_collections.ConfigDict,
  confusion: np.ndarray | None = None,
) -> Record:
  """CEV, SDE, the per-class changes and the zero-rate count of `predictions` ((n,) for one
  model or (K, n) for a population, whose rates are averaged first) against the teacher.

  Beside the configured zero-rate rule, `cev_exclude`/`sde_exclude` always give the values
  with zero-reference-rate classes dropped, and `floor_decides` flags a record where more
  than a third of the classes hit the rule: then the rule, not the data, sets CEV."""

  def change_under(zero_rate: str):
    if confusion is not None:  # the counts of the evaluation pass (the same values)
      return pm.relative_rate_change_from_confusion(
        ref.outputs.confusion, confusion, zero_rate=zero_rate, convention=metrics_cfg.convention
      )
    return pm.relative_rate_change(
      ref.device_labels,
      ref.outputs.device["predictions"],
      predictions,
      ref.num_classes,
      zero_rate=zero_rate,
      convention=metrics_cfg.convention,
    )

  def cev_sde(change) -> tuple:
    args = (change.dfpr, change.dfnr, change.valid)
    kw = dict(convention=metrics_cfg.convention)
    return number(pm.cev_from_changes(*args, **kw)), number(pm.sde_from_changes(*args, **kw))

  change = change_under(metrics_cfg.zero_rate)
  cev, sde = cev_sde(change)
  excluded = change if metrics_cfg.zero_rate == "exclude" else change_under("exclude")
  cev_exclude, sde_exclude = cev_sde(excluded)
  zero = int(change.num_zero_rate_classes)
  return {
    "cev": cev,
    "sde": sde,
    "cev_exclude": cev_exclude,
    "sde_exclude": sde_exclude,
    "dfpr": number(change.dfpr),
    "dfnr": number(change.dfnr),
    "zero_rate_classes": zero,
    "floor_decides": zero * 3 > ref.num_classes,
  }


def model_record(
  ref: Reference, model: Outputs, seed: int, config: ml_collections.ConfigDict
) -> Record:
  """Metrics of one model against the dense teacher (all on the full test set)."""
  crash_point("compare")
  similarity = similarity_by_layer(ref.outputs, model, ref.svcca_index, config.analysis.svcca_rule)
  return {
    **prediction_record(ref, model.predictions, seed, config, model.confusion),
    "cka": similarity["layer_cka"]["features"],  # the headline: the penultimate layer's
    **similarity,
    "svcca_examples_per_class": np.bincount(
      ref.labels[ref.svcca_index], minlength=ref.num_classes
    ).tolist(),
  }


def prediction_record(
  ref: Reference,
  predictions: np.ndarray,
  seed: int,
  config: ml_collections.ConfigDict,
  confusion: np.ndarray | None = None,
) -> Record:
  """What one model's test predictions alone give against the reference: accuracy, per-class
  rates and their changes, CEV/SDE (both zero-rate rules), agreement, DPD/EOD with their change
  (with groups) and the bootstrap intervals (resamples drawn from `seed`). A run's records and
  an audit of predictions from elsewhere (`prunebias_jax.audit`) both come from here.

  `confusion`: the model's counts from the evaluation pass; with the reference's, accuracy,
  rates and CEV/SDE come from them (equal to the values from the predictions: the same
  integers), else from the predictions."""
  predictions = np.asarray(predictions)
  preds = jnp.asarray(predictions)
  counted = confusion is not None and ref.outputs.confusion is not None
  confusion = confusion if counted else None
  if counted:
    rates = pm.rates_from_confusion(confusion)
    accuracy = np.trace(confusion) / len(ref.labels)
  else:
    rates = pm.per_class_rates(ref.device_labels, preds, ref.num_classes)
    accuracy = np.mean(predictions == ref.labels)
  record = {
    "accuracy": number(accuracy),
    **bias(ref, preds, config.metrics, confusion),
    "agreement": number(pm.prediction_agreement(ref.outputs.device["predictions"], preds)),
    "per_class_recall": number(1.0 - np.asarray(rates.fnr)),
    "fpr": number(rates.fpr),
    "fnr": number(rates.fnr),
  }
  if ref.groups is not None:
    fair = fairness(ref.labels, ref.groups, predictions, ref.num_classes, ref.num_groups)
    record.update(fair)
    record["per_group_accuracy"] = per_group_accuracy(
      ref.labels, predictions, ref.groups, ref.num_groups
    )
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
      predictions,
      ref.groups,
      ref.num_classes,
      ref.num_groups,
      config.analysis,
      config.metrics,
      seed,
    )
  )
  return record


def per_group_accuracy(
  labels: np.ndarray, predictions: np.ndarray, groups: np.ndarray, num_groups: int
) -> list[float | None]:
  """Accuracy on the test examples of each group (None for a group without examples)."""
  correct = np.bincount(groups, weights=predictions == labels, minlength=num_groups)
  sizes = np.bincount(groups, minlength=num_groups)
  return [number(c / n) if n else None for c, n in zip(correct, sizes)]


def distill_of(record: Record) -> str | None:
  """The record's fine-tuning method ('ce', 'kd', 'sp', 'sp+kd', ...; None for a dense or an
  audited model; records written before the `distill` field were CE or KD)."""
  if "distill" in record:
    return record["distill"]
  return "kd" if record["kd"] else "ce"


def student_label(record: Record) -> str:
  """'CE', 'KD T=<t>', 'SP' or 'SP+KD T=<t>': how logs, tables and plots name a record's
  fine-tuning."""
  name = (distill_of(record) or "ce").upper()
  return f"{name} T={record['temperature']:g}" if record["kd"] else name


def full_record(
  ref: Reference,
  model: Outputs,
  identity: Record,
  config: ml_collections.ConfigDict,
  variables: Mapping[str, Any],
  masks: Any | None = None,
  training: Mapping[str, Any] | None = None,
  scheme: str | None = None,
) -> Record:
  """One results.jsonl record: `identity` (model, dataset, method, sparsity, kd, temperature,
  seed, ...), the model's metrics against the teacher, the sparsity of `variables['params']`
  and the deployed size of `variables` quantized by `scheme` (`model_bytes`:
  `quantization.model_bytes`); metrics that are undefined are named with the reason (and
  logged). `training` (its checkpoint's metadata)
  adds `nonfinite_steps` when steps were skipped (nonfinite='skip'), and
  `every_step_skipped` when no update was ever applied: an untrained model, not a result."""
  record = {
    **identity,
    **model_record(ref, model, identity["seed"], config),
    **sparsity_fields(variables["params"], masks),
    "model_bytes": model_bytes(variables, scheme),
  }
  what = model_name(identity)
  skipped = int((training or {}).get("nonfinite_steps", 0))
  if skipped:
    run = int(training["steps"]) - int(training.get("resumed_at_step", 0))
    record["nonfinite_steps"] = skipped
    record["every_step_skipped"] = skipped >= run and not training.get("resumed_at_step")
    logging.warning(
      "%s: %d of its %d training steps were skipped (non-finite loss)%s",
      what,
      skipped,
      run,
      ": no update was ever applied, it is an untrained model"
      if record["every_step_skipped"]
      else "",
    )
  return note_undefined(record, what)


def model_name(identity: Record) -> str:
  """'dense seed 1' or 'random s=0.5 KD T=4 seed 0': how logs and notes name a model."""
  if identity["method"] == "dense":
    return f"dense seed {identity['seed']}"
  label = student_label(identity)
  return f"{identity['method']} s={identity['sparsity']:g} {label} seed {identity['seed']}"


def sparsity_fields(params: Any, masks: Any | None = None) -> Record:
  """Realised sparsity of the kernels (and the sparsity the masks encode, for pruned models)."""
  realized = sparsity_report(params)
  out = {} if masks is None else {"target_sparsity": number(mask_sparsity(masks)["global"])}
  out["realized_sparsity"] = number(realized["global"])
  out["realized_sparsity_per_layer"] = {k: number(v) for k, v in realized["per_layer"].items()}
  return out


def similarity_by_layer(
  reference: Outputs, model: Outputs, svcca_index: np.ndarray, svcca_rule: str = "anatome"
) -> Record:
  """{'layer_cka', 'layer_svcca': {layer: value}, 'cka_debiased', 'svcca'} of `model` against
  the reference its similarity sums were accumulated with. CKA uses every test example; SVCCA
  the examples `svcca_index` (see `reference`) under `svcca_rule` ('anatome': the authors'
  library's centring and count of kept directions; 'centered': centre before the SVD, keep one
  more direction). 'svcca' is the SVCCA distance of the logits, the layer the authors plotted
  against CEV. All from the d × d sums (`metrics.streaming`), in float64.

  When both outputs carry spatial maps (analysis.svcca_conv), 'layer_svcca_conv' adds the
  per-position convolutional SVCCA of each stage output, as the authors computed layers 1–3:
  one SVCCA per spatial position of the pooled maps over the same examples, averaged."""
  if model.similarity is None:
    raise ValueError("these outputs carry no similarity sums (an audit or a stored unit)")
  compat = SVCCA_RULES[svcca_rule]
  layer_cka, layer_svcca = {}, {}
  for name, (every, subset) in sorted(model.similarity.items()):
    layer_cka[name] = number(pm.streaming.linear_cka_from_stats(every))
    layer_svcca[name] = number(pm.streaming.svcca_from_stats(subset, anatome_compat=compat))
  out = {
    "layer_cka": layer_cka,
    "layer_svcca": layer_svcca,
    "cka_debiased": number(pm.streaming.debiased_cka_from_stats(model.similarity["features"][0])),
    "svcca": layer_svcca["logits"],
  }
  if reference.maps is not None and model.maps is not None:
    out["layer_svcca_conv"] = {
      # The maps are already pooled to the configured size: `size` here resizes nothing.
      name: number(
        pm.svcca_conv_distance(x, model.maps[name], size=max(x.shape[1:3]), anatome_compat=compat)
      )
      for name, x in sorted(reference.maps.items())
    }
  return out


def debiased_cka(x: jax.Array, y: jax.Array) -> float | None:
  """Debiased CKA, or None (undefined, see UNDEFINED_REASONS) below the 4 examples its
  unbiased HSIC estimator needs."""
  return number(pm.debiased_linear_cka(x, y)) if x.shape[0] >= 4 else None


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
  """Bootstrap intervals ({'cev_ci': [lo, hi], ...}; `analysis.bootstrap_interval`:
  percentile, BCa or basic) with test examples resampled (vmapped over resamples): test-set
  noise of one model, not seed variability (see the cells' seed intervals). Resampling
  duplicates examples, which inflates variance-type statistics: the percentile CEV interval
  can sit above the full-data estimate (BCa corrects for that bias)."""
  if cfg.bootstrap_resamples <= 0:
    return {}
  key = jax.random.key(seed)
  arrays = (jnp.asarray(labels), jnp.asarray(reference), jnp.asarray(predictions))
  kw = dict(
    num_resamples=cfg.bootstrap_resamples,
    confidence=cfg.confidence,
    method=cfg.bootstrap_interval,
  )
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
CellKey = tuple[str, float, bool, Any, str]  # (method, sparsity, kd, temperature, distill)


def cell_records(
  ref: Reference,
  dense_outputs: Sequence[Outputs],
  records: Sequence[Record],
  outputs: Mapping[CellKey, Sequence[Outputs]],
  config: ml_collections.ConfigDict,
) -> tuple[list[Record], dict[CellKey, np.ndarray]]:
  """One record per (method, sparsity, kd, temperature, distill), in the order of `outputs`:
  CEV/SDE from the per-class rates averaged over the cell's seeds, mean ± std and a t-interval
  over seeds of the per-model values, CIE against the dense population, class-wise
  significance against the dense population and, for every cell fine-tuned otherwise than
  with CE, against its CE cell (paired by seed), and the paired CE − this differences of CEV
  and SDE with a sign test and a Wilcoxon test; a feature-distillation cell is also paired
  with the KD cell at kd.temperature (`paired_vs_kd`: KD − this).

  Also returns each cell's CIE indices, strongest first (they feed the image grid)."""
  cells, cie_indices = [], {}
  dense_predictions = np.stack([o.predictions for o in dense_outputs])
  confidence = config.analysis.confidence
  for i, (key, outs) in enumerate(outputs.items()):
    method, sparsity, kd, temperature, distill = key
    members = [r for r in records if cell_key(r) == key]
    preds = np.stack([o.predictions for o in outs])
    cell = {
      "method": method,
      "sparsity": sparsity,
      "kd": kd,
      "temperature": temperature,
      "distill": distill,
      "seeds": [r["seed"] for r in members],
      **bias(ref, jnp.asarray(preds), config.metrics),
    }
    for field in SEED_FIELDS:
      values = np.array([r[field] for r in members if r.get(field) is not None], np.float64)
      if values.size:
        cell[f"{field}_seed_mean"] = number(values.mean())
        cell[f"{field}_seed_std"] = number(values.std(ddof=1) if values.size > 1 else 0.0)
      if field in SEED_INTERVAL_FIELDS and values.size >= 2:
        _, low, high = pm.seed_interval(values, confidence)
        cell[f"{field}_seed_ci"] = [number(low), number(high)]
    sizes = [r["model_bytes"] for r in members if r.get("model_bytes") is not None]
    if sizes:  # the seeds' sizes agree but for rounding of nnz; their mean, in whole bytes
      cell["model_bytes"] = int(round(float(np.mean(sizes))))
    extra, cie_indices[key] = cell_analysis(
      ref.labels,
      list(dense_predictions),
      list(preds),
      ref.num_classes,
      config.analysis,
      config.seed + i,
    )
    cell.update(extra)
    if ref.groups is not None:  # where the accuracy and the CIE fall, group by group
      accs = np.array(
        [[np.nan if v is None else v for v in r["per_group_accuracy"]] for r in members]
      )
      cell["per_group_accuracy"] = number(accs.mean(axis=0))
      cell["cie_per_group"] = np.bincount(
        ref.groups[cie_indices[key]], minlength=ref.num_groups
      ).tolist()
    kd_key = (method, sparsity, True, config.kd.temperature, "kd")
    if distill not in ("ce", "kd") and kd_key in outputs:
      kd_members = [r for r in records if cell_key(r) == kd_key]
      cell["paired_vs_kd"] = paired_vs_ce(kd_members, members)
    if distill not in ("ce", "ptq"):  # a PTQ model is not fine-tuned: nothing to pair by seed
      ce_key = (method, sparsity, False, None, "ce")
      if ce_key in outputs:
        ce_preds = np.stack([o.predictions for o in outputs[ce_key]])
        ce_members = [r for r in records if cell_key(r) == ce_key]
        cell["paired_vs_ce"] = paired_vs_ce(ce_members, members)
        cell["significance_vs_ce"] = significance(
          ref.labels,
          ce_preds,
          preds,
          ref.num_classes,
          config.analysis,
          config.seed + i,
          against="ce",
          paired=True,
        )
    cells.append(cell)
  blocked = sorted(
    {
      c["significance"]["min_attainable_p"]
      for c in cells
      if c["significance"].get("can_reject") is False
    }
  )
  if blocked:
    logging.warning(
      "class-wise permutation tests: with these population sizes the smallest attainable p is "
      "%s, above analysis.fdr_q = %g: no class can be significant; train more seeds "
      "(analysis.dense_seeds, seeds) for tests that can reject",
      ", ".join(f"{p:.3g}" for p in blocked),
      config.analysis.fdr_q,
    )
  return cells, cie_indices


SEED_INTERVAL_FIELDS = ("accuracy", "cev", "sde", "dpd", "eod")


def cell_key(record: Record) -> CellKey:
  """The cell a record or cell belongs to: (method, sparsity, kd, temperature, distill)."""
  return (
    record["method"],
    record["sparsity"],
    record["kd"],
    record["temperature"],
    distill_of(record),
  )


def paired_vs_ce(ce_members: Sequence[Record], kd_members: Sequence[Record]) -> Record:
  """Baseline − compared per seed (same masks and data order; CE − KD for a KD cell), averaged,
  with an exact sign test and a Wilcoxon signed-rank test of the per-seed differences
  (`n_pairs` seeds in both cells)."""
  ce = {r["seed"]: r for r in ce_members}
  pairs = [(ce[r["seed"]], r) for r in kd_members if r["seed"] in ce]
  out: Record = {"n_pairs": len(pairs)}
  for field in ("cev", "sde", "accuracy"):
    d = np.array(
      [a[field] - b[field] for a, b in pairs if a[field] is not None and b[field] is not None]
    )
    out[f"{field}_diff"] = number(d.mean()) if d.size else None
    if field == "accuracy":
      continue
    out[f"{field}_sign_test_p"] = number(pm.sign_test(d).pvalue) if d.size else None
    out[f"{field}_wilcoxon_p"] = number(pm.wilcoxon_signed_rank(d).pvalue) if d.size else None
  # The names the reports read: the tests of the CEV differences.
  out["sign_test_p"] = out["cev_sign_test_p"]
  out["wilcoxon_p"] = out["cev_wilcoxon_p"]
  return out


CLASSWISE_VALUES = {
  "normalized_recall": pm.per_class_normalized_recall,
  "accuracy": pm.per_class_accuracy,
}


def significance(
  labels: np.ndarray,
  reference_predictions: np.ndarray,
  compared_predictions: np.ndarray,
  num_classes: int,
  cfg: ml_collections.ConfigDict,
  seed: int,
  *,
  against: str,
  paired: bool = False,
) -> Record:
  """Class-wise tests of a cell's models against a reference population (`against`: 'dense',
  or 'ce' for a KD cell against its CE cell, paired by seed): per-model per-class values
  (`analysis.classwise_statistic`), Welch's (paired: the paired) t-test and an exact-where-
  possible permutation test, each with Benjamini–Hochberg at `analysis.fdr_q`. Every entry
  names its statistic and the smallest p its permutation test can attain."""
  statistic = cfg.classwise_statistic
  k_ref, k = len(reference_predictions), len(compared_predictions)
  base = {
    "against": against,
    "statistic": statistic,
    "paired": paired,
    "fdr": cfg.fdr,
    "q": cfg.fdr_q,
    "num_reference_models": k_ref,
    "num_compared_models": k,
  }
  if k_ref < 2 or k < 2:
    return {
      **base,
      "computed": False,
      "min_attainable_p": None,
      "reason": (
        f"needs >= 2 models on each side (have {k_ref} {against} and {k}; set "
        f"{'analysis.dense_seeds and ' if against == 'dense' else ''}seeds)"
      ),
    }
  values = CLASSWISE_VALUES[statistic]
  y = jnp.asarray(labels)
  sig = pm.classwise_significance(
    values(y, jnp.asarray(reference_predictions), num_classes),
    values(y, jnp.asarray(compared_predictions), num_classes),
    key=jax.random.key(seed),
    q=cfg.fdr_q,
    num_permutations=cfg.permutations,
    paired=paired,
  )
  return {
    **base,
    "computed": True,
    "min_attainable_p": number(sig.min_attainable_p),
    "exact": bool(sig.exact),
    "can_reject": bool(sig.can_reject),
    "fraction_significant_welch": number(sig.fraction_significant_welch),
    "fraction_significant_permutation": number(sig.fraction_significant_permutation),
    "significant_classes_welch": np.flatnonzero(np.asarray(sig.welch_rejected)).tolist(),
    "significant_classes_permutation": np.flatnonzero(
      np.asarray(sig.permutation_rejected)
    ).tolist(),
    "welch_p_adjusted": [number(v) for v in np.asarray(sig.welch_p_adjusted)],
    "permutation_p_adjusted": [number(v) for v in np.asarray(sig.permutation_p_adjusted)],
    "mean_difference": [number(v) for v in np.asarray(sig.mean_difference)],
  }


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
    "num_pruned_models": int(members.shape[0]),
    # Small populations make tied modes common: how many examples tie on each side.
    "num_dense_ties": int(cie["num_ties_reference"]),
    "num_pruned_ties": int(cie["num_ties_compressed"]),
    "significance": significance(labels, dense, members, num_classes, cfg, seed, against="dense"),
  }
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
  chosen: str = "",
) -> Showcase:
  """The cell the CIE grid and the layer CKA heatmap show: `chosen` (report.cka_cell,
  'method,sparsity,ce|kd'), else the compressed cell with the most CIEs."""
  want = chosen.split(",") if chosen else None  # checked by the config validator
  pick = [
    c
    for c in cells
    if want
    and (c["method"], distill_of(c)) == (want[0], want[2])
    and abs(c["sparsity"] - float(want[1])) < 1e-12
  ]
  top = (pick or [None])[0] or max(
    [c for c in cells if compressed(c)] or cells, key=lambda c: (c["num_cie"], c["sparsity"])
  )
  key = cell_key(top)
  members = outputs[key]
  modes = pm.modal_predictions(np.stack([o.predictions for o in members]), ref.num_classes)
  layers = members[0].layer_cka  # accumulated in the evaluation pass, kept in the unit's file
  return Showcase(
    top,
    cie_indices[key],
    ref.outputs.predictions,
    np.asarray(modes),
    np.asarray(layers.matrix),
    list(layers.names),
  )


def depth_order(layer: str) -> tuple:
  """Sort key putting layers in network depth order: stage1, stage2, ..., features, logits."""
  if layer.startswith("stage") and layer[5:].isdigit():
    return (0, int(layer[5:]), "")
  return ({"features": 1, "logits": 2}.get(layer, 0), 0, layer)


# ------------------------------------------------------------------------------------ per run
SIMILARITIES = ("cka", "cka_debiased", "agreement", "svcca")
BIASES = ("cev", "sde")


CONTROL_METHOD = "none"  # the sparsity-0 control cell: fine-tuned, not compressed


def compressed(record: Record) -> bool:
  """A model or cell of a compression method (not the dense models, not the control)."""
  return record["method"] not in ("dense", CONTROL_METHOD)


def correlations(
  records: Sequence[Record],
  cells: Sequence[Record],
  cfg: ml_collections.ConfigDict,
  seed: int,
) -> list[Record]:
  """Pearson and Spearman correlation of each similarity with each bias measure, with
  bootstrap intervals, over the compressed models and cells of the run.

  Pooled over sparsities, sparsity and accuracy drive both variables, and the models of a
  cell share masks and sparsity, so beside the pooled figure over models (`level` 'model',
  `scope` 'pooled', `resampled` 'models': the naive one, kept for comparison) every row
  resamples whole cells: pooled, within each sparsity (`scope` 'within_sparsity' with its
  `sparsity`) and as a partial correlation controlling for accuracy ('partial_accuracy');
  at `level` 'cell' the points are cells, with the population CEV/SDE (from seed-averaged
  rates, as the authors computed it) against the seed-mean similarity."""
  models = [r for r in records if compressed(r)]
  cell_rows = [c for c in cells if compressed(c)]
  key = jax.random.key(seed)
  rows: list[Record] = []

  def add(points, sim, bias_name, cluster_of, *, level, scope, resampled, covariate=None, **extra):
    ok = [r for r in points if r.get(sim) is not None and r.get(bias_name) is not None]
    if covariate:
      ok = [r for r in ok if r.get(covariate) is not None]
    if len(ok) < 3 or len({cluster_of(r) for r in ok}) < 3:
      return
    x, y = (jnp.asarray([r[f] for r in ok], jnp.float32) for f in (sim, bias_name))
    ids = {c: j for j, c in enumerate(dict.fromkeys(cluster_of(r) for r in ok))}
    clusters = None if resampled == "models" else jnp.asarray([ids[cluster_of(r)] for r in ok])
    row: Record = {
      "similarity": sim,
      "bias": bias_name,
      "n": len(ok),
      "level": level,
      "scope": scope,
      "resampled": resampled,
      **extra,
    }
    for method in ("pearson", "spearman"):
      kw = dict(
        method=method,
        key=jax.random.fold_in(key, len(rows) * 2 + (method == "spearman")),
        num_resamples=cfg.correlation_resamples,
        confidence=cfg.confidence,
        clusters=clusters,
      )
      if covariate:
        z = jnp.asarray([r[covariate] for r in ok], jnp.float32)
        r, lo, hi = pm.partial_correlation_ci(x, y, z, **kw)
      else:
        r, lo, hi = pm.correlation_ci(x, y, **kw)
      row[method] = [number(r), number(lo), number(hi)]
    rows.append(row)

  sparsities = sorted({r["sparsity"] for r in models})
  for sim in SIMILARITIES:
    for bias_name in BIASES:
      # Cells as points: the seed-mean similarity and accuracy against the population bias.
      cell_points = [
        {**c, sim: c.get(f"{sim}_seed_mean"), "accuracy": c.get("accuracy_seed_mean")}
        for c in cell_rows
      ]
      for level, points in (("model", models), ("cell", cell_points)):
        kw = dict(level=level, resampled="cells")
        if level == "model":  # the naive figure, for comparison
          add(points, sim, bias_name, cell_key, level=level, scope="pooled", resampled="models")
        add(points, sim, bias_name, cell_key, scope="pooled", **kw)
        add(points, sim, bias_name, cell_key, scope="partial_accuracy", covariate="accuracy", **kw)
        for s in sparsities:
          at_s = [r for r in points if r["sparsity"] == s]
          add(at_s, sim, bias_name, cell_key, scope="within_sparsity", sparsity=s, **kw)
  return rows
