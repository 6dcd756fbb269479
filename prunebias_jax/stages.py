"""The stages of a run as free functions over one frozen context.

    prepare(config, workdir)          -> RunContext   every check that bad input can fail, first
    train_dense(ctx, seed)            -> Model        the teacher (seed = config.seed) or a member
                                                      of the dense population; restored if saved
    pruning_groups(config)            -> (seeds, method, sparsity) in sweep order
    initial_masks(ctx, teacher, ...)  -> masks per seed, pruned once per group (lazily)
    finetune(ctx, teacher, cell, seeds, masks) -> [Model]   CE or KD students; restored if saved
    evaluate_members(ctx, models)     -> [Outputs]    one population in one compiled pass

Every trained model is an Orbax checkpoint in the workdir (`workdir.py` says where), and a
stage in progress saves mid-stage checkpoints, so a rerun restores finished models and
continues an interrupted stage from its last saved step. Data order and step RNG depend only
on (seed, step), so the resumed run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from prunebias_jax import quantization as qz
from prunebias_jax import workdir as wd
from prunebias_jax.checkpoint import Identity
from prunebias_jax.claims import Worker
from prunebias_jax.config import (
  ConfigError,
  distill_methods,
  quantization_methods,
  resolve_config,
  stage_settings,
  validate_against_dataset,
  validate_config,
)
from prunebias_jax.data import Dataset, load_dataset
from prunebias_jax.data.pipeline import padded_eval_arrays, steps_per_epoch
from prunebias_jax.faults import crash_point
from prunebias_jax.models import get_model
from prunebias_jax.monitor import StepLog
from prunebias_jax.parallel import DataParallel
from prunebias_jax.provenance import dense_identity, fingerprint, stage_identity, student_identity
from prunebias_jax.pruning import apply_masks, dense_masks, masks_from_flat, masks_to_flat, prune
from prunebias_jax.pruning.schedule import pruning_steps
from prunebias_jax.records import (
  CONTROL_METHOD,
  Outputs,
  distill_of,
  layer_cka_of,
  student_label,
  svcca_subset,
)
from prunebias_jax.train import (
  compare,
  create_state,
  evaluate,
  fit,
  learning_rate_schedule,
  make_compare_fn,
  make_eval_fn,
  make_optimizer,
  make_train_step,
)
from prunebias_jax.train.distill import CRDState, init_crd, parse_method
from prunebias_jax.train.loop import SCAN_STEPS
from prunebias_jax.train.steps import DistillWeights

PyTree = Any
BATCH_FIELDS = (
  "data.batch_size",
  "data.eval_batch_size",
  "dense.batch_size",
  "finetune.batch_size",
)


@dataclasses.dataclass(frozen=True, eq=False)
class RunContext:
  """What every stage reads: set once by `prepare`, never changed (the compiled-function
  cache only grows)."""

  config: ml_collections.ConfigDict
  workdir: Path
  data: Dataset
  model: nn.Module
  parallel: DataParallel
  expect: dict[str, Any]  # what every checkpoint in the workdir must have been written for
  identities: dict[str, Identity]  # checkpoint / stage name → how this run trains it
  legacy_ok: bool  # config.json unchanged: checkpoints without an identity may be restored
  eval_images: np.ndarray  # the test images, padded to (batches, eval batch, H, W, C)
  eval_labels: np.ndarray  # (batches, eval batch) int32, 0 for padding
  eval_valid: np.ndarray  # (batches, eval batch) float32: 1 for a test image, 0 for padding
  svcca_rows: np.ndarray  # (batches, eval batch) float32: 1 for the SVCCA subset's images
  map_images: np.ndarray | None  # analysis.svcca_conv: the SVCCA subset's images, padded
  map_examples: int  # how many of them are real (0 without analysis.svcca_conv)
  load_seconds: float
  writer: bool  # process 0: writes the files of record
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)


class Cell(NamedTuple):
  """One fine-tuning variant of a (method, sparsity) compression: CE, KD at one temperature, or
  a feature distillation (alone or with KD: `distill`, a `train.distill.METHODS` name); for a
  quantized method (`quantization.split_method`) these are quantization-aware, and
  `distill` = 'ptq' is the post-training-quantized model, not fine-tuned."""

  method: str
  sparsity: float
  kd: bool  # the loss has the KL term (kd and the f+kd methods)
  temperature: float | None  # None without the KL term
  swept: bool = False  # a KD temperature other than kd.temperature: names carry _T<t>
  distill: str = "ce"

  @property
  def key(self) -> tuple[str, float, bool, float | None, str]:
    return (self.method, self.sparsity, self.kd, self.temperature, self.distill)

  @property
  def identity(self) -> dict[str, Any]:
    """The fields that name the cell in every record."""
    return dict(zip(("method", "sparsity", "kd", "temperature", "distill"), self.key))

  @property
  def label(self) -> str:
    return student_label(self.identity)

  @property
  def scheme(self) -> str | None:
    """The quantization scheme of the cell's method (None: pruned only)."""
    return qz.split_method(self.method)[1]

  def checkpoint_name(self, seed: int) -> str:
    suffix = f"_T{self.temperature:g}" if self.swept else ""
    # '+' separates a population's stage names: 'l1_filter+int8_weights' → 'l1_filter_int8_weights'
    method, fine_tuning = self.method.replace("+", "_"), self.distill.replace("+", "_")
    return f"{method}_s{self.sparsity:g}_{fine_tuning}{suffix}_seed{seed}"


