"""The decision rules of the pre-registered CIFAR-10 evidence run, applied to its records.

    python scripts/evidence_analysis.py runs/evidence --markdown runs/evidence/evidence.md \
      [--json runs/evidence/evidence.json] [--plot runs/evidence/evidence.png]

WORKDIR holds the two runs of `scripts/evidence_cifar10.sh`: imbalanced/ and balanced/, each
with the results.jsonl and cells.jsonl written by `prunebias_jax.main`. The rules (a)-(c) are
those stated in docs/results.md before the run; nothing here is tuned to the outcome. The
script reads only the records and recomputes nothing that they hold: it selects, counts,
fits the regression of rule (b2) and bootstraps the correlations of rule (c).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import scipy.stats

from prunebias_jax.metrics import stats as pm

SETTINGS = ("imbalanced", "balanced")
PRUNED = (0.5, 0.8)
RESAMPLES = 2000
CONFIDENCE = 0.95
# (record field, expected sign of its correlation with CEV, label)
SIMILARITIES = (("cka", -1, "linear CKA"), ("svcca", +1, "SVCCA distance"))

Record = dict[str, Any]


def read_jsonl(path: Path) -> list[Record]:
  if not path.is_file():
    sys.exit(f"error: {path} is missing: run scripts/evidence_cifar10.sh first")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(workdir: Path) -> dict[str, dict[str, Any]]:
  """Both settings' records; the seeds (0, 1, 2 in the design) are read from them."""
  global SEEDS
  runs = {}
  for setting in SETTINGS:
    d = workdir / setting
    records = read_jsonl(d / "results.jsonl")
    runs[setting] = {
      "records": records,
      "cells": read_jsonl(d / "cells.jsonl"),
      "dataset": json.loads((d / "dataset.json").read_text()),
      "timings": json.loads((d / "timings.json").read_text()),
      "dense": next(r for r in records if r["method"] == "dense"),
      "students": {
        (r["sparsity"], r["distill"], r["seed"]): r for r in records if r["method"] != "dense"
      },
    }
  SEEDS = tuple(
    sorted({r["seed"] for r in runs["imbalanced"]["records"] if r["method"] != "dense"})
  )
  return runs


SEEDS: tuple[int, ...] = ()


def _student(run: dict[str, Any], sparsity: float, distill: str, seed: int) -> Record:
  key = (sparsity, distill, seed)
  if key not in run["students"]:
    sys.exit(f"error: no student {key} in the records; is the run complete?")
  return run["students"][key]


def rule_a(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """value(0.8, s) − value(0, s) > spread of the control, for every setting/student/seed/metric."""
  rows, holds = [], True
  for setting, run in runs.items():
    for distill in ("ce", "kd"):
      for metric in ("cev", "sde"):
        control = [_student(run, 0.0, distill, s)[metric] for s in SEEDS]
        spread = max(control) - min(control)
        for s in SEEDS:
          rise = _student(run, 0.8, distill, s)[metric] - _student(run, 0.0, distill, s)[metric]
          mid = _student(run, 0.5, distill, s)[metric] - _student(run, 0.0, distill, s)[metric]
          ok = rise > spread
          holds &= ok
          rows.append(
            dict(
              setting=setting,
              distill=distill,
              metric=metric,
              seed=s,
              rise_0_to_05=mid,
              rise_0_to_08=rise,
              control_spread=spread,
              holds=ok,
            )
          )
  return {"holds": holds, "comparisons": rows, "failed": [r for r in rows if not r["holds"]]}


def kd_effect(run: dict[str, Any], metric: str) -> dict[str, Any]:
  """OLS of log(metric) on [1, sparsity=0.8, KD, accuracy] over the 12 pruned students: the KD
  coefficient with its t-interval (n − 4 degrees of freedom)."""
  X, y = [], []
  for sparsity in PRUNED:
    for distill in ("ce", "kd"):
      for s in SEEDS:
        r = _student(run, sparsity, distill, s)
        X.append([1.0, float(sparsity == 0.8), float(distill == "kd"), r["accuracy"]])
        y.append(math.log(r[metric]))
  X, y = np.asarray(X), np.asarray(y)
  beta, *_ = np.linalg.lstsq(X, y, rcond=None)
  dof = len(y) - X.shape[1]
  resid = y - X @ beta
  sigma2 = float(resid @ resid) / dof
  se = np.sqrt(np.diag(sigma2 * np.linalg.inv(X.T @ X)))
  t = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, dof)
  b, e = float(beta[2]), float(se[2])
  return {"coefficient": b, "ci": [b - t * e, b + t * e], "dof": dof, "n": len(y)}


