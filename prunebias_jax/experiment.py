"""The Simon Says pipeline, stage by stage.

    data → dense teacher (trained from scratch, checkpointed)
         → for each pruning method × sparsity × seed: masks = prune(teacher params)
              student    = fine-tune(teacher ⊙ masks, CE)
              student_kd = fine-tune(teacher ⊙ masks, (1−α)·CE + α·T²·KL)
         → every model evaluated on the full test set; metrics against the dense reference
         → results.jsonl, results.md, plots/, config.json, dataset.json, timings.json

Every trained model is an Orbax checkpoint in the workdir, and a training stage in progress
saves mid-stage checkpoints (`checkpoint.every_steps`); a rerun of the same command restores
finished models, continues an interrupted stage from its last step, and — since the data
order, the RNG and the evaluation are deterministic — writes the same results.jsonl, byte for
byte on CPU, as a run that was never interrupted. Every file of record is written to a
temporary name and renamed, so a killed run never leaves a half-written one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from prunebias_jax import analysis, report
from prunebias_jax import metrics as pm
from prunebias_jax.analysis import Outputs
from prunebias_jax.checkpoint import ModelCheckpoint, StageCheckpoint
from prunebias_jax.config_defaults import base_config
from prunebias_jax.config_validation import (
  ConfigError,
  check_runlocal_overrides,
  validate_against_dataset,
  validate_config,
)
from prunebias_jax.data import DataError, Dataset, load_dataset
from prunebias_jax.data.pipeline import padded_eval_arrays, steps_per_epoch
from prunebias_jax.faults import crash_point
from prunebias_jax.files import (
  check_writable,
  directory_size,
  format_bytes,
  remove_stale_temporaries,
  write_atomic,
  write_json_atomic,
)
from prunebias_jax.models import get_model
from prunebias_jax.parallel import DataParallel
from prunebias_jax.pruning import (
  apply_masks,
  mask_sparsity,
  masks_from_flat,
  masks_to_flat,
  prune,
  sparsity_report,
)
from prunebias_jax.pruning.schedule import pruning_steps
from prunebias_jax.train import (
  create_state,
  evaluate,
  fit,
  make_eval_fn,
  make_optimizer,
  make_train_step,
)

Record = dict[str, Any]
# Sweep axes: extending them reuses the checkpoints of the cells already trained.
SWEEP_KEYS = ("pruning.methods", "pruning.sparsities", "seeds")
# Keys that change how a run reports, not what it computes.
COSMETIC_KEYS = (
  "progress_seconds",
  "overwrite",
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
  "checkpoint.every_steps",
  "checkpoint.keep",
)
PARTIAL = "partial"  # checkpoints/partial/<stage>: mid-stage checkpoints of stages in progress


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def resolve_config(
  config: ml_collections.ConfigDict, explicit_keys: Collection[str] = ()
) -> ml_collections.ConfigDict:
  """Applies `runlocal_overrides` when `runlocal=True` (tiny settings for a CPU check).

  Keys the user set on the command line (`explicit_keys`, dotted) win over runlocal's values.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy; the caller's stays as is
  check_runlocal_overrides(config)
  if config.get("runlocal") and config.get("runlocal_overrides"):
    for dotted, value in config.runlocal_overrides:
      if dotted in explicit_keys:
        continue
      *parents, leaf = dotted.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def _must_discard(workdir: Path, config: ml_collections.ConfigDict) -> bool:
  """True when `workdir` holds a run of a different config and overwrite=True; raises
  ConfigError when it does and overwrite is off (never mixes results of two configs)."""
  path = workdir / "config.json"
  if not path.exists():
    return False
  try:
    old = _flatten(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(
      f"{path} is unreadable ({e}); use a new --workdir or --config.overwrite=True"
    ) from None
  new = _flatten(json.loads(config.to_json()))
  # A workdir written before a config field existed ran with that field's default.
  defaults = _flatten(json.loads(base_config().to_json()))
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  ignore = set(SWEEP_KEYS) | set(COSMETIC_KEYS) | {"runlocal_overrides"}
  differing = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
  if not differing:
    return False
  if not config.overwrite:
    raise ConfigError(
      f"workdir {workdir} holds a run of a different config (differs at: {', '.join(differing[:5])}); "
      "use a new --workdir or --config.overwrite=True to discard it"
    )
  logging.warning(
    "overwrite=True: discarding the previous run in %s (differs at %s)", workdir, differing
  )
  return True


def _guard_workdir(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to mix results of a different config into an existing workdir. Multi-host: every
  process decides before any process writes, and only process 0 deletes."""
  discard = _must_discard(workdir, config)
  multi = jax.process_count() > 1
  if multi:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("prunebias_jax: workdir checked")
  if discard and jax.process_index() == 0:
    for name in ("checkpoints", "plots"):
      shutil.rmtree(workdir / name, ignore_errors=True)
    for name in (
      "results.jsonl",
      "cells.jsonl",
      "correlations.jsonl",
      "results.md",
      "timings.json",
      "dataset.json",
      "config.json",
    ):
      (workdir / name).unlink(missing_ok=True)
  if multi:
    multihost_utils.sync_global_devices("prunebias_jax: workdir ready")


def _stack(trees: Sequence[Any]) -> Any:
  """Trees with identical structure → one tree with a leading member axis (None leaves stay)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, k: int) -> list[Any]:
  """Inverse of `_stack` (k = 1: the tree itself, unstacked already)."""
  if k == 1:
    return [tree]
  return [jax.tree.map(lambda x: x[j], tree) for j in range(k)]


def _round(x, digits: int = 6):
  """Rounded floats (lists for arrays) so results.jsonl is compact and stable."""
  a = np.asarray(x, np.float64)
  if a.ndim == 0:
    v = float(a)
    return round(v, digits) if np.isfinite(v) else str(v)
  return [_round(v, digits) for v in a]


# Why a headline metric can be undefined (METRICS.md: no NaN is printed silently).
UNDEFINED_REASONS = {
  "cev": "no class has a defined rate change (metrics.zero_rate='exclude' dropped every class)",
  "sde": "no class has a defined rate change (metrics.zero_rate='exclude' dropped every class)",
  "cka": "the penultimate features contain NaN/Inf",
  "cka_debiased": "constant features or fewer than 4 test examples (the unbiased HSIC denominator is not positive)",
  "svcca": "constant logits or fewer than 2 examples (analysis.svcca_examples)",
}


def undefined_metrics(record: Record) -> dict[str, str]:
  """{metric: reason} for the headline metrics of `record` that are NaN/None."""
  out = {}
  for field, reason in UNDEFINED_REASONS.items():
    if field not in record:
      continue
    v = record[field]
    if v is None or isinstance(v, str) or not np.isfinite(v):
      out[field] = reason
  return out


def _note_undefined(record: Record, what: str) -> None:
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


class Experiment:
  """One run of the pipeline in `workdir`; see the module docstring."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    explicit_keys: Collection[str] = (),
  ):
    self.config = resolve_config(config, explicit_keys)
    self.workdir = Path(workdir)
    self.timings: dict[str, float] = {}
    self._steps: dict = {}
    self.population_eval_fns: dict = {}

  # ----------------------------------------------------------------------------------- set-up
  def prepare(self) -> None:
    """Everything that can fail on bad input, before any training."""
    cfg = self.config
    validate_config(cfg)
    try:
      check_writable(self.workdir)
    except OSError as e:
      raise ConfigError(
        f"--workdir {str(self.workdir)!r} is not writable ({e.strerror or e}); "
        "pass a directory you can write to"
      ) from None
    self.parallel = DataParallel()
    for field in (
      "data.batch_size",
      "data.eval_batch_size",
      "dense.batch_size",
      "finetune.batch_size",
    ):
      value = cfg[field.split(".")[0]][field.split(".")[1]]
      problem = value and self.parallel.check_batch_size(value, field)
      if problem:
        raise ConfigError(problem)
    _guard_workdir(self.workdir, cfg)
    if jax.process_index() == 0:
      for tmp in remove_stale_temporaries(self.workdir):  # left by a run killed mid-write
        logging.info("removed %s (a temporary file of an interrupted run)", tmp)
    t = time.perf_counter()
    try:
      self.data: Dataset = load_dataset(cfg.data)
    except DataError as e:  # bad data input is bad input: one line, exit code 2
      raise ConfigError(str(e)) from None
    validate_against_dataset(
      cfg, self.data.num_classes, len(self.data.teacher_train), len(self.data.train)
    )
    self.timings["load_data"] = time.perf_counter() - t
    self.model = get_model(cfg.model, self.data.num_classes, dtype=cfg.compute_dtype)
    try:  # tracing only (no compute): a model that cannot take these images fails here, not mid-run
      jax.eval_shape(
        lambda: self.model.init(
          jax.random.key(0), jnp.zeros((1,) + self.data.image_shape), train=False
        )
      )
    except Exception as e:  # Flax/XLA shape errors come as many types
      raise ConfigError(
        f"config.model={cfg.model!r} cannot take {'×'.join(map(str, self.data.image_shape))} images "
        f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); choose another model or set data.image_size"
      ) from None
    self.checkpoint_expect = {"model": cfg.model, "num_classes": self.data.num_classes}
    self._check_checkpoints()
    logging.info(
      "data %s: %d teacher-train / %d fine-tune-train / %d test images %s, %d classes; "
      "fine-tune class counts %s",
      self.data.name,
      len(self.data.teacher_train),
      len(self.data.train),
      len(self.data.test),
      self.data.image_shape,
      self.data.num_classes,
      self.data.train.class_counts(self.data.num_classes).tolist(),
    )
    # Logged only once the input is known good: bad input ends the run with one line.
    logging.info(
      "devices: %d × %s over %d process(es); global batch %d sharded on the 'data' axis",
      self.parallel.num_devices,
      jax.devices()[0].platform,
      jax.process_count(),
      cfg.data.batch_size,
    )
    self.eval_images, _, _ = padded_eval_arrays(self.data.test, cfg.data.eval_batch_size)
    self.labels = jnp.asarray(self.data.test.labels)
    self.eval_fn = make_eval_fn(
      self.model, mean=self.data.mean, std=self.data.std, out_shardings=self.parallel.replicated
    )
    # Multi-host: every process computes everything; only process 0 writes files of record
    # (checkpoints go through Orbax, which coordinates the processes itself).
    self.writer = jax.process_index() == 0
    if self.writer:
      self._write_run_description()

  def _check_checkpoints(self) -> None:
    """Reads the metadata of every checkpoint in the workdir before any training, so a
    checkpoint of another model or a damaged one stops the run now (CheckpointError, exit 2),
    not hours later, and is never overwritten."""
    root = self.workdir / "checkpoints"
    if not root.is_dir():
      return
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name != PARTIAL]
    dirs += (
      [d for d in (root / PARTIAL).iterdir() if d.is_dir()] if (root / PARTIAL).is_dir() else []
    )
    for d in sorted(dirs):
      ckpt = ModelCheckpoint(d, expect=self.checkpoint_expect)
      try:
        if ckpt.latest_step() is not None:
          ckpt.read_meta()
      finally:
        ckpt.close()

  def _model_checkpoint(self, name: str) -> ModelCheckpoint:
    return ModelCheckpoint(self.workdir / "checkpoints" / name, expect=self.checkpoint_expect)

  def _stage_checkpoint(self, stage: str) -> StageCheckpoint | None:
    every = self.config.checkpoint.every_steps
    if not every:
      return None
    return StageCheckpoint(
      self._partial_dir(stage), every, self.config.checkpoint.keep, expect=self.checkpoint_expect
    )

  def _partial_dir(self, stage: str) -> Path:
    return self.workdir / "checkpoints" / PARTIAL / stage

  def _finish_stage(self, partial: StageCheckpoint | None) -> None:
    """The stage's models are saved: its mid-stage checkpoints are no longer needed."""
    if partial is None:
      return
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("prunebias_jax: stage saved")
    if jax.process_index() == 0:
      partial.discard()
    else:
      partial.close()

  def _drop_stale_partial(self, stage: str) -> None:
    """Mid-stage checkpoints of a stage whose model is saved (a kill came between saving the
    model and deleting them) are deleted."""
    path = self._partial_dir(stage)
    if path.is_dir() and jax.process_index() == 0:
      shutil.rmtree(path, ignore_errors=True)

  def _write_run_description(self) -> None:
    cfg = self.config
    write_json_atomic(self.workdir / "config.json", json.loads(cfg.to_json()))
    C = self.data.num_classes
    write_json_atomic(
      self.workdir / "dataset.json",
      {
        "name": self.data.name,
        "class_names": list(self.data.class_names),
        "image_shape": list(self.data.image_shape),
        "teacher_train_class_counts": self.data.teacher_train.class_counts(C).tolist(),
        "finetune_train_class_counts": self.data.train.class_counts(C).tolist(),
        "test_class_counts": self.data.test.class_counts(C).tolist(),
        "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
      },
    )

  def batch_size(self, stage_cfg) -> int:
    """The stage's own batch size, else data.batch_size."""
    return stage_cfg.batch_size or self.config.data.batch_size

  def _step_fn(self, stage_cfg, split, kd: bool, population: int = 1, shared_masks: bool = True):
    """(optimizer, jitted step), built once per (stage, kd, population) and reused."""
    key = (id(stage_cfg), kd, population, shared_masks)
    if key not in self._steps:
      cfg = self.config
      optimizer = make_optimizer(
        stage_cfg.optim, steps_per_epoch(len(split), self.batch_size(stage_cfg)), stage_cfg.epochs
      )
      step = make_train_step(
        self.model,
        optimizer,
        mean=self.data.mean,
        std=self.data.std,
        crop_padding=cfg.data.crop_padding,
        flip=cfg.data.flip,
        kd=kd,
        population=population,
        shared_masks=shared_masks,
        skip_nonfinite=cfg.nonfinite == "skip",
      )
      self._steps[key] = (optimizer, step)
    return self._steps[key]

  # ----------------------------------------------------------------------------------- stages
  def dense_stage(self, seed: int | None = None):
    """Trains a dense model from scratch (the teacher: seed = config.seed), or restores it.
    Extra seeds (analysis.dense_seeds) give the dense population of the CIE/significance
    analyses; only the teacher is the reference for CEV/SDE and the KD teacher."""
    cfg = self.config
    seed = cfg.seed if seed is None else seed
    name = "dense" if seed == cfg.seed else f"dense_seed{seed}"
    split = self.data.teacher_train
    optimizer, step = self._step_fn(cfg.dense, split, kd=False)
    dummy = jnp.zeros((1,) + self.data.image_shape, jnp.float32)
    variables = self.model.init(jax.random.key(seed), dummy, train=False)
    ckpt = self._model_checkpoint(name)
    tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    t = time.perf_counter()
    if ckpt.latest_step() is not None:
      tree, meta = ckpt.restore(tree)
      logging.info(
        "stage %s: restored from %s (trained %d steps)", name, ckpt.directory, meta["steps"]
      )
      self._drop_stale_partial(name)
    else:
      logging.info(
        "stage %s: training %s from scratch for %d epochs on %d images",
        name,
        cfg.model,
        cfg.dense.epochs,
        len(split),
      )
      state = create_state(tree["params"], tree["batch_stats"], optimizer)
      partial = self._stage_checkpoint(name)
      state, summary, _ = fit(
        state,
        step,
        split,
        stage=name,
        batch_size=self.batch_size(cfg.dense),
        parallel=self.parallel,
        epochs=cfg.dense.epochs,
        seed=seed,
        progress_seconds=cfg.progress_seconds,
        checkpoint=partial,
        nonfinite=cfg.nonfinite,
      )
      tree = {"params": state.params, "batch_stats": state.batch_stats}
      ckpt.save(int(state.step), tree, {"steps": int(state.step), **summary})
      crash_point(f"saved:{name}")  # tests: killed before the mid-stage checkpoints are deleted
      self._finish_stage(partial)
    ckpt.close()
    self.timings[name] = time.perf_counter() - t
    return tree

  def finetune(
    self,
    teacher,
    method: str,
    sparsity: float,
    seeds: Sequence[int],
    kd: bool,
    temperature: float | None = None,
  ):
    """Fine-tunes the pruned teacher with CE or KD once per seed, or restores finished ones.

    One-shot: masks at the target from the start. Gradual: masks from the AGP schedule,
    re-pruned from the current weights at the scheduled epochs (pruned units stay pruned).
    Several seeds train together as a population: one vmapped step for all of them.
    Returns [(variables, final masks)] per seed; every member has its own checkpoint.
    """
    cfg = self.config
    k = len(seeds)
    shared = k > 1 and cfg.population_masks == "shared"
    temperature = cfg.kd.temperature if temperature is None else temperature
    # The config's own temperature keeps the plain name; a temperature sweep adds _T<t>.
    suffix = f"_T{temperature:g}" if kd and temperature != cfg.kd.temperature else ""
    names = [f"{method}_s{sparsity:g}_{'kd' if kd else 'ce'}{suffix}_seed{seed}" for seed in seeds]
    stage = (
      names[0] if k == 1 else f"{names[0]}+{k - 1}"
    )  # one training stage for the whole population
    plan = pruning_steps(
      cfg.finetune.epochs,
      sparsity,
      schedule=cfg.pruning.schedule,
      initial=cfg.pruning.initial_sparsity,
      frequency=cfg.pruning.frequency_epochs,
      end_fraction=cfg.pruning.end_fraction,
    )
    masks = [
      prune(teacher["params"], method, plan[0], seed=seeds[0] if shared else seed) for seed in seeds
    ]
    trees = [
      {
        "params": apply_masks(teacher["params"], m),
        "batch_stats": teacher["batch_stats"],
        "masks": masks_to_flat(m),
      }
      for m in masks
    ]
    ckpts = [self._model_checkpoint(name) for name in names]
    if all(c.latest_step() is not None for c in ckpts):
      trees = [c.restore(t)[0] for c, t in zip(ckpts, trees)]
      logging.info("  %s: restored", ", ".join(names))
      self._drop_stale_partial(stage)
    else:

      def reprune(epoch, state, current_masks):
        if epoch == 0 or epoch not in plan:  # epoch 0's masks are already applied
          return state, current_masks
        params = _unstack(state.params, k)
        old = [current_masks] * k if shared or k == 1 else _unstack(current_masks, k)
        new = [
          prune(
            params[0 if shared else j],
            method,
            plan[epoch],
            seed=seeds[0 if shared else j] + 1000 * epoch,
            previous_masks=old[j],
          )
          for j in range(k)
        ]
        logging.info(
          "  %s: epoch %d re-pruned to sparsity %.4f",
          names[0] if k == 1 else names,
          epoch + 1,
          plan[epoch],
        )
        new_masks = new[0] if shared or k == 1 else _stack(new)
        return state.replace(params=apply_masks(state.params, new_masks)), new_masks

      optimizer, step = self._step_fn(
        cfg.finetune, self.data.train, kd, population=k, shared_masks=shared
      )
      states = [create_state(t["params"], t["batch_stats"], optimizer) for t in trees]
      state = states[0] if k == 1 else _stack(states)
      step_masks = masks[0] if shared or k == 1 else _stack(masks)
      partial = self._stage_checkpoint(stage)
      state, summary, final = fit(
        state,
        step,
        self.data.train,
        stage=stage,
        checkpoint=partial,
        nonfinite=cfg.nonfinite,
        batch_size=self.batch_size(cfg.finetune),
        epochs=cfg.finetune.epochs,
        seed=seeds[0] if k == 1 else list(seeds),
        masks=step_masks,
        teacher_variables=teacher if kd else None,
        alpha=cfg.kd.alpha,
        temperature=temperature,
        progress_seconds=cfg.progress_seconds,
        epoch_hook=reprune if len(plan) > 1 else None,
        parallel=self.parallel,
      )
      members = _unstack(state, k)
      final_masks = [final] * k if shared or k == 1 else _unstack(final, k)
      trees = []
      for ckpt, member, m in zip(ckpts, members, final_masks):
        tree = {
          "params": member.params,
          "batch_stats": member.batch_stats,
          "masks": masks_to_flat(m),
        }
        ckpt.save(int(member.step), tree, {"steps": int(member.step), **summary})
        trees.append(tree)
      crash_point(f"saved:{stage}")  # tests: killed before the mid-stage checkpoints are deleted
      self._finish_stage(partial)
    for c in ckpts:
      c.close()
    return [
      (
        {"params": t["params"], "batch_stats": t["batch_stats"]},
        masks_from_flat(t["params"], t["masks"]),
      )
      for t in trees
    ]

  def evaluate(self, variables, masks=None):
    """Outputs (predictions, logits, per-layer features) on the full test set; a list of
    members is evaluated in one vmapped pass and gives a list."""
    if isinstance(variables, list):
      k = len(variables)
      if k not in self.population_eval_fns:
        self.population_eval_fns[k] = make_eval_fn(
          self.model,
          mean=self.data.mean,
          std=self.data.std,
          out_shardings=self.parallel.replicated,
          population=k,
          shared_masks=False,
        )
      logits, layers = evaluate(
        self.population_eval_fns[k],
        _stack(variables),
        _stack(masks),
        self.eval_images,
        len(self.data.test),
        parallel=self.parallel,
      )
      return [
        Outputs(
          np.argmax(logits[j], -1).astype(np.int32), logits[j], {n: v[j] for n, v in layers.items()}
        )
        for j in range(k)
      ]
    logits, layers = evaluate(
      self.eval_fn, variables, masks, self.eval_images, len(self.data.test), parallel=self.parallel
    )
    return Outputs(np.argmax(logits, axis=-1).astype(np.int32), logits, layers)

  def compare(self, reference: Outputs, model: Outputs, seed: int = 0) -> Record:
    """Metrics of one model against the dense reference (all on the full test set)."""
    crash_point("compare")
    cfg = self.config
    C = self.data.num_classes
    predictions = model.predictions
    preds, ref_pred = jnp.asarray(predictions), jnp.asarray(reference.predictions)
    rates = pm.per_class_rates(self.labels, preds, C)
    change = pm.relative_rate_change(
      self.labels,
      ref_pred,
      preds,
      C,
      zero_rate=cfg.metrics.zero_rate,
      convention=cfg.metrics.convention,
    )
    cev = pm.cev_from_changes(
      change.dfpr, change.dfnr, change.valid, convention=cfg.metrics.convention
    )
    sde = pm.sde_from_changes(
      change.dfpr, change.dfnr, change.valid, convention=cfg.metrics.convention
    )
    recall = 1.0 - np.asarray(rates.fnr)
    record = {
      "accuracy": _round(np.mean(predictions == self.data.test.labels)),
      "cev": _round(cev),
      "sde": _round(sde),
      "cka": _round(
        pm.linear_cka(
          jnp.asarray(reference.layers["features"]), jnp.asarray(model.layers["features"])
        )
      ),
      "agreement": _round(pm.prediction_agreement(ref_pred, preds)),
      "zero_rate_classes": int(change.num_zero_rate_classes),
      "per_class_recall": _round(recall),
      "fpr": _round(rates.fpr),
      "fnr": _round(rates.fnr),
      "dfpr": _round(change.dfpr),
      "dfnr": _round(change.dfnr),
      **analysis.similarity_by_layer(reference, model, cfg.analysis.svcca_examples),
    }
    groups = self.data.test.groups
    if groups is not None:
      fair = analysis.fairness(self.data.test.labels, groups, predictions, C, self.num_groups)
      ref_fair = self.dense_fairness  # set in run() before any model is compared
      record.update(fair)
      record.update(
        {
          f"{k}_change": (None if v is None or ref_fair[k] is None else round(v - ref_fair[k], 6))
          for k, v in fair.items()
        }
      )
    record.update(
      analysis.bootstrap_intervals(
        self.data.test.labels,
        reference.predictions,
        predictions,
        groups,
        C,
        self.num_groups,
        cfg.analysis,
        cfg.metrics,
        seed,
      )
    )
    return record

  def population_cells(
    self, dense_outputs: list[Outputs], records: list[Record], outputs: dict[tuple, list[Outputs]]
  ) -> list[Record]:
    """One record per (method, sparsity, kd, temperature): CEV/SDE from the per-class rates
    averaged over the cell's seeds (METRICS.md), mean ± std over seeds of the per-model values,
    CIE against the dense population and class-wise significance (analysis.py)."""
    cfg = self.config
    reference = dense_outputs[0].predictions
    cells = []
    self.cie_indices = {}
    for i, ((method, sparsity, kd, temperature), outs) in enumerate(outputs.items()):
      members = [
        r
        for r in records
        if (r["method"], r["sparsity"], r["kd"], r["temperature"])
        == (method, sparsity, kd, temperature)
      ]
      preds = np.stack([o.predictions for o in outs])
      change = pm.relative_rate_change(
        self.labels,
        jnp.asarray(reference),
        jnp.asarray(preds),
        self.data.num_classes,
        zero_rate=cfg.metrics.zero_rate,
        convention=cfg.metrics.convention,
      )
      cell = {
        "method": method,
        "sparsity": sparsity,
        "kd": kd,
        "temperature": temperature,
        "seeds": [r["seed"] for r in members],
        "cev": _round(
          pm.cev_from_changes(
            change.dfpr, change.dfnr, change.valid, convention=cfg.metrics.convention
          )
        ),
        "sde": _round(
          pm.sde_from_changes(
            change.dfpr, change.dfnr, change.valid, convention=cfg.metrics.convention
          )
        ),
        "dfpr": _round(change.dfpr),
        "dfnr": _round(change.dfnr),
        "zero_rate_classes": int(change.num_zero_rate_classes),
      }
      for field in (
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
      ):
        values = np.array([r[field] for r in members if r.get(field) is not None], np.float64)
        if values.size:
          cell[f"{field}_seed_mean"] = _round(values.mean())
          cell[f"{field}_seed_std"] = _round(values.std(ddof=1) if values.size > 1 else 0.0)
      extra, cie_order = analysis.cell_analysis(
        self.data.test.labels,
        [o.predictions for o in dense_outputs],
        list(preds),
        self.data.num_classes,
        cfg.analysis,
        seed=cfg.seed + i,
      )
      cell.update(extra)
      self.cie_indices[(method, sparsity, kd, temperature)] = cie_order
      cells.append(cell)
    return cells

  def seed_groups(self) -> list[tuple[int, ...]]:
    """The students' seeds, grouped into populations trained together (seed-major order: an
    interrupted sweep has whole groups done, which a rerun with fewer seeds already reports)."""
    cfg = self.config
    seeds = tuple(cfg.seeds)
    n = cfg.population
    if n > 1 and len(seeds) == 1:
      seeds = tuple(range(seeds[0], seeds[0] + n))
    return [seeds[i : i + n] for i in range(0, len(seeds), n)]

  # ----------------------------------------------------------------------------------- the run
  def run(self) -> list[Record]:
    cfg = self.config
    start = time.perf_counter()
    self.prepare()
    teacher = self.dense_stage()
    dense_population = [teacher] + [
      self.dense_stage(s) for s in cfg.analysis.dense_seeds if s != cfg.seed
    ]
    dense_outputs = [self.evaluate(v) for v in dense_population]
    reference = dense_outputs[0]
    groups = self.data.test.groups
    self.num_groups = int(groups.max()) + 1 if groups is not None else 0
    if groups is not None:
      self.dense_fairness = analysis.fairness(
        self.data.test.labels, groups, reference.predictions, self.data.num_classes, self.num_groups
      )
    base = {"model": cfg.model, "dataset": self.data.name, "num_test_examples": len(self.data.test)}
    records: list[Record] = []
    for seed, variables, out in zip(
      [cfg.seed] + [s for s in cfg.analysis.dense_seeds if s != cfg.seed],
      dense_population,
      dense_outputs,
    ):
      dense_sparsity = sparsity_report(variables["params"])
      records.append(
        {
          **base,
          "method": "dense",
          "sparsity": 0.0,
          "kd": False,
          "temperature": None,
          "seed": seed,
          "reference": seed == cfg.seed,
          **self.compare(reference, out, seed),
          "realized_sparsity": _round(dense_sparsity["global"]),
          "realized_sparsity_per_layer": {
            k: _round(v) for k, v in dense_sparsity["per_layer"].items()
          },
        }
      )
      _note_undefined(records[-1], f"dense seed {seed}")
      logging.info("dense model (seed %d): test accuracy %.4f", seed, records[-1]["accuracy"])

    temperatures = tuple(cfg.kd.temperatures) or (cfg.kd.temperature,)
    variants = [(False, None)] + [(True, t) for t in temperatures]
    todo = [
      (m, s, group)
      for group in self.seed_groups()
      for m in cfg.pruning.methods
      for s in cfg.pruning.sparsities
    ]
    outputs: dict[tuple, list[Outputs]] = {}
    t = time.perf_counter()
    for i, (method, sparsity, group) in enumerate(todo):
      for kd, temperature in variants:
        members = self.finetune(teacher, method, sparsity, group, kd, temperature)
        if len(members) == 1:
          evaluated = [self.evaluate(*members[0])]
        else:
          evaluated = self.evaluate([v for v, _ in members], [m for _, m in members])
        for seed, (variables, masks), out in zip(group, members, evaluated):
          outputs.setdefault((method, sparsity, kd, temperature), []).append(out)
          realized = sparsity_report(variables["params"])
          rec = {
            **base,
            "method": method,
            "sparsity": sparsity,
            "kd": kd,
            "temperature": temperature,
            "seed": seed,
            **self.compare(reference, out, seed),
            "target_sparsity": _round(mask_sparsity(masks)["global"]),
            "realized_sparsity": _round(realized["global"]),
            "realized_sparsity_per_layer": {k: _round(v) for k, v in realized["per_layer"].items()},
          }
          records.append(rec)
          label = f"KD T={temperature:g}" if kd else "CE"
          _note_undefined(rec, f"{method} s={sparsity:g} {label} seed {seed}")
          logging.info(
            "[%d/%d] %-16s s=%-5g %-8s seed %d: acc %.4f CEV %.4g SDE %.4g CKA %.4f SVCCA %.4f "
            "realised sparsity %.4f",
            i + 1,
            len(todo),
            method,
            sparsity,
            label,
            seed,
            rec["accuracy"],
            rec["cev"],
            rec["sde"],
            rec["cka"],
            rec["svcca"] or float("nan"),
            rec["realized_sparsity"],
          )
    self.timings["pruned_models"] = time.perf_counter() - t
    t = time.perf_counter()
    self.cells = self.population_cells(dense_outputs, records, outputs)
    self.correlations = analysis.correlations(records, cfg.analysis, cfg.seed)
    self.timings["analysis"] = time.perf_counter() - t

    t = time.perf_counter()
    if self.writer:
      self.write_results(records, reference, outputs)
    self.timings["report"] = time.perf_counter() - t
    self.timings["total"] = time.perf_counter() - start
    if self.writer:
      write_json_atomic(
        self.workdir / "timings.json", {k: round(v, 3) for k, v in self.timings.items()}
      )
      size = directory_size(self.workdir)
      logging.info(
        "workdir %s: %s on disk (checkpoints %s; keep fewer with checkpoint.keep, or delete "
        "checkpoints/ once results are final)",
        self.workdir,
        format_bytes(size),
        format_bytes(directory_size(self.workdir / "checkpoints")),
      )
    return records

  def write_results(
    self, records: list[Record], reference: Outputs, outputs: dict[tuple, list[Outputs]]
  ) -> None:
    cfg = self.config
    for name, rows in (
      ("results.jsonl", records),
      ("cells.jsonl", self.cells),
      ("correlations.jsonl", self.correlations),
    ):
      write_atomic(self.workdir / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    notes = [
      f"CEV in %², SDE in % (convention {cfg.metrics.convention!r}, zero reference rates: {cfg.metrics.zero_rate!r}); "
      "both measure how unevenly the per-class FPR/FNR changed relative to the dense model (METRICS.md). With "
      "several seeds a cell's CEV/SDE come from the seed-averaged rates; brackets: per-seed mean ± std.",
      "CKA: linear CKA between the penultimate features of the dense and the pruned model on the test set.",
      f"KD: (1-α)·CE + α·T²·KL with α = {cfg.kd.alpha:g}, T = {cfg.kd.temperature:g}; fine-tuned for "
      f"{cfg.finetune.epochs} epochs from the same masked weights as CE. Last-epoch models (no test-set selection).",
    ]
    main_cells = [c for c in self.cells if not c["kd"] or c["temperature"] == cfg.kd.temperature]
    dense = next(r for r in records if r["method"] == "dense")
    table = report.write_results_markdown(
      self.workdir / "results.md",
      dense,
      main_cells,
      f"prunebias_jax: {cfg.model} on {self.data.name}",
      notes,
      extra=report.analysis_sections(
        self.cells,
        analysis.correlation_table(self.correlations),
        cfg.kd.temperature,
        self.data.test.groups is not None,
      ),
    )
    plots = self.workdir / "plots"
    report.write_plots(
      plots,
      [r for r in records if r["method"] != "dense" or r.get("reference")],
      main_cells,
      self.data.class_names,
    )
    report.write_similarity_scatter(plots / "similarity_vs_bias.png", records)
    # The cell with the most CIEs: its top CIE images, and its layer-by-layer CKA with the dense model.
    top = max(self.cells, key=lambda c: (c["num_cie"], c["sparsity"]))
    key = (top["method"], top["sparsity"], top["kd"], top["temperature"])
    members = outputs[key]
    compressed_modes = np.asarray(
      pm.modal_predictions(np.stack([o.predictions for o in members]), self.data.num_classes)
    )
    pm.save_cie_grid(
      plots / "cie_grid.png",
      self.data.test.images,
      self.cie_indices[key][: cfg.analysis.cie_grid_images],
      reference.predictions,
      compressed_modes,
      self.data.test.labels,
      self.data.class_names,
      max_images=cfg.analysis.cie_grid_images,
    )
    names = sorted(reference.similarity_layers())
    matrix = pm.cka_matrix(
      [jnp.asarray(reference.similarity_layers()[n]) for n in names],
      [jnp.asarray(members[0].similarity_layers()[n]) for n in names],
    )
    student = "CE" if not top["kd"] else f"KD T={top['temperature']:g}"
    report.write_cka_heatmap(
      plots / "cka_layers.png",
      matrix,
      names,
      names,
      f"linear CKA, dense vs {top['method']} s={top['sparsity']:g} {student} seed {top['seeds'][0]}",
    )
    print(table, flush=True)


def run(
  config: ml_collections.ConfigDict, workdir: str | Path, explicit_keys: Collection[str] = ()
) -> list[Record]:
  """Runs the whole experiment; returns the records written to results.jsonl.

  `explicit_keys`: dotted config keys the user overrode (they are not replaced by runlocal).
  """
  return Experiment(config, workdir, explicit_keys).run()
