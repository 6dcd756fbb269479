"""Every file of a run a person or a program reads: the JSON-lines records, results.md, the
plots (paper-style curves, per-class changes, the CIE image grid, layer CKA), config.json,
dataset.json and timings.json. Every file is written atomically (`files.write_atomic`).

Tables and plots read the per-cell records (one per method × sparsity × CE/KD): CEV/SDE of a
cell come from the per-class rates averaged over its seeds, and accuracy/CKA are mean ± std
over seeds. The statistical settings named in the texts come from the config.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from prunebias_jax.config import distill_methods
from prunebias_jax.data import Dataset
from prunebias_jax.errors import printable
from prunebias_jax.files import atomic_writer, format_bytes, write_atomic, write_json_atomic
from prunebias_jax.quantization import is_quantized
from prunebias_jax.records import (
  Outputs,
  Showcase,
  cell_key,
  distill_of,
  model_name,
  student_label,
)

Record = dict[str, Any]


def _symlog(ax, axis: str, linthresh: float) -> None:
  """A symmetric-log `axis` ('x' or 'y') with plain tick labels ('100', '1e+04'): its default
  labels are mathtext, which `_literal_text` turns off (they would show as '$\\mathdefault…');
  1000 and beyond as '1e3', so that the labels of a wide range do not run into each other."""
  from matplotlib.ticker import FuncFormatter

  getattr(ax, f"set_{axis}scale")("symlog", linthresh=linthresh)
  compact = lambda v, _: f"{v:g}" if abs(v) < 1000 else f"{v:.0e}".replace("e+0", "e")
  getattr(ax, f"{axis}axis").set_major_formatter(FuncFormatter(compact))


def _literal_text(draw: Callable) -> Callable:
  """Draws with Matplotlib's mathtext off: a '$' in a class name is a dollar sign, not the
  start of a formula that fails to parse after the whole run has trained."""

  @functools.wraps(draw)
  def wrapper(*args, **kwargs):
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
      return draw(*args, **kwargs)

  return wrapper


def write_run_description(workdir: Path, config: ml_collections.ConfigDict, data: Dataset) -> None:
  """config.json (the resolved config) and dataset.json (class counts, normalisation)."""
  write_json_atomic(workdir / "config.json", json.loads(config.to_json()))
  C = data.num_classes
  description = {
    "name": data.name,
    "class_names": list(data.class_names),
    "image_shape": list(data.image_shape),
    "teacher_train_class_counts": data.teacher_train.class_counts(C).tolist(),
    "finetune_train_class_counts": data.train.class_counts(C).tolist(),
    "test_class_counts": data.test.class_counts(C).tolist(),
    "normalization": {"mean": list(data.mean), "std": list(data.std)},
  }
  names = group_names(data)
  if names is not None:  # data.group_attribute: the groups DPD/EOD compare
    description["group_names"] = list(names)
    for key, split in (
      ("teacher_train", data.teacher_train),
      ("finetune_train", data.train),
      ("test", data.test),
    ):
      if split.groups is not None:
        counts = np.bincount(split.groups, minlength=len(names)).tolist()
        description[f"{key}_group_counts"] = counts
  write_json_atomic(workdir / "dataset.json", description)


def group_names(data: Dataset) -> tuple[str, ...] | None:
  """The name of each test group id (its number where the source names none); None without
  groups."""
  if data.test.groups is None:
    return None
  return data.group_names or tuple(str(g) for g in range(int(data.test.groups.max()) + 1))


def write_predictions(
  workdir: Path, data: Dataset, predictions: Sequence[np.ndarray], logits: Sequence[np.ndarray]
) -> None:
  """predictions.npz: every evaluated model's test predictions (M, n) and logits (M, n, C),
  row i for line i of results.jsonl, with the test labels (and groups): what an audit
  (`prunebias_jax.audit`) or a re-analysis needs without the checkpoints."""
  arrays = {
    "labels": data.test.labels.astype(np.int32),
    "predictions": np.stack(predictions).astype(np.int32),
    "logits": np.stack(logits).astype(np.float32),
    "class_names": np.array(data.class_names, dtype=str),
  }
  if data.test.groups is not None:
    arrays["groups"] = data.test.groups.astype(np.int32)
    if data.group_names is not None:
      arrays["group_names"] = np.array(data.group_names, dtype=str)
  with atomic_writer(workdir / "predictions.npz") as f:
    np.savez(f, **arrays)


def write_jsonl(path: Path, rows: Sequence[Record]) -> None:
  """One key-sorted JSON object per line: two runs of one config give the same bytes."""
  write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_report(
  workdir: Path,
  config: ml_collections.ConfigDict,
  data: Dataset,
  records: Sequence[Record],
  cells: Sequence[Record],
  correlations: Sequence[Record],
  showcase: Showcase,
  evaluated: Sequence[Outputs],
) -> str:
  """results.jsonl, cells.jsonl, correlations.jsonl, predictions.npz (`evaluated[i]`: the
  outputs behind `records[i]`), results.md and plots/; returns the main table (the caller
  prints it)."""
  cfg = config
  for name, rows in (
    ("results.jsonl", records),
    ("cells.jsonl", cells),
    ("correlations.jsonl", correlations),
  ):
    write_jsonl(workdir / name, rows)
  write_predictions(
    workdir, data, [o.predictions for o in evaluated], [o.logits for o in evaluated]
  )
  notes = [
    f"CEV in %², SDE in % (convention {cfg.metrics.convention!r}, zero reference rates: "
    f"{cfg.metrics.zero_rate!r}); both measure how unevenly the per-class FPR/FNR changed "
    "relative to the dense model (docs/metrics.md). With several seeds a cell's CEV/SDE come "
    "from the seed-averaged rates; brackets: per-seed mean ± std.",
    "CKA: linear CKA between the penultimate features of the dense and the pruned model on the "
    "test set.",
    f"Per-model intervals in results.jsonl (cev_ci, sde_ci): {cfg.analysis.bootstrap_interval} "
    f"bootstrap over test examples ({cfg.analysis.bootstrap_resamples} resamples, "
    f"{cfg.analysis.confidence:.0%}): test-set noise, not seed variability.",
    f"KD: (1-α)·CE + α·T²·KL with α = {cfg.kd.alpha:g}, T = {cfg.kd.temperature:g}; fine-tuned "
    f"for {cfg.finetune.epochs} epochs from the same masked weights as CE. Last-epoch models "
    "(no test-set selection).",
  ]
  notes += skipped_notes(records)
  # The main table and its figures: CE and KD side by side; feature distillations (distill.
  # method) get a section and a figure of their own, every method beside CE and KD.
  main_records = [r for r in records if is_ce_or_kd(r)]
  main_cells = at_temperature([c for c in cells if is_ce_or_kd(c)], cfg.kd.temperature)
  # The pruning figures (curves over sparsity): pruned models only; quantized methods have
  # the compression section and bias_vs_size of their own.
  pruned_records = [r for r in main_records if not is_quantized(r["method"])]
  pruned_cells = [c for c in main_cells if not is_quantized(c["method"])]
  pruned_all = [c for c in cells if not is_quantized(c["method"])]
  dense = next(r for r in records if r["method"] == "dense")
  groups = group_names(data)
  extra = group_section(records, cells, groups, data.test.groups, cfg)
  extra += analysis_sections(cells, correlations, cfg)
  extra += compression_section(dense, cells, cfg)
  extra += distill_section(pruned_all, cfg)
  extra += conv_svcca_section(records, cfg)
  title = f"prunebias_jax: {cfg.model} on {printable(data.name)}"
  flagged = {(r["method"], r["sparsity"]) for r in records if r.get("every_step_skipped")}
  table = write_results_markdown(
    workdir / "results.md", dense, main_cells, title, notes, extra, flagged
  )
  plots = workdir / "plots"
  shown = [r for r in pruned_records if r["method"] != "dense" or r.get("reference")]
  ext = cfg.report.format
  if pruned_cells:
    write_plots(plots, shown, pruned_cells, data.class_names, ext)
  write_similarity_scatter(plots / f"similarity_vs_bias.{ext}", records)
  write_size_plot(plots / f"bias_vs_size.{ext}", dense, at_temperature(cells, cfg.kd.temperature))
  if groups is not None and pruned_cells:
    write_group_plot(plots / f"group_gaps_vs_sparsity.{ext}", pruned_records, pruned_cells)
  if any(not is_ce_or_kd(c) for c in pruned_all):
    write_distill_plot(plots / f"distill_methods.{ext}", records, pruned_all, cfg.kd.temperature)
  top = showcase.cell
  write_cie_grid(
    plots / f"cie_grid.{ext}",
    data.test.images,
    showcase.cie_indices[: cfg.analysis.cie_grid_images],
    showcase.dense_predictions,
    showcase.compressed_modes,
    data.test.labels,
    data.class_names,
    max_images=cfg.analysis.cie_grid_images,
  )
  student = student_label(top)
  write_cka_heatmap(
    plots / f"cka_layers.{ext}",
    showcase.layer_cka,
    showcase.layer_names,
    showcase.layer_names,
    f"linear CKA, dense vs {top['method']} s={top['sparsity']:g} {student} seed {top['seeds'][0]}",
  )
  return table


def skipped_notes(records: Sequence[Record]) -> list[str]:
  """Notes naming the models whose training skipped steps (nonfinite='skip'); ‼ for those
  that never applied an update, whose rows are not results."""
  never = [model_name(r) for r in records if r.get("every_step_skipped")]
  some = [
    f"{model_name(r)} ({r['nonfinite_steps']})"
    for r in records
    if r.get("nonfinite_steps") and not r.get("every_step_skipped")
  ]
  out = []
  if never:
    out.append(
      "‼ every training step of these models had a non-finite loss and was skipped "
      f"(nonfinite='skip'): they are untrained, and their rows are not results: {', '.join(never)}"
    )
  if some:
    out.append(f"Steps skipped for a non-finite loss (nonfinite='skip'): {', '.join(some)}.")
  return out


def write_timings(workdir: Path, timings: dict[str, float]) -> None:
  write_json_atomic(workdir / "timings.json", {k: round(v, 3) for k, v in timings.items()})


def _value(cell: Record, field: str) -> str:
  """'x' for one seed; 'mean ± std' over seeds; CEV/SDE: the population value, then the
  per-seed mean ± std in brackets."""
  n = len(cell["seeds"])
  mean, std = cell[f"{field}_seed_mean"], cell[f"{field}_seed_std"]
  if field in ("cev", "sde"):
    return f"{cell[field]:.4g}" if n == 1 else f"{cell[field]:.4g} ({mean:.4g} ± {std:.2g})"
  return f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def results_table(dense: Record, cells: Sequence[Record], flagged: Collection = ()) -> str:
  """Markdown: one row per (method, sparsity), CE and KD side by side; a (method, sparsity)
  in `flagged` (it holds a model that never applied an update) is marked ‼."""
  seeds = sorted({s for c in cells for s in c["seeds"]})
  lines = [
    f"Dense reference: accuracy {dense['accuracy']:.4f} on {dense['num_test_examples']} test "
    "examples. "
    f"Students per cell: {len(seeds)} (seeds {', '.join(map(str, seeds))}).",
    "",
  ]
  header = ["method", "sparsity"] + [
    f"{f} {k}" for f in ("acc", "CEV", "SDE", "CKA") for k in ("CE", "KD")
  ]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  by_key = {(c["method"], c["sparsity"], c["kd"]): c for c in cells}
  for method, sparsity in dict.fromkeys((c["method"], c["sparsity"]) for c in cells):
    row = [method + (" ‼" if (method, sparsity) in flagged else ""), f"{sparsity:g}"]
    for field in ("accuracy", "cev", "sde", "cka"):
      for kd in (False, True):
        cell = by_key.get((method, sparsity, kd))
        row.append(_value(cell, field) if cell else "–")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write_results_markdown(
  path: Path,
  dense: Record,
  cells: Sequence[Record],
  title: str,
  notes: Sequence[str] = (),
  extra: str = "",
  flagged: Collection = (),
) -> str:
  table = results_table(dense, cells, flagged)
  text = (
    f"# {title}\n\n" + table + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
  )
  text += ("\n" + extra) if extra else ""
  write_atomic(path, text)
  return table


PLOT_FORMATS = ("png", "pdf", "svg")  # report.format: raster, or vector for a paper


def _savefig(fig, path: Path) -> None:
  """`path` in the format its suffix names (PLOT_FORMATS), atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format=path.suffix[1:], dpi=120, bbox_inches="tight")
  write_atomic(path, buf.getvalue())