class Model(NamedTuple):
  """A trained model: its variables and masks (None for a dense model)."""

  variables: PyTree  # {'params', 'batch_stats'}
  masks: PyTree | None
  # How its training went, from its checkpoint: steps, nonfinite_steps, resumed_at_step, ...
  training: dict[str, Any] | None = None
  scheme: str | None = None  # the quantization it runs with (`quantization.SCHEMES`)


# ------------------------------------------------------------------------------------ set-up
def prepare(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  explicit_keys: Collection[str] = (),
  worker: Worker | None = None,
) -> RunContext:
  """Resolves and checks the config, the workdir, the data, the model and the checkpoints
  already there: everything that can fail on bad input, before any training. `worker`: this
  process among those sharing the workdir (started here; one of its own without)."""
  cfg = resolve_config(config, explicit_keys)
  workdir = Path(workdir)
  validate_config(cfg)
  wd.ensure_writable(workdir)
  parallel = DataParallel()
  fields = BATCH_FIELDS + tuple(f"distill.batch_size.{m}" for m in cfg.distill.batch_size)
  for field in fields:
    value = cfg
    for part in field.split("."):
      value = value[part]
    problem = value and parallel.check_batch_size(value, field)
    if problem:
      raise ConfigError(problem)
  t = time.perf_counter()
  data = load_dataset(cfg.data)
  validate_against_dataset(
    cfg,
    data.num_classes,
    len(data.teacher_train),
    len(data.train),
    len(data.test),
    data.image_shape,
  )
  load_seconds = time.perf_counter() - t
  model = get_model(cfg.model, data.num_classes, dtype=cfg.compute_dtype)
  _check_model_fits(model, cfg.model, data.image_shape)
  for scheme in cfg.quantization.schemes:  # Qwix must take every layer: fail before training
    _check_model_fits(_student_model(cfg, model, scheme), cfg.model, data.image_shape, scheme)
  expect = {"model": cfg.model, "num_classes": data.num_classes}
  identities = planned_identities(cfg, data)
  wd.check_paths(workdir, identities)
  # A run refused for a checkpoint trained differently changes nothing, not even locks/.
  differing = wd.config_differences(workdir, cfg)
  wd.check_checkpoints(workdir, expect, identities, differing == [], cfg.overwrite, delete=False)
  worker = worker or Worker(workdir)
  worker.start()
  with worker.holding("setup"):  # one worker at a time reads, checks and cleans the workdir
    differing = wd.config_differences(workdir, cfg)  # read only: nothing moves before the checks
    legacy_ok = differing == []
    wd.check_checkpoints(workdir, expect, identities, legacy_ok, cfg.overwrite)
    wd.guard(workdir, differing, cfg, worker.alive)
  logging.info(
    "data %s: %d teacher-train / %d fine-tune-train / %d test images %s, %d classes; "
    "fine-tune class counts %s",
    data.name,
    len(data.teacher_train),
    len(data.train),
    len(data.test),
    data.image_shape,
    data.num_classes,
    data.train.class_counts(data.num_classes).tolist(),
  )
  # Logged only once the input is known good: bad input ends the run with one line.
  logging.info(
    "devices: %d × %s over %d process(es); global batch %d sharded on the 'data' axis",
    parallel.num_devices,
    jax.devices()[0].platform,
    jax.process_count(),
    cfg.data.batch_size,
  )
  eval_batch = _eval_batch(cfg, len(data.test), parallel)
  eval_images, eval_labels, eval_valid = padded_eval_arrays(data.test, eval_batch)
  index = svcca_subset(data.test.labels, cfg.analysis.svcca_examples, cfg.seed)
  svcca_rows = np.zeros(eval_valid.size, np.float32)
  svcca_rows[index] = 1.0  # the examples `records.reference` will give SVCCA
  map_images, map_examples = None, 0
  if cfg.analysis.svcca_conv:
    map_batch = _eval_batch(cfg, len(index), parallel)
    map_images, _, _ = padded_eval_arrays(data.test.take(index), map_batch)
    map_examples = len(index)
  return RunContext(
    config=cfg,
    workdir=workdir,
    data=data,
    model=model,
    parallel=parallel,
    expect=expect,
    identities=identities,
    legacy_ok=legacy_ok,
    eval_images=eval_images,
    eval_labels=eval_labels,
    eval_valid=eval_valid,
    svcca_rows=svcca_rows.reshape(eval_valid.shape),
    map_images=map_images,
    map_examples=map_examples,
    load_seconds=load_seconds,
    writer=wd.is_writer(),
  )


