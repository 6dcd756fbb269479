"""Human-readable outputs: the markdown table and the paper-style plots.

Both read the per-cell records (one per method × sparsity × CE/KD): CEV/SDE of a cell come
from the per-class rates averaged over its seeds, and accuracy/CKA are mean ± std over seeds.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prunebias_jax.files import write_atomic

Record = dict[str, Any]


def _value(cell: Record, field: str) -> str:
  """'x' for one seed; 'mean ± std' over seeds; CEV/SDE: the population value, then the
  per-seed mean ± std in brackets."""
  n = len(cell["seeds"])
  mean, std = cell[f"{field}_seed_mean"], cell[f"{field}_seed_std"]
  if field in ("cev", "sde"):
    return f"{cell[field]:.4g}" if n == 1 else f"{cell[field]:.4g} ({mean:.4g} ± {std:.2g})"
  return f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def results_table(dense: Record, cells: Sequence[Record]) -> str:
  """Markdown: one row per (method, sparsity), CE and KD side by side."""
  seeds = sorted({s for c in cells for s in c["seeds"]})
  lines = [
    f"Dense reference: accuracy {dense['accuracy']:.4f} on {dense['num_test_examples']} test examples. "
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
    row = [method, f"{sparsity:g}"]
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
) -> str:
  table = results_table(dense, cells)
  text = (
    f"# {title}\n\n" + table + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
  )
  text += ("\n" + extra) if extra else ""
  write_atomic(path, text)
  return table


def _savefig(fig, path: Path) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  write_atomic(path, buf.getvalue())


def write_plots(
  plot_dir: Path, records: Sequence[Record], cells: Sequence[Record], class_names: Sequence[str]
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
    ax.set_xlabel("sparsity")
    ax.set_ylabel(label)
    ax.set_yscale("symlog", linthresh=1.0)  # values span orders of magnitude across sparsities
    ax.set_title(f"{field.upper()} vs sparsity (solid CE, dashed KD)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="best")
  save(fig, "bias_vs_sparsity.png")

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
  save(fig, "accuracy_vs_sparsity.png")

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
  ax.set_yscale("symlog", linthresh=1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, "cka_vs_cev.png")

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
        x, y = np.asarray(cell["dfpr"], float), np.asarray(cell["dfnr"], float)
        ax.scatter(x, y, marker=marker, color=color, s=14, label="KD" if kd else "CE")
        lim = max(lim, float(np.abs(np.concatenate([x, y])).max()))
      ax.plot(
        [-lim, lim], [-lim, lim], "k-", lw=0.7
      )  # ΔFPR = ΔFNR: the line SDE measures distance to
      ax.set_xscale("symlog", linthresh=10.0)
      ax.set_yscale("symlog", linthresh=10.0)
      ax.set_title(f"{m} s={s:g}", fontsize=8)
      ax.tick_params(labelsize=6)
      if i == len(methods) - 1:
        ax.set_xlabel("ΔFPR (%)", fontsize=7)
      if j == 0:
        ax.set_ylabel("ΔFNR (%)", fontsize=7)
  axes[0][0].legend(fontsize=6)
  fig.suptitle(
    f"per-class change vs the dense model ({len(class_names)} classes; seeds averaged)", fontsize=9
  )
  save(fig, "class_changes.png")
  return written


def _fmt(v, spec: str = ".4g") -> str:
  return "–" if v is None else format(v, spec)


def analysis_sections(
  cells: Sequence[Record], correlation_markdown: str, main_temperature: float, has_groups: bool
) -> str:
  """Markdown sections after the main table: group fairness, CIE and significance, the KD
  temperature study (when several temperatures ran), similarity–bias correlations."""
  label = lambda c: "CE" if not c["kd"] else f"KD T={c['temperature']:g}"
  out = []
  if has_groups:
    out += [
      "## Group fairness (test set, by the sensitive attribute)",
      "",
      "| method | sparsity | student | DPD | EOD | ΔDPD vs dense | ΔEOD vs dense |",
      "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
      out.append(
        f"| {c['method']} | {c['sparsity']:g} | {label(c)} | {_fmt(c.get('dpd_seed_mean'))} | "
        f"{_fmt(c.get('eod_seed_mean'))} | {_fmt(c.get('dpd_change_seed_mean'))} | {_fmt(c.get('eod_change_seed_mean'))} |"
      )
    out.append("")
  out += [
    "## Compression Identified Exemplars and class-wise significance",
    "",
    "CIE: the modal prediction of the cell's pruned models differs from that of the dense models "
    "(Hooker et al. 2020). Significance: per-class accuracy, pruned vs dense populations, Welch's t-test "
    "and a permutation test with Benjamini–Hochberg at q = 0.05.",
    "",
    "| method | sparsity | student | CIE fraction | dense acc CIE / rest | pruned acc CIE / rest | "
    "classes changed (Welch) | (permutation) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for c in cells:
    sig_w = (
      _fmt(c.get("significant_fraction_welch"), ".0%")
      if "significant_fraction_welch" in c
      else "n/a"
    )
    sig_p = (
      _fmt(c.get("significant_fraction_permutation"), ".0%")
      if "significant_fraction_permutation" in c
      else "n/a"
    )
    out.append(
      f"| {c['method']} | {c['sparsity']:g} | {label(c)} | {_fmt(c['cie_fraction'], '.4f')} | "
      f"{_fmt(c['dense_accuracy_on_cie'], '.3f')} / {_fmt(c['dense_accuracy_on_non_cie'], '.3f')} | "
      f"{_fmt(c['pruned_accuracy_on_cie'], '.3f')} / {_fmt(c['pruned_accuracy_on_non_cie'], '.3f')} | "
      f"{sig_w} | {sig_p} |"
    )
  if any("significance" in c for c in cells):
    out += ["", f"Significance: {next(c['significance'] for c in cells if 'significance' in c)}."]
  out.append("")
  temps = sorted({c["temperature"] for c in cells if c["kd"]})
  if len(temps) > 1:
    out += [
      "## KD temperature study",
      "",
      "| method | sparsity | T | acc | CEV | SDE | DPD | EOD |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(
      (c for c in cells if c["kd"]), key=lambda c: (c["method"], c["sparsity"], c["temperature"])
    ):
      out.append(
        f"| {c['method']} | {c['sparsity']:g} | {c['temperature']:g} | {_fmt(c['accuracy_seed_mean'], '.4f')} | "
        f"{_fmt(c['cev'])} | {_fmt(c['sde'])} | {_fmt(c.get('dpd_seed_mean'))} | {_fmt(c.get('eod_seed_mean'))} |"
      )
    out.append("")
  out += [
    "## Similarity to the dense model vs bias (all pruned models)",
    "",
    "CKA / debiased CKA: penultimate features; SVCCA: distance of the logits (as the paper's authors); "
    "agreement: fraction of equal predictions. r [95% bootstrap CI].",
    "",
    correlation_markdown,
  ]
  return "\n".join(out)


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
    for kd, marker, color in ((False, "o", "tab:red"), (True, "^", "tab:blue")):
      pts = [(r[field], r["cev"]) for r in pruned if r["kd"] == kd and r.get(field) is not None]
      if pts:
        ax.scatter(*zip(*pts), marker=marker, color=color, s=18, label="KD" if kd else "CE")
    ax.set_xlabel(label)
    ax.set_ylabel("CEV (%²)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  _savefig(fig, path)
  plt.close(fig)


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