@_literal_text
def write_group_plot(path: Path, records: Sequence[Record], cells: Sequence[Record]) -> None:
  """group_gaps_vs_sparsity.png: DPD and EOD vs sparsity, a colour per method, CE solid, KD
  dashed, error bars the std over seeds, the dense model's value as a line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dense = next(r for r in records if r["method"] == "dense")
  methods = list(dict.fromkeys(c["method"] for c in cells))
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, field in zip(axes, ("dpd", "eod")):
    for m in methods:
      for kd, style in ((False, "-"), (True, "--")):
        pts = sorted(
          (c["sparsity"], c.get(f"{field}_seed_mean"), c.get(f"{field}_seed_std") or 0.0)
          for c in cells
          if c["method"] == m and c["kd"] == kd and c.get(f"{field}_seed_mean") is not None
        )
        if pts:
          xs, ys, err = zip(*pts)
          ax.errorbar(
            xs,
            ys,
            yerr=err,
            fmt=style,
            marker="^" if kd else "o",
            color=colors[m],
            capsize=2,
            label=f"{m} {'KD' if kd else 'CE'}",
          )
    if dense.get(field) is not None:
      ax.axhline(dense[field], color="k", lw=1, label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{field.upper()} (mean ± std over seeds)")
    ax.set_title(f"{field.upper()} vs sparsity (solid CE, dashed KD)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)


@_literal_text
def write_plots(
  plot_dir: Path,
  records: Sequence[Record],
  cells: Sequence[Record],
  class_names: Sequence[str],
  ext: str = "png",
) -> list[Path]:
  """bias_vs_sparsity.png (CEV, SDE; CE solid, KD dashed, a colour per method),
  accuracy_vs_sparsity.png, cka_vs_cev.png (every pruned model) and class_changes.png
  (per-class ΔFPR vs ΔFNR with the y = x line, a panel per method × sparsity)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = list(dict.fromkeys(c["method"] for c in cells))
  sparsities = sorted({c["sparsity"] for c in cells})
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
  dense = next(r for r in records if r["method"] == "dense")
  written = []

  def series(method: str, kd: bool, field: str):
    pts = sorted(
      (c["sparsity"], c[field], c.get(field.replace("_seed_mean", "_seed_std"), 0.0))
      for c in cells
      if c["method"] == method and c["kd"] == kd
    )
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]

  def save(fig, name: str) -> None:
    path = plot_dir / name
    _savefig(fig, path)
    plt.close(fig)
    written.append(path)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, field, label in ((axes[0], "cev", "CEV (%²)"), (axes[1], "sde", "SDE (%)")):
    for m in methods:
      for kd, style in ((False, "-"), (True, "--")):
        xs, ys, _ = series(m, kd, field)
        ax.plot(
          xs,
          ys,
          style,
          marker="o" if not kd else "^",
          color=colors[m],
          label=f"{m} {'KD' if kd else 'CE'}",
        )
        band = sorted(  # where seeds give one: the t-interval of the per-seed values
          (c["sparsity"], *c[f"{field}_seed_ci"])
          for c in cells
          if c["method"] == m and c["kd"] == kd and c.get(f"{field}_seed_ci")
        )
        if band and all(v is not None for b in band for v in b):
          bx, low, high = zip(*band)
          ax.fill_between(bx, low, high, color=colors[m], alpha=0.12, lw=0)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(
      label
      + (" (bands: t-interval over seeds)" if any(f"{field}_seed_ci" in c for c in cells) else "")
    )
    _symlog(ax, "y", 1.0)  # values span orders of magnitude across sparsities
    ax.set_title(f"{field.upper()} vs sparsity (solid CE, dashed KD)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="best")
  save(fig, f"bias_vs_sparsity.{ext}")

  fig, ax = plt.subplots(figsize=(6, 4))
  for m in methods:
    for kd, style in ((False, "-"), (True, "--")):
      xs, ys, err = series(m, kd, "accuracy_seed_mean")
      ax.errorbar(
        xs,
        ys,
        yerr=err,
        fmt=style,
        marker="o" if not kd else "^",
        color=colors[m],
        capsize=2,
        label=f"{m} {'KD' if kd else 'CE'}",
      )
  ax.axhline(dense["accuracy"], color="k", lw=1, label="dense")
  ax.set_xlabel("sparsity")
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, f"accuracy_vs_sparsity.{ext}")

  fig, ax = plt.subplots(figsize=(6, 4))
  pruned = [r for r in records if r["method"] != "dense"]
  for m in methods:
    for kd, marker in ((False, "o"), (True, "^")):
      pts = [(r["cka"], r["cev"]) for r in pruned if r["method"] == m and r["kd"] == kd]
      if pts:
        ax.scatter(
          *zip(*pts), marker=marker, color=colors[m], label=f"{m} {'KD' if kd else 'CE'}", s=22
        )
  ax.set_xlabel("linear CKA with the dense model (penultimate features)")
  ax.set_ylabel("CEV (%²)")
  _symlog(ax, "y", 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, f"cka_vs_cev.{ext}")

  by_key = {(c["method"], c["sparsity"], c["kd"]): c for c in cells}
  fig, axes = plt.subplots(
    len(methods),
    len(sparsities),
    figsize=(2.6 * len(sparsities), 2.6 * len(methods)),
    squeeze=False,
  )
  for i, m in enumerate(methods):
    for j, s in enumerate(sparsities):
      ax = axes[i][j]
      lim = 1.0
      for kd, marker, color in ((False, "o", "tab:red"), (True, "^", "tab:blue")):
        cell = by_key.get((m, s, kd))
        if cell is None:
          continue
        x, y = (np.array([np.nan if v is None else v for v in cell[k]]) for k in ("dfpr", "dfnr"))
        ax.scatter(x, y, marker=marker, color=color, s=14, label="KD" if kd else "CE")
        if len(class_names) <= 20:  # few classes: name each point
          for c, (px, py) in enumerate(zip(x, y)):
            if np.isfinite(px) and np.isfinite(py):
              ax.annotate(str(class_names[c]), (px, py), fontsize=5, color=color, alpha=0.8)
        finite = np.abs(np.concatenate([x, y]))
        lim = max(lim, float(np.nanmax(finite)) if np.isfinite(finite).any() else lim)
      ax.plot(
        [-lim, lim], [-lim, lim], "k-", lw=0.7
      )  # ΔFPR = ΔFNR: the line SDE measures distance to
      _symlog(ax, "x", 10.0)
      _symlog(ax, "y", 10.0)
      ax.set_title(f"{m} s={s:g}", fontsize=8)
      ax.tick_params(labelsize=6)
      if i == len(methods) - 1:
        ax.set_xlabel("ΔFPR (%)", fontsize=7)
      if j == 0:
        ax.set_ylabel("ΔFNR (%)", fontsize=7)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave the top for the suptitle: no overlap
  fig.suptitle(
    f"per-class change vs the dense model ({len(class_names)} classes; seeds averaged)", fontsize=9
  )
  save(fig, f"class_changes.{ext}")
  return written