def _eval_batch(cfg: ml_collections.ConfigDict, num_examples: int, parallel: DataParallel) -> int:
  """`data.eval_batch_size`, but no larger than the examples rounded up to the devices: a
  bigger batch would hold nothing but padding (and 10⁹ would allocate it). Predictions do not
  depend on the batch size: padding is masked."""
  d = parallel.num_devices
  return min(cfg.data.eval_batch_size, -(-num_examples // d) * d)


def planned_identities(config: ml_collections.ConfigDict, data: Dataset) -> dict[str, Identity]:
  """{checkpoint name or training-stage name: the identity this run trains it with}, for
  every model of the run (`provenance`)."""
  cfg = config
  dense_fp, finetune_fp = fingerprint(data.teacher_train), fingerprint(data.train)
  teacher = dense_identity(cfg, data, cfg.seed, dense_fp)
  out = {}
  for seed in dense_seeds(cfg):
    out[dense_name(cfg, seed)] = dense_identity(cfg, data, seed, dense_fp)
  for seeds, method, sparsity in pruning_groups(cfg):
    plan = _schedule(cfg, sparsity)
    for cell in variants(cfg, method, sparsity):
      if cell.distill == PTQ:  # not trained: no checkpoint
        continue
      names = [cell.checkpoint_name(seed) for seed in seeds]
      members = [
        student_identity(
          cfg,
          data,
          teacher,
          method=method,
          sparsity=sparsity,
          plan=plan,
          kd=cell.kd,
          temperature=cell.temperature,
          seed=seed,
          population=seeds,
          split_fingerprint=finetune_fp,
          distill=cell.distill,
        )
        for seed in seeds
      ]
      out.update(zip(names, members))
      out[stage_name(names)] = stage_identity(members)
  return out


def dense_name(config: ml_collections.ConfigDict, seed: int) -> str:
  return "dense" if seed == config.seed else f"dense_seed{seed}"


def checkpoint_name(config: ml_collections.ConfigDict, record: dict[str, Any]) -> str:
  """The checkpoint of the model a results.jsonl record describes (as this module names it)."""
  if record["method"] == "dense":
    return dense_name(config, record["seed"])
  t = record.get("temperature")
  distill = distill_of(record)  # also for records written before the field
  swept = distill == "kd" and t != config.kd.temperature  # as `variants` marks it
  cell = Cell(record["method"], record["sparsity"], record["kd"], t, swept, distill)
  return cell.checkpoint_name(record["seed"])


def stage_name(names: Sequence[str]) -> str:
  """One training stage per population: its mid-stage checkpoints' directory name."""
  return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"


def _check_model_fits(
  model: nn.Module, name: str, image_shape: tuple[int, ...], scheme: str | None = None
) -> None:
  """Traces init (no compute): a model that cannot take these images (or, with `scheme`, that
  Qwix cannot quantize) fails here, not mid-run."""
  try:
    jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + image_shape), train=False)
    )
  except Exception as e:  # Flax/XLA shape errors come as many types
    quantized = f" quantized with {scheme!r}" if scheme else ""
    raise ConfigError(
      f"config.model={name!r}{quantized} cannot take {'×'.join(map(str, image_shape))} images "
      f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); choose another model or set "
      "data.image_size"
    ) from None


def _batch_size(ctx: RunContext, stage: str, method: str = "ce") -> int:
  """The stage's batch size (a fine-tuning method's own, when set: `stage_settings`)."""
  return stage_settings(ctx.config, stage, method)[1]


def _optim(ctx: RunContext, stage: str, method: str = "ce") -> ml_collections.ConfigDict:
  """The stage's optimizer config (a fine-tuning method's own learning rate, when set)."""
  return stage_settings(ctx.config, stage, method)[0]


def _split(ctx: RunContext, stage: str):
  return ctx.data.teacher_train if stage == "dense" else ctx.data.train


def train_step(
  ctx: RunContext,
  stage: str,
  method: str,
  population: int = 1,
  shared_masks: bool = True,
  scheme: str | None = None,
):
  """(optimizer, jitted step) of `stage` ('dense' or 'finetune') with the fine-tuning
  `method` ('ce', 'kd', 'sp', ...), built once per run for each (stage, method, population,
  shared masks, quantization scheme) and reused by every cell. With a `scheme` the student is
  fake-quantized (quantization-aware training) and the teacher stays the float model."""
  key = ("train", stage, method, population, shared_masks, scheme)
  if key not in ctx._compiled:
    cfg = ctx.config
    per_epoch = steps_per_epoch(len(_split(ctx, stage)), _batch_size(ctx, stage, method))
    optimizer = make_optimizer(_optim(ctx, stage, method), per_epoch, cfg[stage].epochs)
    members = population_step(cfg)
    if population > 1:
      logging.info(
        "%s population of %d: members %s in one step (config.population_step=%r)",
        stage,
        population,
        {
          "vmap": "batched (vmap)",
          "map": "one after the other inside the step (lax.map)",
          "sequential": "one step each, in turn",
        }[members],
        cfg.get("population_step", "auto"),
      )
    step = make_train_step(
      _student_model(cfg, ctx.model, scheme),
      optimizer,
      mean=ctx.data.mean,
      std=ctx.data.std,
      crop_padding=cfg.data.crop_padding,
      flip=cfg.data.flip,
      kd=False,
      population=population,
      shared_masks=shared_masks,
      skip_nonfinite=cfg.nonfinite == "skip",
      method=method,
      weights=distill_weights(cfg, method),
      teacher_model=ctx.model,
      members=members,
    )
    ctx._compiled[key] = (optimizer, step)
  return ctx._compiled[key]