def rule_b(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for metric in ("cev", "sde"):
    per_setting = {}
    for setting, run in runs.items():
      pairs = [
        (_student(run, sp, "ce", s)[metric], _student(run, sp, "kd", s)[metric])
        for sp in PRUNED
        for s in SEEDS
      ]
      wins = sum(kd < ce for ce, kd in pairs)
      effect = kd_effect(run, metric)
      per_setting[setting] = {
        "kd_lower_pairs": wins,
        "pairs": len(pairs),
        "b1": wins >= len(pairs) - 1,  # the design's 5 of 6
        "log_ratio_gap": float(np.mean([math.log(ce / kd) for ce, kd in pairs])),
        "mean_difference": float(np.mean([ce - kd for ce, kd in pairs])),
        "accuracy_adjusted_kd_effect": effect,
        "b2": effect["coefficient"] < 0,
      }
    b3 = per_setting["imbalanced"]["log_ratio_gap"] > per_setting["balanced"]["log_ratio_gap"]
    holds = b3 and all(v["b1"] and v["b2"] for v in per_setting.values())
    out[metric] = {"settings": per_setting, "b3": b3, "holds": holds}
  out["holds"] = out["cev"]["holds"]  # SDE is secondary: it does not decide
  return out


def _spearman_ci(x, y, clusters, seed: int, z=None) -> list[float]:
  kw = dict(
    method="spearman",
    key=jax.random.key(seed),
    num_resamples=RESAMPLES,
    confidence=CONFIDENCE,
    clusters=np.asarray(clusters),
  )
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  if z is None:
    r, lo, hi = pm.correlation_ci(x, y, **kw)
  else:
    r, lo, hi = pm.partial_correlation_ci(x, y, np.asarray(z, np.float32), **kw)
  return [float(r), float(lo), float(hi)]


def rule_c(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  rows, holds, seed = [], True, 0
  for setting, run in runs.items():
    for field, sign, label in SIMILARITIES:
      estimates = []
      for sp in PRUNED:
        members = [_student(run, sp, d, s) for s in SEEDS for d in ("ce", "kd")]
        estimates.append(
          (
            f"within sparsity {sp}",
            _spearman_ci(
              [m[field] for m in members],
              [m["cev"] for m in members],
              [m["seed"] for m in members],
              seed,
            ),
          )
        )
        seed += 1
      members = [_student(run, sp, d, s) for sp in PRUNED for s in SEEDS for d in ("ce", "kd")]
      clusters = [PRUNED.index(m["sparsity"]) * len(SEEDS) + m["seed"] for m in members]
      estimates.append(
        (
          "partial on accuracy",
          _spearman_ci(
            [m[field] for m in members],
            [m["cev"] for m in members],
            clusters,
            seed,
            z=[m["accuracy"] for m in members],
          ),
        )
      )
      seed += 1
      for scope, (r, lo, hi) in estimates:
        # The expected sign, with the whole interval on that side of zero.
        ok = sign * r > 0 and (lo > 0 if sign > 0 else hi < 0)
        holds &= ok
        rows.append(
          dict(
            setting=setting,
            similarity=label,
            scope=scope,
            expected_sign=sign,
            spearman=r,
            ci=[lo, hi],
            holds=ok,
          )
        )
  return {"holds": holds, "estimates": rows}


def fmt(v: float | None, digits: int = 4) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "–"
  return f"{v:.{digits}g}"


def cell_tables(runs: dict[str, dict[str, Any]], reduced: list[int]) -> list[str]:
  out = []
  for setting, run in runs.items():
    names = run["dataset"]["class_names"]
    out += [
      f"#### {setting.capitalize()} fine-tuning "
      f"({sum(run['dataset']['finetune_train_class_counts']):,} images)",
      "",
      "| sparsity | student | accuracy [seed 95% CI] | CEV [seed 95% CI] | SDE [seed 95% CI] "
      "| CEV / SDE of seed-mean rates | CKA | SVCCA dist. | zero-rate classes "
      "| CE−KD CEV (sign p, Wilcoxon p) | CE−KD SDE (sign p, Wilcoxon p) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in run["cells"]:
      if c["method"] == "dense":
        continue

      def ci(field: str, digits: int = 4) -> str:
        lo, hi = c.get(f"{field}_seed_ci", [None, None])
        return f"{fmt(c[f'{field}_seed_mean'], digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"

      paired = c.get("paired_vs_ce")
      cev_pair = sde_pair = "–"
      if paired:
        cev_pair = (
          f"{fmt(paired['cev_diff'])} ({fmt(paired['cev_sign_test_p'], 2)}, "
          f"{fmt(paired['cev_wilcoxon_p'], 2)})"
        )
        sde_pair = (
          f"{fmt(paired['sde_diff'])} ({fmt(paired['sde_sign_test_p'], 2)}, "
          f"{fmt(paired['sde_wilcoxon_p'], 2)})"
        )
      zero = max(_student(run, c["sparsity"], c["distill"], s)["zero_rate_classes"] for s in SEEDS)
      out.append(
        f"| {c['sparsity']:g} | {c['distill'].upper()} | {ci('accuracy')} | {ci('cev')} "
        f"| {ci('sde')} | {fmt(c['cev'])} / {fmt(c['sde'])} "
        f"| {fmt(c['cka_seed_mean'], 3)} | {fmt(c['svcca_seed_mean'], 3)} "
        f"| {zero} | {cev_pair} | {sde_pair} |"
      )
    out += [
      "",
      "Per-class ΔFNR of the reduced classes (%, mean over seeds; "
      f"{', '.join(names[k] for k in reduced)} kept "
      f"{', '.join(str(run['dataset']['finetune_train_class_counts'][k]) for k in reduced)} "
      "fine-tuning images):",
      "",
      "| sparsity | student | " + " | ".join(names[k] for k in reduced) + " |",
      "|---|---|" + "---|" * len(reduced),
    ]
    for c in run["cells"]:
      if c["method"] == "dense":
        continue
      members = [_student(run, c["sparsity"], c["distill"], s) for s in SEEDS]
      dfnr = np.mean([m["dfnr"] for m in members], axis=0)
      out.append(
        f"| {c['sparsity']:g} | {c['distill'].upper()} | "
        + " | ".join(f"{dfnr[k]:+.0f}" for k in reduced)
        + " |"
      )
    out.append("")
  return out


def markdown(runs, a, b, c, reduced) -> str:
  teacher = runs["imbalanced"]["dense"]
  same = runs["balanced"]["dense"]["accuracy"] == teacher["accuracy"]
  wall = {s: runs[s]["timings"]["total"] for s in SETTINGS}
  lines = [
    f"Teacher (dense ResNet-20): test accuracy **{teacher['accuracy']:.4f}** on "
    f"{teacher['num_test_examples']:,} images; zero-rate classes "
    f"{teacher['zero_rate_classes']} (the students' are in the tables). The balanced run "
    f"restored the same teacher: {'yes' if same else 'NO, its accuracy differs'}.",
    f"Wall time: imbalanced run {wall['imbalanced'] / 60:.1f} min, balanced run "
    f"{wall['balanced'] / 60:.1f} min (its teacher restored).",
    "",
  ]
  lines += cell_tables(runs, reduced)
  lines += [
    "#### Per seed (rules a and b1)",
    "",
    "| setting | sparsity | seed | CEV CE | CEV KD | SDE CE | SDE KD | acc CE | acc KD |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for setting, run in runs.items():
    for sp in (0.0, *PRUNED):
      for s in SEEDS:
        ce, kd = _student(run, sp, "ce", s), _student(run, sp, "kd", s)
        lines.append(
          f"| {setting} | {sp:g} | {s} | {fmt(ce['cev'])} | {fmt(kd['cev'])} | {fmt(ce['sde'])} "
          f"| {fmt(kd['sde'])} | {ce['accuracy']:.4f} | {kd['accuracy']:.4f} |"
        )
  verdict = {True: "**holds**", False: "**fails**"}
  lines += [
    "",
    "#### Decisions",
    "",
    f"- **(a)** {verdict[a['holds']]}: {len(a['comparisons']) - len(a['failed'])} of "
    f"{len(a['comparisons'])} comparisons hold.",
  ]
  for r in a["failed"]:
    lines.append(
      f"  - fails: {r['setting']} {r['distill'].upper()} {r['metric'].upper()} seed "
      f"{r['seed']}: rise 0→0.8 {fmt(r['rise_0_to_08'])} vs control spread "
      f"{fmt(r['control_spread'])}"
    )
  for metric in ("cev", "sde"):
    m = b[metric]
    role = "decides" if metric == "cev" else "secondary, does not decide"
    lines.append(f"- **(b) on {metric.upper()}** ({role}): {verdict[m['holds']]}.")
    for setting, v in m["settings"].items():
      e = v["accuracy_adjusted_kd_effect"]
      lines.append(
        f"  - {setting}: KD lower in {v['kd_lower_pairs']} of {v['pairs']} pairs "
        f"(b1 {'holds' if v['b1'] else 'fails'}); accuracy-adjusted KD effect on log "
        f"{metric.upper()} {e['coefficient']:+.3f} [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}] "
        f"(b2 {'holds' if v['b2'] else 'fails'}); gap mean log(CE/KD) "
        f"{v['log_ratio_gap']:+.3f}, mean CE−KD {fmt(v['mean_difference'])}"
      )
    lines.append(f"  - b3 (imbalanced gap > balanced gap): {'holds' if m['b3'] else 'fails'}")
  lines.append(f"- **(c)** {verdict[c['holds']]}:")
  for r in c["estimates"]:
    lines.append(
      f"  - {r['setting']}, {r['similarity']} vs CEV, {r['scope']}: Spearman "
      f"{r['spearman']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] (expected "
      f"{'+' if r['expected_sign'] > 0 else '−'}; {'holds' if r['holds'] else 'fails'})"
    )
  return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, Any]], reduced: list[int], path: Path) -> None:
  """One figure, a column per setting: CEV against sparsity (each seed a point, the seed mean a
  line, CE and KD), and the seed-mean ΔFNR of the reduced classes, CE and KD side by side."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, NullFormatter

  sparsities = (0.0, *PRUNED)
  colors = {"ce": "tab:red", "kd": "tab:blue"}
  with matplotlib.rc_context({"text.parse_math": False}):
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 7), squeeze=False)
    for col, (setting, run) in enumerate(runs.items()):
      top, bottom = axes[0, col], axes[1, col]
      for j, distill in enumerate(("ce", "kd")):
        values = np.array(
          [[_student(run, sp, distill, s)["cev"] for s in SEEDS] for sp in sparsities]
        )
        x = np.arange(len(sparsities)) + (j - 0.5) * 0.08
        for k in range(len(SEEDS)):
          top.scatter(x, values[:, k], color=colors[distill], s=14, alpha=0.6)
        top.plot(x, values.mean(1), color=colors[distill], label=f"{distill.upper()} seed mean")
        for i, sp in enumerate(sparsities):
          dfnr = np.mean([_student(run, sp, distill, s)["dfnr"] for s in SEEDS], axis=0)
          width = 0.8 / (2 * len(reduced))
          pos = i + (np.arange(len(reduced)) * 2 + j - len(reduced) + 0.5) * width
          bottom.bar(
            pos,
            dfnr[reduced],
            width,
            color=colors[distill],
            alpha=0.5 + 0.5 * j,
            label=distill.upper() if i == 0 else None,
          )
      names = run["dataset"]["class_names"]
      top.set_yscale("log")
      # Plain tick labels: with mathtext off the log axis' default labels show as '$…$'.
      top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
      top.yaxis.set_minor_formatter(NullFormatter())
      top.set_xticks(range(len(sparsities)), [f"{sp:g}" for sp in sparsities])
      top.set_xlabel("sparsity (structured L1 filter, one shot)")
      top.set_ylabel("CEV vs the teacher (percent², log)")
      top.set_title(f"{setting} fine-tuning, seeds {', '.join(map(str, SEEDS))}")
      top.legend()
      ticks, labels = [], []
      for i, sp in enumerate(sparsities):
        width = 0.8 / (2 * len(reduced))
        for n, k in enumerate(reduced):
          ticks.append(i + (2 * n + 1 - len(reduced)) * width)
          labels.append(f"{names[k]}\n{sp:g}")
      bottom.set_xticks(ticks, labels, fontsize=7)
      bottom.axhline(0, color="black", linewidth=0.5)
      bottom.set_ylabel("ΔFNR, seed mean (percent)")
      bottom.set_title("reduced classes, by sparsity")
      bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdir", type=Path)
  p.add_argument("--markdown", type=Path, help="write the tables and decisions here")
  p.add_argument("--json", type=Path, help="write every figure of the decisions here")
  p.add_argument("--plot", type=Path, help="draw CEV by sparsity and the reduced classes' ΔFNR")
  args = p.parse_args(argv)
  runs = load(args.workdir)
  counts = runs["imbalanced"]["dataset"]["finetune_train_class_counts"]
  reduced = [k for k, n in enumerate(counts) if n < max(counts)]
  a, b, c = rule_a(runs), rule_b(runs), rule_c(runs)
  text = markdown(runs, a, b, c, reduced)
  print(text)
  if args.markdown:
    args.markdown.write_text(text)
  if args.json:
    args.json.write_text(json.dumps({"a": a, "b": b, "c": c}, indent=1, sort_keys=True) + "\n")
  if args.plot:
    plot(runs, reduced, args.plot)


if __name__ == "__main__":
  main()
