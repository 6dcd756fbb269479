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

The sweep is made of units (`units`): the dense models, then one per cell and seed group.
Each unit's records go to their own file (`cellfiles`) the moment it is done, holding the
unit's lock (`claims`), with a line in provenance.jsonl (`history`); the run files are
assembled from those files in plan order. So any number of workers may share a workdir
(shards, `config.stage`, the Ray engine in `sweep.py`): the teacher is trained once while the
others wait, each cell by one worker, and the run files do not depend on who ran what.

`stages.py` trains and evaluates, `records.py` computes what the records say, `report.py`
writes what people read, `workdir.py` owns the workdir. A rerun of the same command restores
every finished model, continues an interrupted stage, and writes the same results.jsonl,
byte for byte on CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from prunebias_jax import cellfiles, compilecache, history, report, stages, units
from prunebias_jax import records as rec
from prunebias_jax import workdir as wd
from prunebias_jax.claims import Worker, agree
from prunebias_jax.config import shard_index
from prunebias_jax.errors import StageOrderError, one_line
from prunebias_jax.files import directory_size, format_bytes, owner
from prunebias_jax.train.loop import format_duration

Record = rec.Record
DENSE_IDENTITY = {"method": "dense", "sparsity": 0.0, "kd": False, "temperature": None}
DENSE_IDENTITY["distill"] = None  # not fine-tuned


def run(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  explicit_keys: Collection[str] = (),
  only: Collection[str] | None = None,
) -> list[Record]:
  """Runs the stages `config.stage` names; returns the records of results.jsonl when this
  call wrote it, else those of the units it handled.

  `explicit_keys`: dotted config keys the user overrode (they are not replaced by runlocal).
  `only`: the names of the units to run (a sweep engine's task), instead of this shard's.
  """
  start = time.perf_counter()
  worker = Worker(workdir)
  ctx = stages.prepare(config, workdir, explicit_keys, worker)
  cfg = ctx.config
  cache = compilecache.enable(cfg.compile_cache)  # a process-wide JAX setting: the run's own
  logging.info(
    "compilation cache: %s",
    f"{cache} (--config.compile_cache=off turns it off)" if cache else "off",
  )
  if ctx.writer:
    report.write_run_description(ctx.workdir, cfg, ctx.data)
  timings = {"load_data": ctx.load_seconds}
  sweep = units.plan(cfg)
  mine = units.shard(sweep, cfg.shard.count, shard_index(cfg))
  if only is not None:
    mine = [u for u in sweep if u.name in set(only)]
  if cfg.stage == "report":
    return report_stage(ctx, worker, sweep, timings, start) or []
  base = dense_stage(ctx, worker, timings, train=cfg.stage != "cells")
  if cfg.stage == "dense":
    return base.records
  t = time.perf_counter()
  done = cells_stage(ctx, worker, base, mine)
  timings["pruned_models"] = time.perf_counter() - t
  written = report_stage(ctx, worker, sweep, timings, start) if cfg.stage == "all" else None
  return written if written is not None else [r for s in done for r in s.records]


def run_stage(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  explicit_keys: Collection[str],
  stage: str,
  only: Collection[str] | None = None,
) -> dict[str, Any]:
  """One task of a sweep engine (`sweep.py`): `run` of `stage` ('dense', 'cells' of the
  units `only`, 'report'); returns what its progress line says."""
  t = time.time()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.stage = stage
  records = run(config, workdir, explicit_keys, only=only)
  return {"worker": owner(), "seconds": time.time() - t, "models": len(records)}


class Base(NamedTuple):
  """What every cell needs of the dense stage."""

  ref: rec.Reference
  records: list[Record]  # the dense models' (the teacher's first)
  outputs: list[rec.Outputs]
  teacher: Callable[[], Any]  # the teacher's variables, restored on first use
  identity: dict[str, Any]  # the fields every record starts with


def _identity(ctx: stages.RunContext) -> dict[str, Any]:
  data = ctx.data
  return {"model": ctx.config.model, "dataset": data.name, "num_test_examples": len(data.test)}


def _dense_names(ctx: stages.RunContext) -> list[str]:
  return [stages.dense_name(ctx.config, s) for s in stages.dense_seeds(ctx.config)]


def _key(ctx: stages.RunContext, name: str, checkpoints: list[str], cell: Any = None) -> str:
  models = {n: ctx.identities.get(n) for n in checkpoints + [units.DENSE]}
  return cellfiles.key(ctx.config, name, models, cell)


def _base(ctx: stages.RunContext, stored: cellfiles.Stored, trained: dict) -> Base:
  cfg, test = ctx.config, ctx.data.test
  ref = rec.reference(
    test.labels,
    test.groups,
    ctx.data.num_classes,
    stored.outputs[0],
    cfg.analysis.svcca_examples,
    cfg.seed,
  )

  def teacher() -> Any:
    if "teacher" not in trained:
      trained["teacher"] = stages.train_dense(ctx, cfg.seed).variables  # restores it
    return trained["teacher"]

  return Base(ref, stored.records, stored.outputs, teacher, _identity(ctx))


