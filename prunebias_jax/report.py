"""Human-readable outputs: the markdown table and the paper-style plots."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prunebias_jax.files import write_atomic

Record = dict[str, Any]
SUMMARY_FIELDS = ("accuracy", "cev", "sde", "cka")


def group_cells(records: Sequence[Record]) -> dict[tuple[str, float, bool], list[Record]]:
  """{(method, sparsity, kd): [record per seed]} for the pruned models, in run order."""
  cells: dict[tuple[str, float, bool], list[Record]] = defaultdict(list)
  for r in records:
    if r["method"] != "dense":
      cells[(r["method"], r["sparsity"], r["kd"])].append(r)
  return cells


def _mean_std(values: Sequence[float]) -> str:
  v = np.asarray(values, np.float64)
  if v.size == 1:
    return f"{v[0]:.4g}"
  return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}"


def results_table(records: Sequence[Record]) -> str:
  """Markdown: one row per (method, sparsity), CE and KD side by side (mean ± std over seeds)."""
  dense = [r for r in records if r["method"] == "dense"]
  cells = group_cells(records)
  seeds = sorted({r["seed"] for r in records if r["method"] != "dense"})
  lines = []
  if dense:
    lines.append(f"Dense reference: accuracy {dense[0]['accuracy']:.4f} on {dense[0]['num_test_examples']} "
                 f"test examples. Students per cell: {len(seeds)} (seeds {', '.join(map(str, seeds))}).")
    lines.append("")
  header = ["method", "sparsity"] + [f"{f} {k}" for f in ("acc", "CEV", "SDE", "CKA") for k in ("CE", "KD")]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  rows = list(dict.fromkeys((m, s) for (m, s, _) in cells))  # run order
  for method, sparsity in rows:
    row = [method, f"{sparsity:g}"]
    for field in SUMMARY_FIELDS:
      for kd in (False, True):
        recs = cells.get((method, sparsity, kd), [])
        row.append(_mean_std([r[field] for r in recs]) if recs else "–")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write_results_markdown(path: Path, records: Sequence[Record], title: str, notes: Sequence[str] = ()) -> str:
  table = results_table(records)
  text = f"# {title}\n\n" + table + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
  write_atomic(path, text)
  return table


def _savefig(fig, path: Path) -> None:
  import io

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  write_atomic(path, buf.getvalue())


def write_plots(plot_dir: Path, records: Sequence[Record]) -> list[Path]:
  """CEV and SDE vs sparsity (CE solid, KD dashed, a colour per method), accuracy vs sparsity,
  and CKA vs CEV. Returns the written paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cells = group_cells(records)
  methods = list(dict.fromkeys(m for (m, _, _) in cells))
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
  dense = [r for r in records if r["method"] == "dense"]
  written = []

  def series(method: str, kd: bool, field: str):
    pts = sorted((s, np.mean([r[field] for r in recs])) for (m, s, k), recs in cells.items() if m == method and k == kd)
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, field, label in ((axes[0], "cev", "CEV (%²)"), (axes[1], "sde", "SDE (%)")):
    for m in methods:
      for kd, style in ((False, "-"), (True, "--")):
        xs, ys = series(m, kd, field)
        if xs:
          ax.plot(xs, ys, style, marker="o", color=colors[m], label=f"{m} {'KD' if kd else 'CE'}")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(label)
    ax.set_yscale("symlog", linthresh=1.0)  # values span orders of magnitude across sparsities
    ax.set_title(f"{field.upper()} vs sparsity (solid CE, dashed KD)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="best")
  path = plot_dir / "bias_vs_sparsity.png"
  _savefig(fig, path)
  plt.close(fig)
  written.append(path)

  fig, ax = plt.subplots(figsize=(6, 4))
  for m in methods:
    for kd, style in ((False, "-"), (True, "--")):
      xs, ys = series(m, kd, "accuracy")
      if xs:
        ax.plot(xs, ys, style, marker="o", color=colors[m], label=f"{m} {'KD' if kd else 'CE'}")
  if dense:
    ax.axhline(dense[0]["accuracy"], color="k", lw=1, label="dense")
  ax.set_xlabel("sparsity")
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  path = plot_dir / "accuracy_vs_sparsity.png"
  _savefig(fig, path)
  plt.close(fig)
  written.append(path)

  fig, ax = plt.subplots(figsize=(6, 4))
  for m in methods:
    for kd, marker in ((False, "o"), (True, "^")):
      pts = [(r["cka"], r["cev"]) for (mm, _, k), recs in cells.items() if mm == m and k == kd for r in recs]
      if pts:
        ax.scatter(*zip(*pts), marker=marker, color=colors[m], label=f"{m} {'KD' if kd else 'CE'}", s=22)
  ax.set_xlabel("linear CKA with the dense model (penultimate features)")
  ax.set_ylabel("CEV (%²)")
  ax.set_yscale("symlog", linthresh=1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  path = plot_dir / "cka_vs_cev.png"
  _savefig(fig, path)
  plt.close(fig)
  written.append(path)
  return written