def population_step(config: ml_collections.ConfigDict) -> str:
  """`config.population_step` resolved: 'auto' is 'sequential' on the CPU (measured there, 8
  ResNet-20 students: a vmapped step at 0.18× and a mapped one at 0.03× the speed of 8
  sequential steps, docs/benchmarks.md) and 'vmap' on an accelerator, or wherever
  `train_loop='scan'` asks for the scanned loop (which runs one program: not 'sequential')."""
  setting = config.get("population_step", "auto")
  if setting == "auto":
    scan = config.get("train_loop", "auto") == "scan"
    return "sequential" if jax.default_backend() == "cpu" and not scan else "vmap"
  return setting


def _student_model(
  config: ml_collections.ConfigDict, model: nn.Module, scheme: str | None
) -> nn.Module:
  """The model a student of `scheme` runs (fake-quantized through Qwix), or `model`."""
  if scheme is None:
    return model
  q = config.quantization
  return qz.quantized_model(model, scheme, q.weight_calibration, q.act_calibration)


def _fit(
  ctx: RunContext,
  state,
  step,
  stage_cfg: str,
  stage: str,
  seed,
  method: str = "ce",
  scheme: str | None = None,
  **kwargs,
):
  """`train.fit` of `stage` with the run's data, batch size, parallelism and checkpoint
  settings (those of the fine-tuning `method`); the stage's mid-stage checkpoints are deleted
  once its models are saved (by `_finish`)."""
  cfg = ctx.config
  partial = wd.stage_checkpoint(
    ctx.workdir, stage, cfg.checkpoint, ctx.expect, ctx.identities[stage]
  )
  split, batch_size, epochs = (
    _split(ctx, stage_cfg),
    _batch_size(ctx, stage_cfg, method),
    cfg[stage_cfg].epochs,
  )
  step_log = StepLog(ctx.workdir, stage, cfg.monitor.every_steps, enabled=ctx.writer)
  try:
    state, summary = fit(
      state,
      step,
      split,
      stage=stage,
      batch_size=batch_size,
      epochs=epochs,
      seed=seed,
      parallel=ctx.parallel,
      progress_seconds=cfg.progress_seconds,
      checkpoint=partial,
      nonfinite=cfg.nonfinite,
      step_log=step_log,
      loop=cfg.get("train_loop", "auto"),
      scan_steps=cfg.get("scan_steps", SCAN_STEPS),
      learning_rate=learning_rate_schedule(
        _optim(ctx, stage_cfg, method), steps_per_epoch(len(split), batch_size), epochs
      ),
      epoch_end=functools.partial(_test_accuracy, ctx, step_log, seed, scheme)
      if cfg.monitor.every_steps and cfg.monitor.test_accuracy
      else None,
      **kwargs,
    )
  except BaseException:
    if partial is not None:  # a save still being written in the background ends first
      partial.close()
    raise
  finally:
    step_log.close()
  return state, summary, partial


def _test_accuracy(
  ctx: RunContext, step_log: StepLog, seed, scheme: str | None, epoch: int, step: int, state
) -> None:
  """metrics.jsonl rows of the test accuracy after `epoch` (monitor.test_accuracy): watched,
  never used to pick a model. Runs on every process (the pass is sharded); process 0 writes."""
  seeds = [seed] if isinstance(seed, int) else list(seed)
  k, masks = len(seeds), state.masks
  if k > 1 and masks is not None and _shared(ctx.config, seeds):
    # Shared masks are one unbatched set in the state; the evaluation takes one per member.
    masks = jax.tree.map(lambda m: jnp.broadcast_to(m, (k, *m.shape)), masks)
  variables = {"params": state.params, "batch_stats": state.batch_stats, **(state.frozen or {})}
  logits, _ = _evaluate_pass(ctx, variables, masks, k, ctx.eval_images, 0, scheme)
  accuracy = (logits.argmax(-1) == ctx.data.test.labels).mean(axis=1)
  step_log.write(
    [
      {"step": step, "epoch": epoch, "seed": s, "test_accuracy": float(a)}
      for s, a in zip(seeds, accuracy)
    ]
  )


def _finish(stage: str, partial) -> None:
  """The stage's models are saved; its mid-stage checkpoints go."""
  crash_point(f"saved:{stage}")  # tests: killed before the mid-stage checkpoints are deleted
  wd.finish_stage(partial)


