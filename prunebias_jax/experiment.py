"""The Simon Says pipeline: one function that reads top to bottom over the stages.

    prepare: config, workdir, data, model and checkpoints checked before any training
    dense teacher (and the dense population, analysis.dense_seeds), trained or restored
    for each seed group × compression method × sparsity: prune once, then
         student    = fine-tune(teacher ⊙ masks, CE)
         student_kd = fine-tune(teacher ⊙ masks, (1−α)·CE + α·T²·KL)   (per KD temperature)
         (and a student per feature distillation of distill.method: γ·CE [+ α'·T²·KL] + β·F)
         a quantized method (quantization.schemes): the teacher (⊙ masks) quantized as it is
         (PTQ), and those students fine-tuned with fake quantization (QAT)
         every model evaluated on the full test set; a record against the dense teacher
    per-cell records (seeds as populations) and similarity–bias correlations
    results.jsonl, cells.jsonl, correlations.jsonl, results.md, plots/, timings.json,
    predictions.npz (every model's test predictions and logits, for audits and re-analysis)

`stages.py` trains and evaluates, `records.py` computes what the records say, `report.py`
writes what people read, `workdir.py` owns the workdir. A rerun of the same command restores
every finished model, continues an interrupted stage, and writes the same results.jsonl,
byte for byte on CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

import ml_collections
from absl import logging

from prunebias_jax import records as rec
from prunebias_jax import report, stages
from prunebias_jax.files import directory_size, format_bytes
from prunebias_jax.train.loop import format_duration

Record = rec.Record
DENSE_IDENTITY = {"method": "dense", "sparsity": 0.0, "kd": False, "temperature": None}
DENSE_IDENTITY["distill"] = None  # not fine-tuned


def run(
  config: ml_collections.ConfigDict, workdir: str | Path, explicit_keys: Collection[str] = ()
) -> list[Record]:
  """Runs the whole experiment; returns the records written to results.jsonl.

  `explicit_keys`: dotted config keys the user overrode (they are not replaced by runlocal).
  """
  start = time.perf_counter()
  ctx = stages.prepare(config, workdir, explicit_keys)
  cfg, data = ctx.config, ctx.data
  if ctx.writer:
    report.write_run_description(ctx.workdir, cfg, data)
  timings = {"load_data": ctx.load_seconds}

  dense = []  # (seed, Model): the teacher first
  for seed in stages.dense_seeds(cfg):
    t = time.perf_counter()
    dense.append((seed, stages.train_dense(ctx, seed)))
    timings["dense" if seed == cfg.seed else f"dense_seed{seed}"] = time.perf_counter() - t
  teacher = dense[0][1].variables
  dense_outputs = [stages.evaluate_members(ctx, [model])[0] for _, model in dense]
  test, a = data.test, cfg.analysis
  ref = rec.reference(
    test.labels, test.groups, data.num_classes, dense_outputs[0], a.svcca_examples, cfg.seed
  )
  base = {"model": cfg.model, "dataset": data.name, "num_test_examples": len(data.test)}
  records, evaluated = [], list(dense_outputs)  # evaluated[i]: the outputs behind records[i]
  for (seed, model), out in zip(dense, dense_outputs):
    identity = {**base, **DENSE_IDENTITY, "seed": seed, "reference": seed == cfg.seed}
    records.append(rec.full_record(ref, out, identity, cfg, model.variables, None, model.training))
    logging.info("dense model (seed %d): test accuracy %.4f", seed, records[-1]["accuracy"])

  t = time.perf_counter()
  outputs = {}  # cell key → [Outputs per seed]
  groups = stages.pruning_groups(cfg)
  for i, (seeds, method, sparsity) in enumerate(groups):
    masks = stages.initial_masks(ctx, teacher, method, sparsity, seeds)
    for cell in stages.variants(cfg, method, sparsity):
      cell_seeds = stages.cell_seeds(cfg, cell, seeds)
      if not cell_seeds:  # a PTQ of the unpruned teacher: one model, made in the first group
        continue
      members = stages.finetune(ctx, teacher, cell, cell_seeds, masks)
      for seed, member, out in zip(cell_seeds, members, stages.evaluate_members(ctx, members)):
        identity = {**base, **cell.identity, "seed": seed}
        m = member
        records.append(
          rec.full_record(ref, out, identity, cfg, m.variables, m.masks, m.training, m.scheme)
        )
        outputs.setdefault(cell.key, []).append(out.without_maps())
        evaluated.append(outputs[cell.key][-1])
        _log_model(cfg, i, groups, cell, seed, records, t)
  timings["pruned_models"] = time.perf_counter() - t

  t = time.perf_counter()
  cells, cie_indices = rec.cell_records(ref, dense_outputs, records, outputs, cfg)
  correlations = rec.correlations(records, cells, cfg.analysis, cfg.seed)
  timings["analysis"] = time.perf_counter() - t
  t = time.perf_counter()
  if ctx.writer:
    showcase = rec.showcase(ref, cells, cie_indices, outputs, cfg.report.cka_cell)
    table = report.write_report(
      ctx.workdir, cfg, data, records, cells, correlations, showcase, evaluated
    )
    print(table, flush=True)
  timings["report"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start
  if ctx.writer:
    report.write_timings(ctx.workdir, timings)
    _log_disk(ctx.workdir)
  return records


def _log_model(
  cfg: ml_collections.ConfigDict,
  i: int,
  groups: list,
  cell: stages.Cell,
  seed: int,
  records: list[Record],
  since: float,
) -> None:
  """One line per evaluated student (the last of `records`), with the sweep's ETA: the time
  per student so far times the students left (`since`: when the first group started)."""
  record, total = records[-1], len(groups)
  students = sum(
    len(stages.cell_seeds(cfg, c, s)) for s, m, sp in groups for c in stages.variants(cfg, m, sp)
  )
  done = sum(r["method"] != "dense" for r in records)
  elapsed = time.perf_counter() - since
  eta = elapsed / done * (students - done)
  logging.info(
    "[%d/%d] %-16s s=%-5g %-8s seed %d: acc %.4f CEV %.4g SDE %.4g CKA %.4f SVCCA %.4f "
    "realised sparsity %.4f; sweep %s elapsed, ETA %s",
    i + 1,
    total,
    cell.method,
    cell.sparsity,
    cell.label,
    seed,
    record["accuracy"],
    _or_nan(record["cev"]),
    _or_nan(record["sde"]),
    _or_nan(record["cka"]),
    _or_nan(record["svcca"]),
    record["realized_sparsity"],
    format_duration(elapsed),
    format_duration(eta),
  )


def _or_nan(v: float | None) -> float:
  return float("nan") if v is None else v


def _log_disk(workdir: Path) -> None:
  """The run's last lines: where to look, and what the workdir holds on disk."""
  logging.info(
    "done: %s (tables), %s (figures), results.jsonl / cells.jsonl / predictions.npz (data), "
    "metrics.jsonl (training curves)",
    workdir / "results.md",
    workdir / "plots",
  )
  logging.info(
    "workdir %s: %s on disk (checkpoints %s; keep fewer with checkpoint.keep, or delete "
    "checkpoints/ once results are final)",
    workdir,
    format_bytes(directory_size(workdir)),
    format_bytes(directory_size(workdir / "checkpoints")),
  )