def dense_stage(
  ctx: stages.RunContext, worker: Worker, timings: dict[str, float], train: bool = True
) -> Base:
  """The dense unit: the teacher and the dense population trained (or restored) and
  evaluated by one worker while the others wait. `train=False` (stage 'cells'): only waited
  for; StageOrderError when no worker has done it."""
  cfg, trained = ctx.config, {}

  def compute() -> tuple[list[Record], list[rec.Outputs]]:
    if not train:
      raise StageOrderError(
        f"--config.stage=cells needs the dense stage, which is not done in {ctx.workdir}: run "
        "--config.stage=dense first (or stage=all)"
      )
    models = []
    for seed in stages.dense_seeds(cfg):
      t = time.perf_counter()
      models.append((seed, stages.train_dense(ctx, seed)))
      timings["dense" if seed == cfg.seed else f"dense_seed{seed}"] = time.perf_counter() - t
    trained["teacher"] = models[0][1].variables
    teacher = trained["teacher"]
    outputs = [stages.evaluate_members(ctx, [model], teacher)[0] for _, model in models]
    test = ctx.data.test
    ref = rec.reference(
      test.labels,
      test.groups,
      ctx.data.num_classes,
      outputs[0],
      cfg.analysis.svcca_examples,
      cfg.seed,
    )
    records = []
    for (seed, model), out in zip(models, outputs):
      identity = {**_identity(ctx), **DENSE_IDENTITY, "seed": seed, "reference": seed == cfg.seed}
      records.append(
        rec.full_record(ref, out, identity, cfg, model.variables, None, model.training)
      )
      logging.info("dense model (seed %d): test accuracy %.4f", seed, records[-1]["accuracy"])
    return records, outputs

  names = _dense_names(ctx)
  stored = handle(ctx, worker, units.DENSE, _key(ctx, units.DENSE, names), compute, names)
  return _base(ctx, stored, trained)


def cells_stage(
  ctx: stages.RunContext, worker: Worker, base: Base, mine: list[units.Unit]
) -> list[cellfiles.Stored]:
  """Every unit of `mine`, each by one worker: a first pass takes the free ones (a unit
  another worker holds is left to it), a second waits for the rest (and does a unit whose
  worker died). Returns their stored records, in plan order."""
  done: dict[str, cellfiles.Stored] = {}
  masks: dict[tuple, Callable] = {}  # (method, sparsity, group) → masks, pruned once
  since, models = time.perf_counter(), sum(len(u.seeds) for u in mine)
  for wait in (False, True):
    for unit in mine:
      if unit.name in done:
        continue
      key = _key(ctx, unit.name, unit.checkpoints, list(unit.cell.key))
      stored = handle(
        ctx, worker, unit.name, key, lambda: _cell(ctx, base, unit, masks), unit.checkpoints, wait
      )
      if stored is None:
        logging.info("%s: taken by %s; next cell", unit.name, worker.holder(unit.name))
        continue
      done[unit.name] = stored
      _log_unit(unit, stored.records, len(done), len(mine), models, since, done)
  return [done[u.name] for u in mine]


def _cell(
  ctx: stages.RunContext, base: Base, unit: units.Unit, masks: dict
) -> tuple[list[Record], list[rec.Outputs]]:
  """Fine-tunes (or restores) and evaluates one unit's students; their records."""
  cell, teacher = unit.cell, base.teacher()
  group = (cell.method, cell.sparsity, unit.group)
  if group not in masks:
    masks[group] = stages.initial_masks(ctx, teacher, cell.method, cell.sparsity, unit.group)
  members = stages.finetune(ctx, teacher, cell, unit.seeds, masks[group])
  records, outputs = [], []
  for seed, m, out in zip(unit.seeds, members, stages.evaluate_members(ctx, members, teacher)):
    identity = {**base.identity, **cell.identity, "seed": seed}
    records.append(
      rec.full_record(
        base.ref, out, identity, ctx.config, m.variables, m.masks, m.training, m.scheme
      )
    )
    outputs.append(out.without_maps())
  return records, outputs


def handle(
  ctx: stages.RunContext,
  worker: Worker,
  name: str,
  key: str,
  compute: Callable[[], tuple[list[Record], list[rec.Outputs]]],
  checkpoints: list[str],
  wait: bool = True,
) -> cellfiles.Stored | None:
  """Unit `name`'s records: read from its file when current, else computed holding its lock
  and written (a line in provenance.jsonl). None when another worker holds it and `wait` is
  False."""
  stored = _read(ctx, name, key)
  if stored is not None:
    return stored
  with worker.holding(name, wait) as waited:
    if waited is None:
      return None
    t = time.time()
    stored = _read(ctx, name, key)
    if stored is not None:  # done by the worker that held it
      history.append(ctx.workdir, name, "waited" if waited else "restored", worker.owner, t, t)
      return stored
    if waited:
      logging.info("%s: its worker stopped before finishing it; this worker does it", name)
    saved = bool(checkpoints) and all(wd.is_saved(ctx.workdir, c) for c in checkpoints)
    try:
      records, outputs = compute()
      if ctx.writer:
        cellfiles.write(ctx.workdir, name, key, records, outputs)
      wd.barrier(f"{name} written")
    except BaseException as e:
      detail = f"{type(e).__name__}: {one_line(e, 300)}"
      history.append(ctx.workdir, name, "failed", worker.owner, t, time.time(), detail)
      raise
    action = "restored" if saved else "trained"
    history.append(ctx.workdir, name, action, worker.owner, t, time.time())
  return cellfiles.Stored(records, outputs)