# ------------------------------------------------------------------------------------ dense
def dense_seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The teacher's seed, then the extra dense models of the CIE/significance analyses."""
  return [config.seed] + [s for s in config.analysis.dense_seeds if s != config.seed]


def train_dense(ctx: RunContext, seed: int) -> Model:
  """Trains a dense model from scratch, or restores it; its variables are
  {'params', 'batch_stats'}.

  The teacher (seed = config.seed) is the KD teacher and the reference of every comparison;
  the other seeds make up the dense population of the CIE and significance analyses.
  """
  cfg = ctx.config
  name = dense_name(cfg, seed)
  dummy = jnp.zeros((1,) + ctx.data.image_shape, jnp.float32)
  variables = ctx.model.init(jax.random.key(seed), dummy, train=False)
  tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  ckpt = wd.model_checkpoint(ctx.workdir, name, ctx.expect, ctx.identities[name], ctx.legacy_ok)
  if ckpt.latest_step() is not None:
    tree, meta = ckpt.restore(tree)
    logging.info(
      "stage %s: restored from %s (trained %d steps)", name, ckpt.directory, meta["steps"]
    )
    wd.drop_stale_partial(ctx.workdir, name)
  else:
    logging.info(
      "stage %s: training %s from scratch for %d epochs on %d images",
      name,
      cfg.model,
      cfg.dense.epochs,
      len(ctx.data.teacher_train),
    )
    optimizer, step = train_step(ctx, "dense", "ce")
    state = create_state(tree["params"], tree["batch_stats"], optimizer)
    state, summary, partial = _fit(ctx, state, step, "dense", name, seed)
    tree = {"params": state.params, "batch_stats": state.batch_stats}
    meta = {"steps": int(state.step), **summary}
    ckpt.save(int(state.step), tree, meta)
    _finish(name, partial)
  ckpt.close()
  return Model(tree, None, meta)


# ------------------------------------------------------------------------------------ cells
def seed_groups(config: ml_collections.ConfigDict) -> list[tuple[int, ...]]:
  """The students' seeds, grouped into populations trained together (seed-major order: an
  interrupted sweep has whole groups done, which a rerun with fewer seeds already reports)."""
  seeds = tuple(config.seeds)
  n = config.population
  if n > 1 and len(seeds) == 1:
    seeds = tuple(range(seeds[0], seeds[0] + n))
  return [seeds[i : i + n] for i in range(0, len(seeds), n)]


CONTROL = CONTROL_METHOD  # the method name of the sparsity-0 control cell (pruning.control)
PTQ = "ptq"  # the `distill` of a post-training-quantized cell: quantized, not fine-tuned
CALIBRATION_STREAM = 0xCA1  # the calibration images' RNG stream, apart from data order and masks


def pruning_groups(config: ml_collections.ConfigDict) -> list[tuple[tuple[int, ...], str, float]]:
  """(seeds, method, sparsity) in the order the sweep trains them: one compression each; with
  `pruning.control`, each seed group starts with the unpruned control (CONTROL, 0.0); the
  quantized methods follow the pruned ones (a scheme at sparsity 0, '<pruning method>+<scheme>'
  at every pruning.sparsities)."""
  control = [(CONTROL, 0.0)] if config.pruning.control else []
  sparsities = config.pruning.sparsities
  pruned = [(m, s) for m in config.pruning.methods for s in sparsities]
  quantized = [
    (m, s)
    for m in quantization_methods(config)
    for s in ((0.0,) if qz.split_method(m)[0] is None else sparsities)
  ]
  return [(seeds, m, s) for seeds in seed_groups(config) for m, s in control + pruned + quantized]


def cell_seeds(config: ml_collections.ConfigDict, cell: Cell, seeds: Sequence[int]) -> tuple:
  """The seeds of `seeds` (a seed group) that `cell` has a model for: all, but for the
  post-training quantization of the unpruned teacher, which is one model whatever the seed
  (the first seed of the first group stands for it)."""
  if cell.distill == PTQ and qz.split_method(cell.method)[0] is None:
    return tuple(seeds[:1]) if tuple(seeds) == seed_groups(config)[0] else ()
  return tuple(seeds)


def variants(config: ml_collections.ConfigDict, method: str, sparsity: float) -> list[Cell]:
  """The fine-tuning variants of one compression, in `distill.method` order (default: CE,
  then KD); KD at every temperature (`kd.temperatures`, else `kd.temperature`), the f+kd
  feature methods at kd.temperature. A quantized method: the post-training model first
  (quantization.ptq), then these variants trained quantization-aware (quantization.qat)."""
  t0 = config.kd.temperature
  cells = []
  if qz.split_method(method)[1]:
    cells = [Cell(method, sparsity, False, None, distill=PTQ)] if config.quantization.ptq else []
    if not config.quantization.qat:
      return cells
  for name in distill_methods(config):
    if name == "kd":
      cells += [
        Cell(method, sparsity, True, t, swept=t != t0, distill="kd")
        for t in tuple(config.kd.temperatures) or (t0,)
      ]
    else:
      with_kl = parse_method(name)[1]
      cells.append(Cell(method, sparsity, with_kl, t0 if with_kl else None, distill=name))
  return cells


