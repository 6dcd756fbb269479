"""Audit compressed models trained anywhere: the bias of their test predictions.

A model pruned, quantised or distilled in PyTorch, by a vendor tool or by this project is
audited from what it predicts on a labelled test set, against a reference (usually the dense
model) on the same examples:

    python -m prunebias_jax.audit --labels y.npy --reference dense.npy \\
        --compressed pruned.npy int8.npy [--groups g.npy] [--class_names names.txt] --out DIR

    from prunebias_jax.audit import audit
    report = audit(labels, dense_logits, {"pruned": p, "int8": q}, groups=race)
    report.table()        # a pandas DataFrame, one row per compressed set
    report.write("DIR")   # results.jsonl, cells.jsonl, results.md, plots/class_changes.png

Every array is predictions (integers, (n,)) or logits (floats, (n, C), argmax taken), or a
population of models with a leading axis ((k, n) or (k, n, C)): seeds of one compressed
model, whose rates are averaged for the set's CEV/SDE and whose modes give CIE. The first
reference model is the one every record is compared with (as the dense teacher in a run);
all of them are the reference population for CIE and the class-wise tests.

The records are computed by the same functions as a run's (`records.prediction_record`,
`records.cell_records`) under the same `metrics.*` and `analysis.*` config, so the audit of
predictions exported from a run (its predictions.npz) reproduces that run's prediction-based
fields exactly. Bad input (mismatched lengths, labels or predictions out of range, NaN
logits, string labels without a class list) is one line, exit code 2, before any metric runs.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np

from prunebias_jax import metrics as pm
from prunebias_jax import records as rec
from prunebias_jax.config import base_config, validate_config
from prunebias_jax.errors import EXIT_BAD_INPUT, UserError
from prunebias_jax.files import atomic_writer, write_atomic, write_json_atomic

Record = rec.Record
PREDICTION_FIELDS = (
  "accuracy",
  "agreement",
  "cev",
  "sde",
  "cev_exclude",
  "sde_exclude",
  "dfpr",
  "dfnr",
  "fpr",
  "fnr",
  "per_class_recall",
  "zero_rate_classes",
  "floor_decides",
  "cev_ci",
  "sde_ci",
  "dpd",
  "eod",
  "eod_mean",
  "dpd_change",
  "eod_change",
  "dpd_ci",
  "eod_ci",
)


class AuditError(UserError, ValueError):
  """An audit input that cannot be used (one line)."""


class BiasReport(NamedTuple):
  """What an audit found: `records` (one per compressed model), `cells` (one per compressed
  set, its models as a population), `reference` (the reference models' own records)."""

  records: list[Record]
  cells: list[Record]
  reference: list[Record]
  class_names: tuple[str, ...]
  group_names: tuple[str, ...] | None

  def table(self):
    """One row per compressed set: models, accuracy, CEV/SDE (and excluded), floored
    classes, DPD/EOD (with groups), CIE fraction; a pandas DataFrame."""
    try:
      import pandas as pd
    except ImportError:
      raise ImportError(
        "BiasReport.table() needs pandas (pip install pandas); report.rows() gives the same "
        "rows as dicts"
      ) from None
    return pd.DataFrame(self.rows()).set_index("compressed")

  def rows(self) -> list[dict[str, Any]]:
    """The rows of `table()` as dicts."""
    out = []
    for c in self.cells:
      row = {
        "compressed": c["method"],
        "models": c["num_pruned_models"],
        "accuracy": c.get("accuracy_seed_mean"),
        "cev": c["cev"],
        "sde": c["sde"],
        "cev_exclude": c["cev_exclude"],
        "sde_exclude": c["sde_exclude"],
        "floored_classes": c["zero_rate_classes"],
        "cie_fraction": c["cie_fraction"],
      }
      if self.group_names is not None:
        row["dpd"] = c.get("dpd_seed_mean")
        row["eod"] = c.get("eod_seed_mean")
      out.append(row)
    return out

  def markdown(self, config: ml_collections.ConfigDict | None = None) -> str:
    """results.md of an audit: the table, each model's intervals, and the rules used."""
    cfg = config or base_config()
    groups = self.group_names is not None
    head = ["compressed", "models", "accuracy", "CEV", "SDE", "floored", "CEV excl.", "CIE"]
    head += ["DPD", "EOD"] if groups else []
    fmt = lambda v, spec=".4g": "–" if v is None else format(v, spec)
    lines = [
      "# prunebias_jax audit",
      "",
      f"Reference: {len(self.reference)} model(s), accuracy "
      f"{fmt(self.reference[0]['accuracy'], '.4f')} on "
      f"{self.reference[0]['num_test_examples']} test examples; each compressed set against it.",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * len(head),
    ]
    for r in self.rows():
      cells = [r["compressed"], str(r["models"]), fmt(r["accuracy"], ".4f"), fmt(r["cev"])]
      cells += [fmt(r["sde"]), str(r["floored_classes"]), fmt(r["cev_exclude"])]
      cells += [fmt(r["cie_fraction"], ".4f")]
      cells += [fmt(r.get("dpd")), fmt(r.get("eod"))] if groups else []
      lines.append("| " + " | ".join(cells) + " |")
    lines += [
      "",
      "| compressed | model | accuracy | CEV [CI] | SDE [CI] |",
      "|---|---|---|---|---|",
    ]
    interval = lambda r, k: (
      "" if not r.get(f"{k}_ci") else " [" + ", ".join(map(fmt, r[f"{k}_ci"])) + "]"
    )
    for r in self.records:
      lines.append(
        f"| {r['method']} | {r['model']} | {fmt(r['accuracy'], '.4f')} | "
        f"{fmt(r['cev'])}{interval(r, 'cev')} | {fmt(r['sde'])}{interval(r, 'sde')} |"
      )
    a, m = cfg.analysis, cfg.metrics
    lines += [
      "",
      f"- CEV in %², SDE in % (convention {m.convention!r}); zero reference rates: "
      f"{m.zero_rate!r} (floored: classes with a zero reference error rate; CEV excl.: those "
      "classes excluded). A set's CEV/SDE come from its models' averaged rates.",
      f"- Intervals: {a.bootstrap_interval} bootstrap over test examples "
      f"({a.bootstrap_resamples} resamples, {a.confidence:.0%}): test-set noise.",
      "- CIE: no label is modal both among the set's models and among the reference models "
      f"(tie rule {a.cie_tie_rule!r}).",
    ]
    if groups:
      lines.append(f"- Groups: {', '.join(self.group_names)}; DPD/EOD as in fairlearn.")
    return "\n".join(lines) + "\n"

  def write(self, out: str | Path, config: ml_collections.ConfigDict | None = None) -> Path:
    """results.jsonl (reference and compressed models), cells.jsonl, results.md and
    plots/class_changes.png under `out`; returns `out`."""
    out = Path(out)
    rows = lambda rs: "".join(json.dumps(r, sort_keys=True) + "\n" for r in rs)
    write_atomic(out / "results.jsonl", rows(self.reference + self.records))
    write_atomic(out / "cells.jsonl", rows(self.cells))
    write_atomic(out / "results.md", self.markdown(config))
    write_json_atomic(
      out / "audit.json",
      {"class_names": list(self.class_names), "group_names": self.group_names},
    )
    _plot_class_changes(out / "plots" / "class_changes.png", self.cells, self.class_names)
    return out


def _plot_class_changes(path: Path, cells: Sequence[Record], class_names: Sequence[str]) -> None:
  """Per-class change of FNR and FPR of each compressed set vs the reference."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(class_names) + 3), 6), sharex=True)
  x = np.arange(len(class_names))
  width = 0.8 / max(1, len(cells))
  for i, c in enumerate(cells):
    for ax, key in zip(axes, ("dfnr", "dfpr")):
      values = np.array([np.nan if v is None else v for v in c[key]], float)
      ax.bar(x + i * width - 0.4 + width / 2, values, width, label=c["method"])
  for ax, key in zip(axes, ("FNR", "FPR")):
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel(f"relative {key} change (%)")
  axes[0].legend(fontsize=8)
  axes[1].set_xticks(x, [str(n) for n in class_names], rotation=45, ha="right")
  fig.suptitle("Per-class error change of each compressed set vs the reference")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  with atomic_writer(path) as f:
    f.write(buf.getvalue())


# ------------------------------------------------------------------------------------ inputs
def _fail(message: str) -> None:
  raise AuditError(message)


def class_labels(labels: Any, class_names: Sequence[str] | None) -> tuple[np.ndarray, tuple]:
  """(int labels, class names): string labels need `class_names`; integer labels must lie in
  [0, len(class_names)) when the names are given."""
  y = np.asarray(labels)
  if y.ndim != 1 or y.size == 0:
    _fail(f"labels must be one label per example, a non-empty (n,) array; got shape {y.shape}")
  if y.dtype.kind in "USO":
    if class_names is None:
      _fail(
        "labels are strings but no class list was given (class_names / --class_names): the "
        "class order decides every per-class index"
      )
    index = {str(n): i for i, n in enumerate(class_names)}
    unknown = sorted({str(v) for v in y.tolist()} - set(index))
    if unknown:
      _fail(f"labels {unknown[:5]} are not in the class list {list(class_names)}")
    return np.array([index[str(v)] for v in y.tolist()], np.int32), tuple(map(str, class_names))
  if y.dtype.kind not in "iu":
    _fail(f"labels must be integers or strings, got dtype {y.dtype}")
  if y.min() < 0:
    _fail(f"labels must be >= 0; found {int(y.min())}")
  if class_names is not None:
    if int(y.max()) >= len(class_names):
      _fail(
        f"label {int(y.max())} is out of range for the {len(class_names)} classes "
        f"(allowed 0..{len(class_names) - 1})"
      )
    return y.astype(np.int32), tuple(map(str, class_names))
  return y.astype(np.int32), ()


def model_predictions(array: Any, n: int, num_classes: int, what: str) -> tuple[np.ndarray, ...]:
  """(predictions (k, n) int32, logits (k, n, C) float32 or None) of `array`: predictions
  (n,)/(k, n) integers, or logits (n, C)/(k, n, C) floats."""
  a = np.asarray(array)
  if a.dtype.kind in "iu":
    preds = a[None] if a.ndim == 1 else a
    if preds.ndim != 2 or preds.shape[1] != n:
      _fail(f"{what}: predictions of shape {a.shape}; expected ({n},) or (models, {n})")
    if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
      bad = int(preds.min()) if preds.min() < 0 else int(preds.max())
      _fail(f"{what}: prediction {bad} is out of range for {num_classes} classes")
    return preds.astype(np.int32), None
  if a.dtype.kind != "f":
    _fail(f"{what}: dtype {a.dtype}; give integer predictions or float logits")
  logits = a[None] if a.ndim == 2 else a
  if logits.ndim != 3 or logits.shape[1] != n or logits.shape[2] != num_classes:
    _fail(
      f"{what}: logits of shape {a.shape}; expected ({n}, {num_classes}) or "
      f"(models, {n}, {num_classes})"
    )
  if not np.isfinite(logits).all():
    _fail(f"{what}: {int((~np.isfinite(logits)).sum())} logits are NaN or infinite")
  return np.argmax(logits, axis=-1).astype(np.int32), logits.astype(np.float32)


def _num_classes(y: np.ndarray, names: tuple, arrays: Sequence[np.ndarray]) -> int:
  if names:
    return len(names)
  widths = [np.asarray(a).shape[-1] for a in arrays if np.asarray(a).dtype.kind == "f"]
  if widths:
    return int(widths[0])
  top = [int(np.asarray(a).max()) for a in arrays if np.asarray(a).size]
  return max([int(y.max())] + top) + 1


def _groups(groups: Any, n: int, group_names: Sequence[str] | None) -> tuple:
  if groups is None:
    return None, None
  g = np.asarray(groups)
  if g.shape != (n,):
    _fail(f"groups must be one value per example, shape ({n},); got {g.shape}")
  if g.dtype.kind in "iu" and group_names is not None:
    if g.min() < 0 or g.max() >= len(group_names):
      _fail(f"group id {int(g.max())} is out of range for the {len(group_names)} group names")
    values = g.astype(np.int32)
    names = tuple(map(str, group_names))
  else:
    if g.dtype.kind not in "iuUSOb":
      _fail(f"groups must be integers or strings, got dtype {g.dtype}")
    uniques = sorted(set(g.tolist()))
    index = {u: i for i, u in enumerate(uniques)}
    values = np.array([index[v] for v in g.tolist()], np.int32)
    names = tuple(map(str, uniques))
  present = np.bincount(values, minlength=len(names))
  if (present > 0).sum() < 2:
    _fail(f"groups: {int((present > 0).sum())} group(s) present; DPD and EOD compare at least 2")
  return values, names


def _features(features: Mapping[str, Any], n: int, models: Mapping[str, int]) -> dict:
  """{name: (models, n, d) float32} of the given features, checked against the sets."""
  unknown = sorted(set(features) - set(models))
  if unknown:
    _fail(f"features for {unknown}, which are neither 'reference' nor a compressed set")
  if features and "reference" not in features:
    _fail("features of compressed models need the reference's features ('reference')")
  out = {}
  for name, array in features.items():
    a = np.asarray(array)
    a = a[None] if a.ndim == 2 else a
    if a.ndim != 3 or a.shape[:2] != (models[name], n) or a.dtype.kind not in "fiu":
      _fail(
        f"features of {name!r}: shape {np.shape(array)} {np.asarray(array).dtype}; expected "
        f"numbers of shape ({n}, d) or ({models[name]}, {n}, d)"
      )
    if not np.isfinite(a).all():
      _fail(f"features of {name!r}: {int((~np.isfinite(a)).sum())} values are NaN or infinite")
    out[name] = a.astype(np.float32)
  return out


# ------------------------------------------------------------------------------------ the audit
def audit(
  labels: Any,
  reference: Any,
  compressed: Any,
  groups: Any = None,
  *,
  class_names: Sequence[str] | None = None,
  group_names: Sequence[str] | None = None,
  config: ml_collections.ConfigDict | None = None,
  seeds: Mapping[str, Sequence[int]] | None = None,
  features: Mapping[str, Any] | None = None,
) -> BiasReport:
  """The bias of compressed models against a reference, from their test outputs.

  Args:
    labels: (n,) true labels, integers or strings (strings need `class_names`).
    reference: the reference model's predictions or logits, or a population of them.
    compressed: one array, a sequence of arrays, or {name: array}: each is one compressed
      set (a model, or a population with a leading axis).
    groups: (n,) sensitive attribute per example (ints or strings): adds DPD/EOD.
    class_names, group_names: names for the class and group indices.
    config: the `metrics.*` / `analysis.*` rules (default: the schema's defaults).
    seeds: {set name: seed per model}, the bootstrap's seed of each model (default 0, 1, ...;
      a run's records use the model's training seed).
    features: {'reference': (n, d), set name: (n, d') or (models, n, d')}: penultimate
      features on the same examples; each model's record adds linear CKA (`cka`) and
      debiased CKA (`cka_debiased`) with the first reference model's.
  """
  cfg = config if config is not None else base_config()
  validate_config(cfg)
  y, names = class_labels(labels, class_names)
  n = len(y)
  if isinstance(compressed, Mapping):
    sets = {str(k): v for k, v in compressed.items()}
  elif isinstance(compressed, (list, tuple)):
    sets = {f"compressed_{i}": v for i, v in enumerate(compressed)}
  else:
    sets = {"compressed": compressed}
  if not sets:
    _fail("no compressed models given")
  C = _num_classes(y, names, [reference, *sets.values()])
  if C < 2:
    _fail(f"{C} class(es); CEV, SDE and every per-class comparison need at least 2")
  if int(y.max()) >= C:
    _fail(f"label {int(y.max())} is out of range for the {C} classes of the logits")
  names = names or tuple(str(c) for c in range(C))
  ref_preds, ref_logits = model_predictions(reference, n, C, "reference")
  outs = {k: model_predictions(v, n, C, f"compressed {k!r}") for k, v in sets.items()}
  g, gnames = _groups(groups, n, group_names)
  feats = _features(
    features or {}, n, {"reference": len(ref_preds)} | {k: len(v[0]) for k, v in outs.items()}
  )

  def outputs(preds, logits, i):
    return rec.Outputs(preds[i], None if logits is None else logits[i])

  dense = [outputs(ref_preds, ref_logits, i) for i in range(len(ref_preds))]
  ref = rec.reference(y, g, C, dense[0])
  identity = lambda name, i, seed: {
    "method": name,
    "model": i,
    "seed": seed,
    "sparsity": None,
    "kd": False,
    "temperature": None,
    "distill": None,
    "num_test_examples": n,
  }
  reference_records = [
    rec.note_undefined(
      {**identity("reference", i, i), **rec.prediction_record(ref, o.predictions, i, cfg)},
      f"reference model {i}",
    )
    for i, o in enumerate(dense)
  ]
  records, population = [], {}
  for name, (preds, logits) in outs.items():
    model_seeds = list((seeds or {}).get(name, range(len(preds))))
    if len(model_seeds) != len(preds):
      _fail(f"seeds for {name!r}: {len(model_seeds)} given for {len(preds)} models")
    for i, seed in enumerate(model_seeds):
      record = {**identity(name, i, int(seed)), **rec.prediction_record(ref, preds[i], seed, cfg)}
      if name in feats:
        x, y = jnp.asarray(feats["reference"][0]), jnp.asarray(feats[name][i])
        record["cka"] = rec.number(pm.linear_cka(x, y))
        record["cka_debiased"] = rec.debiased_cka(x, y)
      records.append(rec.note_undefined(record, f"{name} model {i}"))
    population[(name, None, False, None, None)] = [
      outputs(preds, logits, i) for i in range(len(preds))
    ]
  cells, _ = rec.cell_records(ref, dense, records, population, cfg)
  return BiasReport(records, cells, reference_records, names, gnames)


# ------------------------------------------------------------------------------------ CLI
def load_array(path: str, what: str) -> np.ndarray:
  """A .npy file, or one array of a .npz (`file.npz` with one array, or `file.npz:key`)."""
  file, key = path.rsplit(":", 1) if ".npz:" in path else (path, "")
  p = Path(file)
  if not p.is_file():
    _fail(f"--{what}={path!r} is not a file")
  try:
    if p.suffix == ".npz":
      with np.load(p, allow_pickle=False) as z:
        keys = list(z.keys())
        if key:
          if key not in keys:
            _fail(f"--{what}={path!r}: no array {key!r} in it (arrays: {', '.join(keys)})")
          return z[key]
        if len(keys) != 1:
          _fail(
            f"--{what}={path!r} holds {len(keys)} arrays ({', '.join(keys)}); name one as "
            "FILE.npz:KEY"
          )
        return z[keys[0]]
    return np.load(p, allow_pickle=False)
  except AuditError:
    raise
  except (OSError, ValueError) as e:
    _fail(f"--{what}={path!r} cannot be read as NumPy data: {e}")


def _read_names(value: str | None) -> list[str] | None:
  if not value:
    return None
  p = Path(value)
  if p.is_file():
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]
  return [v.strip() for v in value.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m prunebias_jax.audit",
    description="Bias of compressed models from their test predictions or logits (.npy/.npz; "
    "a leading axis is a population of models).",
  )
  parser.add_argument("--labels", required=True, help="(n,) true labels")
  parser.add_argument("--reference", required=True, help="reference predictions or logits")
  parser.add_argument("--compressed", required=True, nargs="+", help="one file per compressed set")
  parser.add_argument("--names", nargs="+", help="a name per compressed file (default: file stems)")
  parser.add_argument("--groups", help="(n,) sensitive attribute per example")
  parser.add_argument("--reference_features", help="(n, d) penultimate features: adds CKA")
  parser.add_argument(
    "--compressed_features", nargs="+", help="features per compressed file, in the same order"
  )
  parser.add_argument("--class_names", help="a file (one name per line) or a comma-separated list")
  parser.add_argument("--group_names", help="names of integer group ids (file or list)")
  parser.add_argument("--bootstrap_resamples", type=int, help="analysis.bootstrap_resamples")
  parser.add_argument("--zero_rate", help="metrics.zero_rate: floor or exclude")
  parser.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args(argv)
  try:
    names = args.names or [Path(c.partition(".npz:")[0]).stem for c in args.compressed]
    if len(names) != len(args.compressed) or len(set(names)) != len(names):
      _fail(f"--names: {len(args.compressed)} distinct names needed, got {names}")
    cfg = base_config()
    if args.bootstrap_resamples is not None:
      cfg.analysis.bootstrap_resamples = args.bootstrap_resamples
    if args.zero_rate is not None:
      cfg.metrics.zero_rate = args.zero_rate
    features = {}
    if args.compressed_features and not args.reference_features:
      _fail("--compressed_features needs --reference_features")
    if args.reference_features:
      features["reference"] = load_array(args.reference_features, "reference_features")
      given = args.compressed_features or []
      if len(given) != len(names):
        _fail(
          f"--compressed_features: one file per compressed file ({len(names)}), got {len(given)}"
        )
      for k, f in zip(names, given):
        features[k] = load_array(f, "compressed_features")
    report = audit(
      load_array(args.labels, "labels"),
      load_array(args.reference, "reference"),
      {k: load_array(c, "compressed") for k, c in zip(names, args.compressed)},
      None if args.groups is None else load_array(args.groups, "groups"),
      class_names=_read_names(args.class_names),
      group_names=_read_names(args.group_names),
      config=cfg,
      features=features,
    )
    out = report.write(args.out, cfg)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  except OSError as e:
    print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(report.markdown(cfg))
  print(
    f"wrote {out / 'results.md'}, {out / 'results.jsonl'}, {out / 'cells.jsonl'} and "
    f"{out / 'plots' / 'class_changes.png'}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