def _fmt(v, spec: str = ".4g") -> str:
  return "–" if v is None else format(v, spec)


def _interval(values: Sequence | None, spec: str) -> str:
  if not values or values[0] is None:
    return ""
  return f" [{format(values[0], spec)}, {format(values[1], spec)}]"


def _tests(sig: Record | None) -> str:
  """'k/C (Welch) · k/C (perm.), min p 0.1' for one class-wise significance entry."""
  if not sig:
    return "–"
  if not sig.get("computed"):
    return "n/a"
  C = len(sig["welch_p_adjusted"])
  welch, perm = len(sig["significant_classes_welch"]), len(sig["significant_classes_permutation"])
  floor = f"min p {sig['min_attainable_p']:.3g}" + ("" if sig["can_reject"] else " > q")
  return f"{welch}/{C} · {perm}/{C} ({floor})"


def statistics_section(cells: Sequence[Record], config: ml_collections.ConfigDict) -> list[str]:
  """Per cell: accuracy, CEV and SDE with seed intervals, the floored-class count with the
  exclude values, the paired CE − KD differences with their tests, and the class-wise
  significance counts with their smallest attainable p."""
  a = config.analysis
  label = student_label
  statistic = a.classwise_statistic.replace("_", " ")
  out = [
    "## Per-cell statistics (seeds as a population)",
    "",
    f"Intervals: {a.confidence:.0%} t-intervals over seeds (cells with ≥ 2 seeds). CEV/SDE of a "
    "cell: from the seed-averaged rates; floored: classes with a zero dense error rate, "
    f"handled by metrics.zero_rate = {config.metrics.zero_rate!r} (the floor in the denominator "
    "only); CEV excl.: the value with those classes excluded; ‼ marks cells where floored "
    "classes exceed a third of all classes (the rule, not the data, sets CEV there). CE − KD: "
    "mean per-seed difference (same masks and data order), p of an exact sign test / a "
    "Wilcoxon signed-rank test. Class-wise tests on the per-model "
    f"{statistic}: classes significant by Welch's (KD vs CE: paired) t-test · by a permutation "
    f"test (exact when all splits fit in analysis.permutations), Benjamini–Hochberg at "
    f"q = {a.fdr_q:g}, with the smallest p the permutation test can attain at these sizes.",
    "",
    "| method | sparsity | student | seeds | accuracy | CEV | SDE | floored | CEV excl. | "
    "CE − KD CEV (sign p / Wilcoxon p) | CE − KD SDE | classes vs dense | classes vs CE |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in cells:
    paired = c.get("paired_vs_ce")
    if paired and paired["cev_diff"] is not None:
      ps = f"{_fmt(paired['sign_test_p'], '.3g')} / {_fmt(paired['wilcoxon_p'], '.3g')}"
      cev_diff = f"{paired['cev_diff']:+.4g} ({ps}; {paired['n_pairs']} pairs)"
      sde_diff = f"{_fmt(paired['sde_diff'], '+.4g')}"
    else:
      cev_diff = sde_diff = "–"
    flag = " ‼" if c["floor_decides"] else ""
    out.append(
      f"| {c['method']} | {c['sparsity']:g} | {label(c)} | {len(c['seeds'])} | "
      f"{_fmt(c['accuracy_seed_mean'], '.4f')}{_interval(c.get('accuracy_seed_ci'), '.4f')} | "
      f"{_fmt(c['cev'])}{_interval(c.get('cev_seed_ci'), '.3g')} | "
      f"{_fmt(c['sde'])}{_interval(c.get('sde_seed_ci'), '.3g')} | "
      f"{c['zero_rate_classes']}{flag} | {_fmt(c['cev_exclude'])} | {cev_diff} | {sde_diff} | "
      f"{_tests(c.get('significance'))} | {_tests(c.get('significance_vs_ce'))} |"
    )
  out.append("")
  return out


def group_section(
  records: Sequence[Record],
  cells: Sequence[Record],
  group_names: Sequence[str] | None,
  test_groups: np.ndarray | None,
  config: ml_collections.ConfigDict,
) -> str:
  """'## Group fairness': DPD and EOD of every cell with an interval, their change vs the dense
  model, the accuracy of each group and where the CIEs fall ('' without groups)."""
  if group_names is None:
    return ""
  sizes = np.bincount(test_groups, minlength=len(group_names)).tolist()
  listing = ", ".join(f"{printable(n)} ({k})" for n, k in zip(group_names, sizes))
  attribute = config.data.group_attribute
  dense = next(r for r in records if r["method"] == "dense")
  single = {cell_key(r): r for r in records}

  def interval(c: Record, field: str) -> str:
    # ≥ 2 seeds: the t-interval over seeds; one seed: that model's bootstrap interval.
    ci = c.get(f"{field}_seed_ci")
    if ci is None and len(c["seeds"]) == 1:
      ci = single[cell_key(c)].get(f"{field}_ci")
    return _fmt(c.get(f"{field}_seed_mean")) + ("" if not ci else f" {_interval(ci, '.3g')}")

  accs = lambda values: " / ".join(_fmt(v, ".3f") for v in values)
  out = [
    f"## Group fairness (test set, data.group_attribute = {printable(str(attribute))})",
    "",
    f"Groups (test examples): {listing}. DPD: the largest difference between groups in the "
    "rate of predicting a class; EOD: the largest difference in its TPR or FPR (max over "
    f"classes one-vs-rest with more than 2 classes; docs/metrics.md). [interval]: "
    f"{config.analysis.confidence:.0%} t-interval over seeds, or with one seed the model's "
    f"{config.analysis.bootstrap_interval} bootstrap interval over test examples. CIE per "
    "group: how many of the cell's CIEs are in each group (Hooker et al.: compression error "
    "concentrates on under-represented groups).",
    "",
    "| method | sparsity | student | DPD | EOD | ΔDPD vs dense | ΔEOD vs dense | "
    f"accuracy per group ({' / '.join(printable(n) for n in group_names)}) | CIE per group |",
    "|---|---|---|---|---|---|---|---|---|",
    f"| dense | 0 | – | {_fmt(dense.get('dpd'))} | {_fmt(dense.get('eod'))} | – | – | "
    f"{accs(dense.get('per_group_accuracy', []))} | – |",
  ]
  for c in cells:
    changes = " | ".join(_fmt(c.get(f"{f}_seed_mean")) for f in ("dpd_change", "eod_change"))
    out.append(
      f"| {c['method']} | {c['sparsity']:g} | {student_label(c)} | {interval(c, 'dpd')} | "
      f"{interval(c, 'eod')} | {changes} | {accs(c.get('per_group_accuracy', []))} | "
      f"{' / '.join(map(str, c.get('cie_per_group', [])))} |"
    )
  return "\n".join(out + [""]) + "\n"


def analysis_sections(
  cells: Sequence[Record],
  correlation_rows: Sequence[Record],
  config: ml_collections.ConfigDict,
) -> str:
  """Markdown sections after the main table: per-cell statistics, CIE, the KD temperature
  study (when several temperatures ran), similarity–bias correlations."""
  label = student_label
  row = lambda c: f"| {c['method']} | {c['sparsity']:g} | {label(c)} |"
  out = statistics_section([c for c in cells if is_ce_or_kd(c)], config)
  out += [
    "## Compression Identified Exemplars",
    "",
    "CIE (Hooker et al. 2020): no label is modal both among the cell's pruned models and among "
    "the dense models (analysis.cie_tie_rule = 'disjoint_modes': ties are never broken by "
    "label value). Population sizes and the examples whose modes tie are given per cell: with "
    "few models ties are common.",
    "",
    "| method | sparsity | student | dense / pruned models | CIE fraction | ties dense / pruned | "
    "dense acc CIE / rest | pruned acc CIE / rest |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for c in cells:
    acc = lambda who: " / ".join(
      _fmt(c[f"{who}_accuracy_on_{w}"], ".3f") for w in ("cie", "non_cie")
    )
    out.append(
      f"{row(c)} {c['num_dense_models']} / {c['num_pruned_models']} | "
      f"{_fmt(c['cie_fraction'], '.4f')} | {c['num_dense_ties']} / {c['num_pruned_ties']} | "
      f"{acc('dense')} | {acc('pruned')} |"
    )
  reasons = {c["significance"]["reason"] for c in cells if not c["significance"]["computed"]}
  if reasons:
    out += ["", f"Class-wise significance vs dense not computed: {'; '.join(sorted(reasons))}."]
  out.append("")
  temps = sorted({c["temperature"] for c in cells if distill_of(c) == "kd"})
  if len(temps) > 1:
    out += [
      "## KD temperature study",
      "",
      "| method | sparsity | T | acc | CEV | SDE | DPD | EOD |",
      "|---|---|---|---|---|---|---|---|",
    ]
    kd_cells = sorted(
      (c for c in cells if distill_of(c) == "kd"),
      key=lambda c: (c["method"], c["sparsity"], c["temperature"]),
    )
    for c in kd_cells:
      values = [_fmt(c["accuracy_seed_mean"], ".4f"), _fmt(c["cev"]), _fmt(c["sde"])]
      values += [_fmt(c.get("dpd_seed_mean")), _fmt(c.get("eod_seed_mean"))]
      out.append(
        f"| {c['method']} | {c['sparsity']:g} | {c['temperature']:g} | " + " | ".join(values) + " |"
      )
    out.append("")
  a = config.analysis
  out += [
    "## Similarity to the dense model vs bias (compressed models; the control excluded)",
    "",
    "CKA / debiased CKA: penultimate features; SVCCA: distance of the logits (as the paper's "
    f"authors; rule {a.svcca_rule!r}, a class-stratified subset of {a.svcca_examples or 'all'} "
    "test examples); agreement: fraction of equal predictions (nearly a function of accuracy: "
    "not independent evidence). Level 'model': one point per model; 'cell': one point per "
    "cell, its population CEV/SDE against its seed-mean similarity (as the authors). Scope "
    "'pooled' mixes sparsities, which drive both variables; 'within_sparsity' and "
    "'partial_accuracy' (controlling for accuracy) do not. Resampled 'cells': the bootstrap "
    "draws whole cells (their models share masks and sparsity); 'models' is the naive pooled "
    f"figure, for comparison. r [{a.confidence:.0%} bootstrap CI].",
    "",
    correlation_table(correlation_rows),
  ]
  return "\n".join(out)


def conv_svcca_section(records: Sequence[Record], config: ml_collections.ConfigDict) -> str:
  """Markdown: per cell, the per-position convolutional SVCCA distance of each stage output
  to the dense model, mean over seeds ('' when analysis.svcca_conv is off)."""
  rows = [r for r in records if "layer_svcca_conv" in r and r["method"] != "dense"]
  if not rows:
    return ""
  stages = sorted(rows[0]["layer_svcca_conv"])
  by_cell: dict[tuple, list[Record]] = {}
  for r in rows:
    by_cell.setdefault((r["method"], r["sparsity"], r["kd"], r["temperature"]), []).append(r)
  a = config.analysis
  out = [
    "",
    "## Per-position SVCCA of the stage outputs (distance to the dense model)",
    "",
    f"Each stage's maps average-pooled to at most {a.svcca_conv_size} × "
    f"{a.svcca_conv_size}; one SVCCA (rule {a.svcca_rule!r}) per spatial position over the "
    "same class-stratified subset as the other SVCCA figures, averaged over positions; mean "
    "over seeds. 0 = the same representation up to a linear map, 1 = none of it shared.",
    "",
    "| method | sparsity | student | " + " | ".join(stages) + " |",
    "|---|---|---|" + "---|" * len(stages),
  ]
  for members in by_cell.values():
    values = []
    for stage in stages:
      v = [m["layer_svcca_conv"][stage] for m in members]
      values.append("–" if None in v else f"{np.mean(v):.4f}")
    c = members[0]
    out.append(
      f"| {c['method']} | {c['sparsity']:g} | {student_label(c)} | " + " | ".join(values) + " |"
    )
  return "\n".join(out) + "\n"


def correlation_table(rows: Sequence[Record]) -> str:
  """Markdown: r [low, high] per similarity × bias × level × scope × resampling."""
  if not rows:
    return "Too few compressed models (< 3) for similarity–bias correlations.\n"

  def fmt(v) -> str:
    if v[0] is None:
      return "–"
    return f"{v[0]:+.3f} [{v[1]:+.2f}, {v[2]:+.2f}]" if v[1] is not None else f"{v[0]:+.3f}"

  lines = [
    "| similarity | bias | level | scope | resampled | n | Pearson r [CI] | Spearman ρ [CI] |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    scope = r.get("scope", "pooled")
    if "sparsity" in r:
      scope += f" s={r['sparsity']:g}"
    lines.append(
      f"| {r['similarity']} | {r['bias']} | {r.get('level', 'model')} | {scope} | "
      f"{r.get('resampled', 'models')} | {r['n']} | {fmt(r['pearson'])} | {fmt(r['spearman'])} |"
    )
  return "\n".join(lines) + "\n"


def at_temperature(cells: Sequence[Record], temperature: float) -> list[Record]:
  """The cells without the KL term, and those with it at `temperature` (kd.temperature): a
  KD temperature sweep's other cells have the temperature study of their own."""
  return [c for c in cells if not c["kd"] or c["temperature"] == temperature]


def is_ce_or_kd(row: Record) -> bool:
  """A dense, CE or KD record or cell (not a feature distillation)."""
  return distill_of(row) in (None, "ce", "kd")


def _distill_styles(rows: Sequence[Record]) -> dict[str, tuple[str, Any]]:
  """{fine-tuning method: (marker, colour)} in order of appearance: CE red circles and KD blue
  triangles as in every figure, the feature methods after them."""
  import matplotlib.pyplot as plt

  fixed = {"ce": ("o", "tab:red"), "kd": ("^", "tab:blue")}
  others = ("s", "D", "v", "P", "X", "<", ">", "h", "*", "p")
  names = list(dict.fromkeys(distill_of(r) for r in rows))
  names = [n for n in ("ce", "kd") if n in names] + [n for n in names if n not in fixed]
  styles, k = {}, 0
  for n in names:
    if n in fixed:
      styles[n] = fixed[n]
    else:
      styles[n] = (others[k % len(others)], plt.cm.tab10((k + 2) % 10))
      k += 1
  return styles


def compression_label(row: Record) -> str:
  """'PTQ', 'QAT KD T=4' (a quantized method's fine-tuning) or the pruning's 'CE', 'KD T=4'."""
  label = student_label(row)
  return label if not is_quantized(row["method"]) or label == "PTQ" else f"QAT {label}"


def compression_section(
  dense: Record, cells: Sequence[Record], config: ml_collections.ConfigDict
) -> str:
  """'## Compression methods and model size': every cell (at kd.temperature) with accuracy,
  CEV, SDE and CKA beside the deployed model's size (`quantization.model_bytes`) and its
  ratio to the dense model's, the dense reference first."""
  q = config.quantization
  shown = at_temperature(cells, config.kd.temperature)
  size = dense.get("model_bytes")
  text = (
    "Size: the deployed model in bytes (`model_bytes`): conv and dense kernels at the method's "
    "precision (float32 when pruned only), dense or, when smaller, as a bitmap sparse format "
    "(1 bit per weight + the non-zero values), one float32 scale per output channel when "
    "quantized; biases and BatchNorm in float32."
  )
  if any(is_quantized(c["method"]) for c in shown):
    text += (
      f" Quantization (Qwix) is per output channel, weights calibrated by {q.weight_calibration}"
      f", activations (int8_dynamic: per example at run time; int8_static: from "
      f"{q.calibration_examples} training images) by {q.act_calibration}; every conv and dense "
      "kernel, the head included. PTQ: the teacher (⊙ the pruning's masks) quantized without "
      "fine-tuning; QAT: fine-tuned with fake quantization (straight-through gradients) from "
      "the same start, CE or KD from the float teacher. 'a+b': pruned by a, then quantized by b."
    )
  out = [
    "## Compression methods and model size",
    "",
    text,
    "",
    "| method | sparsity | fine-tuning | seeds | accuracy | CEV | SDE | CKA | size | × smaller |",
    "|---|---|---|---|---|---|---|---|---|---|",
    f"| dense | 0 | – | 1 | {dense['accuracy']:.4f} | – | – | – | "
    f"{format_bytes(size) if size else '–'} | 1 |",
  ]
  for c in shown:
    mb = c.get("model_bytes")
    out.append(
      f"| {c['method']} | {c['sparsity']:g} | {compression_label(c)} | {len(c['seeds'])} | "
      f"{_value(c, 'accuracy')} | {_fmt(c['cev'])}{_interval(c.get('cev_seed_ci'), '.3g')} | "
      f"{_fmt(c['sde'])}{_interval(c.get('sde_seed_ci'), '.3g')} | "
      f"{_fmt(c.get('cka_seed_mean'), '.4f')} | {format_bytes(mb) if mb else '–'} | "
      f"{_fmt(size / mb, '.3g') if mb and size else '–'} |"
    )
  out.append("")
  return "\n".join(out) + "\n"


@_literal_text
def write_size_plot(path: Path, dense: Record, cells: Sequence[Record]) -> None:
  """bias_vs_size.png: accuracy, CEV and SDE against the deployed model size (log scale), a
  point per cell: a colour per compression method, a marker per fine-tuning (PTQ, CE, KD, ...;
  error bars: std over seeds), the dense model as a black star."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

  cells = [c for c in cells if c.get("model_bytes")]
  methods = list(dict.fromkeys(c["method"] for c in cells))
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
  markers = dict(zip(dict.fromkeys(compression_label(c) for c in cells), "os^DvPX<>hp*"))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  fields = (("accuracy", "test accuracy"), ("cev", "CEV (%²)"), ("sde", "SDE (%)"))
  for ax, (field, label) in zip(axes, fields):
    for c in cells:
      y = c.get("accuracy_seed_mean") if field == "accuracy" else c.get(field)
      if y is None:
        continue
      err = c.get(f"{field}_seed_std") or 0.0
      ax.errorbar(
        c["model_bytes"],
        y,
        yerr=err,
        marker=markers[compression_label(c)],
        color=colors[c["method"]],
        capsize=2,
        linestyle="none",
      )
    if dense.get("model_bytes"):
      ax.plot(dense["model_bytes"], dense["accuracy"] if field == "accuracy" else 0.0, "k*", ms=10)
    ax.set_xscale("log")
    # Plain '113.0 KiB' ticks (the figure's text is literal: no mathtext powers of ten).
    ax.xaxis.set_major_locator(LogLocator(base=2))  # 32 KiB, 64 KiB, ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if field != "accuracy":  # a collapsed model's bias would flatten every other point
      _symlog(ax, "y", 1.0)
      ax.set_ylim(bottom=0)
    ax.set_xlabel("model size")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="none", label=m) for m in methods]
  handles += [
    plt.Line2D([], [], color="gray", marker=k, ls="none", label=n) for n, k in markers.items()
  ]
  handles.append(plt.Line2D([], [], color="k", marker="*", ls="none", label="dense"))
  axes[0].legend(handles=handles, fontsize=6, loc="best")
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)


def distill_section(cells: Sequence[Record], config: ml_collections.ConfigDict) -> str:
  """'## Distillation methods': every fine-tuning method of each (method, sparsity) with its
  accuracy, CEV and SDE (seed intervals) and the seed-paired differences CE − it and KD − it
  (positive: it has the lower value), with the sign-test p ('' without feature methods)."""
  if all(is_ce_or_kd(c) for c in cells):
    return ""
  shown = at_temperature(cells, config.kd.temperature)
  order = {n: i for i, n in enumerate(distill_methods(config))}
  shown = sorted(
    shown, key=lambda c: (c["method"], c["sparsity"], order.get(distill_of(c), len(order)))
  )

  def paired(c: Record, which: str, field: str) -> str:
    p = c.get(which)
    if not p or p.get(f"{field}_diff") is None:
      return "–"
    test = p.get(f"{field}_sign_test_p")
    return f"{p[f'{field}_diff']:+.4g} (p {_fmt(test, '.3g')}; {p['n_pairs']})"

  d = config.distill
  weights = ", ".join(f"{m} {d.weights[m]:g}" for m in d.weights)
  out = [
    "## Distillation methods",
    "",
    f"Each feature method f fine-tunes with γ·CE + β_f·F_f (γ = {d.ce_weight:g}; β: {weights}); "
    f"f+KD adds α'·T²·KL (α' = {d.kl_weight:g}, T = {config.kd.temperature:g}); KD is "
    f"(1−α)·CE + α·T²·KL (α = {config.kd.alpha:g}). SP: the last stage's output; AT and hints: "
    "every stage output; PKT and CRD: the pooled penultimate features (docs/metrics.md). "
    "CE − it, KD − it: mean per-seed difference (same masks and data order; positive: lower "
    "than the baseline), exact sign-test p and the number of pairs.",
    "",
    "| method | sparsity | fine-tuning | seeds | accuracy | CEV | SDE | CE − it CEV | "
    "CE − it SDE | KD − it CEV | KD − it SDE | classes vs CE |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in shown:
    out.append(
      f"| {c['method']} | {c['sparsity']:g} | {student_label(c)} | {len(c['seeds'])} | "
      f"{_fmt(c['accuracy_seed_mean'], '.4f')}{_interval(c.get('accuracy_seed_ci'), '.4f')} | "
      f"{_fmt(c['cev'])}{_interval(c.get('cev_seed_ci'), '.3g')} | "
      f"{_fmt(c['sde'])}{_interval(c.get('sde_seed_ci'), '.3g')} | "
      f"{paired(c, 'paired_vs_ce', 'cev')} | {paired(c, 'paired_vs_ce', 'sde')} | "
      f"{paired(c, 'paired_vs_kd', 'cev')} | {paired(c, 'paired_vs_kd', 'sde')} | "
      f"{_tests(c.get('significance_vs_ce'))} |"
    )
  out.append("")
  return "\n".join(out) + "\n"


@_literal_text
def write_distill_plot(
  path: Path, records: Sequence[Record], cells: Sequence[Record], temperature: float
) -> None:
  """distill_methods.png: accuracy, CEV and SDE vs sparsity, a panel column per pruning
  method, a line per fine-tuning method (error bars: std over seeds), the dense accuracy as a
  line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dense = next(r for r in records if r["method"] == "dense")
  cells = at_temperature(cells, temperature)
  methods = list(dict.fromkeys(c["method"] for c in cells))
  styles = _distill_styles(cells)
  fig, axes = plt.subplots(
    3, len(methods), figsize=(4.2 * len(methods), 9), squeeze=False, sharex="col"
  )
  for j, m in enumerate(methods):
    for i, (field, label) in enumerate(
      (("accuracy", "test accuracy"), ("cev", "CEV (%²)"), ("sde", "SDE (%)"))
    ):
      ax = axes[i][j]
      for name, (marker, color) in styles.items():
        pts = sorted(
          (c["sparsity"], c.get(f"{field}_seed_mean"), c.get(f"{field}_seed_std") or 0.0)
          for c in cells
          if c["method"] == m and distill_of(c) == name and c.get(f"{field}_seed_mean") is not None
        )
        if pts:
          xs, ys, err = zip(*pts)
          ax.errorbar(xs, ys, yerr=err, marker=marker, color=color, capsize=2, label=name.upper())
      if field == "accuracy":
        ax.axhline(dense["accuracy"], color="k", lw=1, label="dense")
        ax.set_title(m)
      if field == "cev":
        _symlog(ax, "y", 1.0)
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
    axes[-1][j].set_xlabel("sparsity")
  axes[0][0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  _savefig(fig, path)
  plt.close(fig)


@_literal_text
def write_similarity_scatter(path: Path, records: Sequence[Record]) -> None:
  """CEV against each similarity (CKA, agreement, SVCCA distance), one point per pruned model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pruned = [r for r in records if r["method"] != "dense"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, field, label in zip(
    axes,
    ("cka", "agreement", "svcca"),
    ("linear CKA (penultimate)", "prediction agreement", "SVCCA distance (logits)"),
  ):
    for name, (marker, color) in _distill_styles(pruned).items():
      pts = [
        (r[field], r["cev"]) for r in pruned if distill_of(r) == name and r.get(field) is not None
      ]
      if pts:
        ax.scatter(*zip(*pts), marker=marker, color=color, s=18, label=name.upper())
    ax.set_xlabel(label)
    ax.set_ylabel("CEV (%²)")
    _symlog(ax, "y", 1.0)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  _savefig(fig, path)
  plt.close(fig)


@_literal_text
def write_cka_heatmap(
  path: Path, matrix, row_names: Sequence[str], col_names: Sequence[str], title: str
) -> None:
  """Layer × layer CKA between the dense (rows) and a pruned model (columns)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  m = np.asarray(matrix, float)
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(col_names), 1.0 + 0.6 * len(row_names)))
  im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
  ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(len(row_names)), row_names, fontsize=7)
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(
        j,
        i,
        f"{m[i, j]:.2f}",
        ha="center",
        va="center",
        fontsize=6,
        color="w" if m[i, j] < 0.6 else "k",
      )
  ax.set_ylabel("dense")
  ax.set_xlabel("pruned")
  ax.set_title(title, fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.046)
  _savefig(fig, path)
  plt.close(fig)


def _class_name(class_names: Sequence[str] | None, label: int) -> str:
  if class_names is not None and 0 <= label < len(class_names):
    return printable(str(class_names[label]))
  return str(label)


@_literal_text
def write_cie_grid(
  path: str | Path,
  images_uint8: Any,
  indices: Any,
  reference_modes: Any,
  compressed_modes: Any,
  labels: Any,
  class_names: Sequence[str] | None = None,
  max_images: int = 64,
) -> int:
  """Writes a PNG grid of the examples ``indices`` (e.g. the top CIEs), atomically.

  Args:
    path: output ``.png``; written with :func:`prunebias_jax.files.write_atomic`.
    images_uint8: ``(n, H, W, C)`` uint8 images, ``C`` in {1, 3} (``(n, H, W)``
      is taken as grey); grey images are drawn with the gray colormap.
    indices: example indices to show, in order; the first ``max_images`` are used.
    reference_modes, compressed_modes, labels: ``(n,)`` per-example labels,
      indexed by ``indices``.
    class_names: optional label -> name list (labels printed otherwise).
    max_images: cap on the number of tiles.

  Each tile's title gives the true label, the dense (reference) mode and
  the pruned (compressed) mode on three lines ``T:``, ``D:``, ``P:``.
  An empty ``indices`` writes a figure saying there are no examples.

  Returns:
    The number of images drawn.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  images = np.asarray(images_uint8)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (n, H, W, C) with C in (1, 3), got {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  idx = np.asarray(indices, np.int64).reshape(-1)[: max(int(max_images), 0)]
  ref = np.asarray(reference_modes).reshape(-1)
  comp = np.asarray(compressed_modes).reshape(-1)
  y = np.asarray(labels).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= images.shape[0]):
    raise ValueError("indices out of range for the images")
  m = int(idx.size)
  cols = max(1, math.ceil(math.sqrt(m)))
  rows = max(1, math.ceil(m / cols))
  fig = Figure(figsize=(1.8 * cols, 2.1 * rows + 0.4))
  FigureCanvasAgg(fig)
  fig.suptitle(
    "T: true label, D: the dense teacher's prediction, P: the pruned models' modal label",
    fontsize=8,
  )
  if m == 0:
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, "no examples", ha="center", va="center")
  for t, i in enumerate(idx):
    ax = fig.add_subplot(rows, cols, t + 1)
    img = images[i]
    if img.shape[-1] == 1:
      ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
      ax.imshow(img)
    true_name, dense_name, pruned_name = (
      _class_name(class_names, int(v[i])) for v in (y, ref, comp)
    )
    ax.set_title(f"T: {true_name}\nD: {dense_name}\nP: {pruned_name}", fontsize=6)
    ax.axis("off")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format=path.suffix[1:], dpi=100)
  write_atomic(path, buf.getvalue())
  return m