def distill_weights(config: ml_collections.ConfigDict, method: str) -> DistillWeights:
  """The static weights of `method`'s objective, from config.distill."""
  d, feature = config.distill, parse_method(method)[0]
  return DistillWeights(
    ce=float(d.ce_weight),
    kl=float(d.kl_weight),
    beta=float(d.weights[feature]) if feature else 0.0,
    crd_negatives=int(d.crd.negatives),
    crd_temperature=float(d.crd.temperature),
    crd_momentum=float(d.crd.momentum),
  )


def _schedule(config: ml_collections.ConfigDict, sparsity: float) -> dict[int, float]:
  """{epoch: sparsity}: one-shot (epoch 0 only) or the gradual AGP schedule."""
  p = config.pruning
  return pruning_steps(
    config.finetune.epochs,
    sparsity,
    schedule=p.schedule,
    initial=p.initial_sparsity,
    frequency=p.frequency_epochs,
    end_fraction=p.end_fraction,
  )


def _shared(config: ml_collections.ConfigDict, seeds: Sequence[int]) -> bool:
  """Whether the members of a population share one set of masks."""
  return len(seeds) > 1 and config.population_masks == "shared"


def initial_masks(
  ctx: RunContext, teacher: PyTree, method: str, sparsity: float, seeds: Sequence[int]
) -> Callable[[], list[PyTree]]:
  """The masks each student starts from (the first step of the schedule), pruned from the
  teacher on first use and then reused by every variant: a cell whose models are all restored
  never prunes."""
  shared = _shared(ctx.config, seeds)
  start = _schedule(ctx.config, sparsity)[0]

  pruning = qz.split_method(method)[0]

  @functools.cache
  def masks() -> list[PyTree]:
    if pruning in (CONTROL, None):  # the control and a scheme alone: all-ones masks
      return [dense_masks(teacher["params"]) for _ in seeds]
    return _pruned(teacher, pruning, start, seeds, shared)

  return masks


def _pruned(
  teacher: PyTree, method: str, sparsity: float, seeds: Sequence[int], shared: bool
) -> list[PyTree]:
  """One set of masks per seed pruned from the teacher (shared masks: all from seeds[0])."""
  return [prune(teacher["params"], method, sparsity, seed=seeds[0] if shared else s) for s in seeds]


def finetune(
  ctx: RunContext,
  teacher: PyTree,
  cell: Cell,
  seeds: Sequence[int],
  masks: Callable[[], list[PyTree]],
) -> list[Model]:
  """Fine-tunes the pruned teacher once per seed with the cell's loss, or restores the
  students; returns one Model per seed (each has its own checkpoint).

  One-shot: masks at the target from the start. Gradual: re-pruned from the current weights
  at the scheduled epochs (pruned units stay pruned). Several seeds train together as a
  population: one vmapped step for all of them.
  """
  cfg = ctx.config
  shared = _shared(cfg, seeds)
  if cell.distill == PTQ:
    start = masks()[: len(seeds)]
    pruning = qz.split_method(cell.method)[0]
    if pruning and _schedule(cfg, cell.sparsity)[0] != cell.sparsity:
      # A gradual schedule starts below the target, and PTQ has no epochs to reach it: the
      # post-training model is pruned to the target at once (one-shot).
      start = _pruned(teacher, pruning, cell.sparsity, seeds, shared)
    return [_post_training(ctx, teacher, cell, seed, m) for seed, m in zip(seeds, start)]
  names = [cell.checkpoint_name(seed) for seed in seeds]
  stage = stage_name(names)
  ckpts = [
    wd.model_checkpoint(ctx.workdir, name, ctx.expect, ctx.identities[name], ctx.legacy_ok)
    for name in names
  ]
  if all(c.latest_step() is not None for c in ckpts):
    template = {
      "params": teacher["params"],
      "batch_stats": teacher["batch_stats"],
      "masks": masks_to_flat(dense_masks(teacher["params"])),
      **_frozen_template(ctx, cell.scheme),
    }
    saved = [c.restore(template) for c in ckpts]
    logging.info("  %s: restored", ", ".join(names))
    wd.drop_stale_partial(ctx.workdir, stage)
  else:
    saved = _train_students(ctx, teacher, cell, seeds, masks(), stage, ckpts, shared)
  for c in ckpts:
    c.close()
  return [
    Model(
      {k: v for k, v in t.items() if k != "masks"},
      masks_from_flat(t["params"], t["masks"]),
      meta,
      cell.scheme,
    )
    for t, meta in saved
  ]


def _post_training(ctx: RunContext, teacher: PyTree, cell: Cell, seed: int, masks: PyTree) -> Model:
  """The post-training-quantized model of a PTQ cell: the teacher's weights (⊙ the pruning's
  masks), quantized as they are; a static scheme's ranges calibrated first."""
  variables = {
    "params": apply_masks(teacher["params"], masks),
    "batch_stats": teacher["batch_stats"],
  }
  variables.update(_calibration(ctx, variables, cell.scheme, seed))
  return Model(variables, masks, {"steps": 0}, cell.scheme)