def _read(ctx: stages.RunContext, name: str, key: str) -> cellfiles.Stored | None:
  """The unit's stored records if process 0 finds them current (multi-host: every process)."""
  stored = cellfiles.read(ctx.workdir, name, key)
  if not agree(int(stored is not None)):
    return None
  if stored is None:  # process 0 read it, this one cannot: not a shared filesystem
    raise StageOrderError(f"{cellfiles.path(ctx.workdir, name)} is not readable on this host")
  return stored


def report_stage(
  ctx: stages.RunContext, worker: Worker, sweep: list[units.Unit], timings: dict, start: float
) -> list[Record] | None:
  """The run files from every unit's records, in plan order, holding the report lock; None
  (sharded stage 'all') when cells of other shards are not done yet: the last shard to
  finish writes them. Waits for cells that another worker is doing."""
  cfg = ctx.config
  dense = _read(ctx, units.DENSE, _key(ctx, units.DENSE, _dense_names(ctx)))
  stored, missing = [], []
  for unit in sweep:
    key = _key(ctx, unit.name, unit.checkpoints, list(unit.cell.key))
    s = _read(ctx, unit.name, key)
    if s is None and dense is not None:
      with worker.holding(unit.name):  # another worker may be finishing it
        s = _read(ctx, unit.name, key)
    stored.append(s)
    if s is None:
      missing.append(unit.name)
  if dense is None or missing:
    what = ["dense"] * (dense is None) + missing
    message = (
      f"{len(what)} of {len(sweep) + 1} units are not done ({', '.join(what[:3])}"
      f"{', ...' if len(what) > 3 else ''})"
    )
    if cfg.stage == "report":
      raise StageOrderError(
        f"--config.stage=report needs every cell: {message}; run their shards with "
        "--config.stage=cells (or stage=all) first"
      )
    logging.info(
      "%s: the last shard to finish writes the report (or --config.stage=report)", message
    )
    return None
  with worker.holding("report"):
    t = time.time()
    records = _write_report(ctx, _base(ctx, dense, {}), sweep, stored, timings, start)
    history.append(ctx.workdir, "report", "written", worker.owner, t, time.time())
  return records


def _write_report(
  ctx: stages.RunContext,
  base: Base,
  sweep: list[units.Unit],
  stored: list[cellfiles.Stored],
  timings: dict,
  start: float,
) -> list[Record]:
  cfg, ref = ctx.config, base.ref
  records, evaluated = list(base.records), list(base.outputs)  # evaluated[i]: behind records[i]
  outputs = {}  # cell key → [Outputs per seed], in plan order
  for unit, s in zip(sweep, stored):
    records += s.records
    evaluated += s.outputs
    outputs.setdefault(unit.cell.key, []).extend(s.outputs)
  t = time.perf_counter()
  cells, cie_indices = rec.cell_records(ref, base.outputs, records, outputs, cfg)
  correlations = rec.correlations(records, cells, cfg.analysis, cfg.seed)
  timings["analysis"] = time.perf_counter() - t
  t = time.perf_counter()
  if ctx.writer:
    showcase = rec.showcase(ref, cells, cie_indices, outputs, cfg.report.cka_cell)
    table = report.write_report(
      ctx.workdir, cfg, ctx.data, records, cells, correlations, showcase, evaluated
    )
    print(table, flush=True)
  timings["report"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start
  if ctx.writer:
    report.write_timings(ctx.workdir, timings)
    _log_disk(ctx.workdir)
  return records


def _log_unit(
  unit: units.Unit,
  records: list[Record],
  done: int,
  total: int,
  models: int,
  since: float,
  finished: dict,
) -> None:
  """One line per student of a finished unit, with this worker's ETA: the time per student
  so far times the students of its units left (`since`: when its first unit started)."""
  cell = unit.cell
  left = models - sum(len(s.records) for s in finished.values())
  elapsed = time.perf_counter() - since
  eta = elapsed / max(models - left, 1) * left
  for record in records:
    logging.info(
      "[%d/%d] %-16s s=%-5g %-8s seed %d: acc %.4f CEV %.4g SDE %.4g CKA %.4f SVCCA %.4f "
      "realised sparsity %.4f; %s elapsed, ETA %s",
      done,
      total,
      cell.method,
      cell.sparsity,
      cell.label,
      record["seed"],
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