def _calibration(ctx: RunContext, variables: PyTree, scheme: str, seed: int) -> dict:
  """{'quant_stats': ...} of a static scheme (calibrated on quantization.calibration_examples
  fine-tuning images drawn with `seed`, in equal chunks of at most data.eval_batch_size), or
  {} for the schemes that need no calibration."""
  if not qz.SCHEMES[scheme].static:
    return {}
  cfg, split = ctx.config, ctx.data.train
  n = cfg.quantization.calibration_examples
  rng = np.random.default_rng([seed, CALIBRATION_STREAM])
  index = np.sort(rng.choice(len(split), n, replace=False))
  chunk = qz.calibration_chunk(n, cfg.data.eval_batch_size)
  images = split.images[index].reshape((n // chunk, chunk) + split.images.shape[1:])
  model = _student_model(cfg, ctx.model, scheme)
  return qz.calibrate(model, variables, images, ctx.data.mean, ctx.data.std)


def _frozen_template(ctx: RunContext, scheme: str | None) -> dict:
  """The shapes of a static scheme's {'quant_stats': ...} (what its checkpoints hold), or {}."""
  if scheme is None or not qz.SCHEMES[scheme].static:
    return {}
  model = _student_model(ctx.config, ctx.model, scheme)
  dummy = jnp.zeros((1,) + ctx.data.image_shape, jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
  return {qz.STATS: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[qz.STATS])}


def _train_students(
  ctx: RunContext,
  teacher: PyTree,
  cell: Cell,
  seeds: Sequence[int],
  start_masks: list[PyTree],
  stage: str,
  ckpts: list,
  shared: bool,
) -> list[tuple[dict, dict]]:
  """Trains the students of one cell (a population when several seeds) and saves each;
  returns (tree, checkpoint metadata) per student."""
  cfg = ctx.config
  k = len(seeds)
  plan = _schedule(cfg, cell.sparsity)

  def reprune(epoch: int, state):
    if epoch == 0 or epoch not in plan:  # epoch 0's masks are already applied
      return state
    params = _unstack(state.params, k)
    old = _unstack(state.masks, 1 if shared else k) * (k if shared else 1)
    new = [
      prune(
        params[j],
        qz.split_method(cell.method)[0],
        plan[epoch],
        seed=seeds[j] + 1000 * epoch,
        previous_masks=old[j],
      )
      for j in range(1 if shared else k)
    ]
    logging.info("  %s: epoch %d re-pruned to sparsity %.4f", stage, epoch + 1, plan[epoch])
    new_masks = _members_masks(new, shared)
    return state.replace(params=apply_masks(state.params, new_masks), masks=new_masks)

  optimizer, step = train_step(
    ctx, "finetune", cell.distill, population=k, shared_masks=shared, scheme=cell.scheme
  )
  crd = [_crd_state(ctx, teacher, seed, optimizer) for seed in seeds]
  states = []
  for seed, m, c in zip(
    seeds, start_masks, crd if parse_method(cell.distill)[0] == "crd" else [None] * k
  ):
    params = apply_masks(teacher["params"], m)
    # A static scheme's ranges: calibrated on the start weights, then frozen for the training.
    start = {"params": params, "batch_stats": teacher["batch_stats"]}
    frozen = _calibration(ctx, start, cell.scheme, seed) if cell.scheme else {}
    states.append(
      create_state(params, teacher["batch_stats"], optimizer, distill=c, frozen=frozen or None)
    )
  state = _stack(states).replace(masks=_members_masks(start_masks, shared))
  state, summary, partial = _fit(
    ctx,
    state,
    step,
    "finetune",
    stage,
    seeds[0] if k == 1 else list(seeds),
    cell.distill,
    cell.scheme,
    teacher_variables=teacher if cell.distill != "ce" else None,
    alpha=cfg.kd.alpha,
    temperature=cfg.kd.temperature if cell.temperature is None else cell.temperature,
    epoch_hook=reprune if len(plan) > 1 else None,
  )
  params, stats = _unstack(state.params, k), _unstack(state.batch_stats, k)
  frozen = _unstack(state.frozen, k) if state.frozen is not None else [{}] * k
  final = _unstack(state.masks, 1 if shared else k) * (k if shared else 1)
  steps = np.asarray(state.step).reshape(-1).tolist()
  saved = []
  for j, ckpt in enumerate(ckpts):
    tree = {"params": params[j], "batch_stats": stats[j], "masks": masks_to_flat(final[j])}
    tree.update(frozen[j])
    meta = {"steps": int(steps[j]), **summary}
    ckpt.save(int(steps[j]), tree, meta)
    saved.append((tree, meta))
  _finish(stage, partial)
  return saved


def _crd_state(ctx: RunContext, teacher: PyTree, seed: int, optimizer) -> CRDState:
  """A fresh CRD state for one student: heads on the width of the models' pooled features,
  memory banks over the fine-tuning split, seeded by the student's seed."""
  dummy = jnp.zeros((1,) + ctx.data.image_shape, jnp.float32)
  _, sown = jax.eval_shape(
    lambda: ctx.model.apply(teacher, dummy, train=False, mutable=["intermediates"])
  )
  width = sown["intermediates"]["features"][0].shape[-1]
  c = ctx.config.distill.crd
  return init_crd(
    jax.random.fold_in(jax.random.key(seed), CRD_STREAM),
    ctx.data.train.labels,
    ctx.data.num_classes,
    width,
    width,
    c.feat_dim,
    optimizer,
  )


CRD_STREAM = 0xC4D  # the CRD heads' and banks' RNG stream, apart from data order and masks


def _stack(trees: Sequence[PyTree]) -> PyTree:
  """Trees of one structure → one tree with a leading member axis; one tree stays as it is."""
  if len(trees) == 1:
    return trees[0]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: PyTree, k: int) -> list[PyTree]:
  """Inverse of `_stack`."""
  if k == 1:
    return [tree]
  return [jax.tree.map(lambda x: x[j], tree) for j in range(k)]


def _members_masks(masks: Sequence[PyTree], shared: bool) -> PyTree:
  """The masks a population's state carries: one set (one member, or shared) or stacked.
  Always fresh arrays: the step donates its state, and the caller's masks are reused."""
  if len(masks) == 1 or shared:
    return jax.tree.map(jnp.array, masks[0])
  return _stack(masks)


# ------------------------------------------------------------------------------------ evaluate
def evaluate_members(ctx: RunContext, members: Sequence[Model], reference: PyTree) -> list[Outputs]:
  """Outputs of each model on the full test set: predictions, logits, the confusion counts,
  and the similarity sums against the `reference` variables (the dense teacher's),
  accumulated in the same pass (`make_compare_fn`: no features kept). The members of a
  population go through one vmapped, compiled pass. With analysis.svcca_conv, a second pass
  over the SVCCA subset adds the pooled stage maps."""
  variables = _stack([m.variables for m in members])
  masks = None if members[0].masks is None else _stack([m.masks for m in members])
  scheme, k = members[0].scheme, len(members)
  key = ("compare", k, scheme)
  if key not in ctx._compiled:
    parallel = ctx.parallel
    ctx._compiled[key] = make_compare_fn(
      _student_model(ctx.config, ctx.model, scheme),
      _student_model(ctx.config, ctx.model, None),
      mean=ctx.data.mean,
      std=ctx.data.std,
      out_shardings=parallel.replicated,
      partials=parallel.num_devices,
      partial_sharding=parallel.batch,  # (partials, ...) sharded over the 'data' axis
      population=k,
      shared_masks=False,
    )
  logits, stats = compare(
    ctx._compiled[key],
    reference,
    variables,
    masks,
    ctx.eval_images,
    ctx.eval_labels,
    ctx.eval_valid,
    ctx.svcca_rows,
    len(ctx.data.test),
    parallel=ctx.parallel,
  )
  if k == 1:
    logits, stats = logits[None], jax.tree.map(lambda a: a[None], stats)
  member = lambda tree, j: jax.tree.map(lambda a: a[j], tree)
  per_layer, joint, confusion = stats
  maps = [None] * k
  if ctx.map_images is not None:
    size = ctx.config.analysis.svcca_conv_size
    _, pooled = _evaluate_pass(ctx, variables, masks, k, ctx.map_images, size, scheme)
    maps = [{name: v[j] for name, v in pooled.items()} for j in range(k)]
  return [
    Outputs(
      np.argmax(logits[j], -1).astype(np.int32),
      logits[j],
      member(per_layer, j),
      layer_cka_of(member(per_layer, j), member(joint, j)),
      maps[j],
      confusion=np.asarray(confusion[j]),
    )
    for j in range(k)
  ]


def _evaluate_pass(
  ctx: RunContext,
  variables: PyTree,
  masks: PyTree | None,
  k: int,
  images: np.ndarray,
  size: int,
  scheme: str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(logits, layers) of k stacked models on the padded `images`, with a member axis (map
  size 0: per-layer features of the test set; > 0: the stage maps pooled to that size), run
  quantized with `scheme`."""
  key = ("eval", k, size, scheme)
  if key not in ctx._compiled:
    ctx._compiled[key] = make_eval_fn(
      _student_model(ctx.config, ctx.model, scheme),
      mean=ctx.data.mean,
      std=ctx.data.std,
      out_shardings=ctx.parallel.replicated,
      population=k,
      shared_masks=False,
      map_size=size,
    )
  n = len(ctx.data.test) if size == 0 else ctx.map_examples
  logits, layers = evaluate(ctx._compiled[key], variables, masks, images, n, parallel=ctx.parallel)
  if k == 1:
    logits, layers = logits[None], {name: v[None] for name, v in layers.items()}
  return logits, layers
