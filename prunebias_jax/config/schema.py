"""Every config field with its default; `configs/*.py` start from `base_config()` and change
what their experiment needs, so all configs share one schema (and one validator)."""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from ml_collections.config_dict import placeholder

from prunebias_jax.choices import FEATURE_METHODS


def sgd(
  learning_rate: float,
  *,
  schedule: str = "cosine",
  decay_epochs: Sequence[float] = (),
  decay_factor: float = 0.1,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
) -> ml_collections.ConfigDict:
  """SGD with momentum and L2 weight decay; schedule 'cosine' | 'step' | 'constant'."""
  return ml_collections.ConfigDict(
    dict(
      learning_rate=learning_rate,
      momentum=momentum,
      nesterov=False,
      weight_decay=weight_decay,
      schedule=schedule,
      decay_epochs=tuple(decay_epochs),
      decay_factor=decay_factor,
    )
  )


def base_config() -> ml_collections.ConfigDict:
  """The full schema with the embedded-digits defaults."""
  config = ml_collections.ConfigDict()
  config.model = "small_cnn"
  config.seed = 0  # dense (teacher) initialisation and data order
  config.seeds = (0,)  # one fine-tuned student per seed for every (method, sparsity, CE/KD) cell
  config.runlocal = False  # apply runlocal_overrides: a minutes-long CPU check of the same pipeline
  config.runlocal_overrides = ()  # ((dotted key, value), ...)
  config.progress_seconds = 10.0  # a progress line at least this often during training
  # True: retrain the models in --workdir whose checkpoints record another training (the
  # others are kept); False: such a model stops the run before any work.
  config.overwrite = False
  # JAX's persistent compilation cache (prunebias_jax/compilecache.py): "auto"
  # ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/prunebias_jax/xla), "off", or a directory.
  config.compile_cache = "auto"
  # Sweeps on many workers (README, "Sweeps on a cluster"): the parts this process runs ("all";
  # "dense": the teacher and the dense population; "cells": this shard's cells; "report": the
  # run files from every finished cell) and the shard of the cells it takes: the index-th of
  # count balanced subsets. index -1: from $PRUNEBIAS_SHARD_INDEX, else $SLURM_ARRAY_TASK_ID.
  config.stage = "all"
  config.shard = ml_collections.ConfigDict()
  config.shard.count = 1
  config.shard.index = -1
  # A NaN/Inf training loss: "stop" (error naming the stage, step and last finite loss) or
  # "skip" (that step's update is dropped; the count is logged and kept in the checkpoint).
  config.nonfinite = "stop"
  # Computation dtype of the models: "float32", or "bfloat16" (mixed precision: bf16
  # convolutions and matmuls, float32 params, optimizer state, batch-norm statistics and loss).
  config.compute_dtype = "float32"
  # Mid-stage checkpoints: a training stage saves its state every `every_steps` steps and
  # every `every_seconds` seconds, whichever comes first (0 turns either off; both 0: only the
  # finished model); a rerun continues from the last one; the last `keep` are kept.
  # `background`: write them while training goes on ("on"), or wait for each ("off"); "auto":
  # on with a GPU/TPU, off on the CPU (a save costs ~0.1% of a CPU run, and a kill right after
  # a save then always finds it on disk).
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500
  config.checkpoint.every_seconds = 600.0
  config.checkpoint.background = "auto"
  config.checkpoint.keep = 2
  # Multi-host (TPU pods, GPU clusters): call jax.distributed.initialize() before any JAX work.
  # None: automatic on TPU (and when JAX_COORDINATOR_ADDRESS is set); True/False force it.
  config.distributed = placeholder(bool)
  config.coordinator_address = placeholder(str)  # e.g. "10.0.0.1:1234"; None: from the environment
  config.num_processes = placeholder(int)
  config.process_id = placeholder(int)
  # Populations: train `population` students (seeds `seeds[0]`, `seeds[0]+1`, ...) of every cell
  # in one vmapped, compiled step. 1 = one student per step (the seeds list is used as given).
  config.population = 1
  config.population_masks = "per_seed"  # "per_seed" (random pruning differs by seed) or "shared"
  # How the members of a population share the step: "vmap" (batched into each operation of one
  # program: for GPUs/TPUs), "map" (one after the other inside that program), "sequential" (one
  # program per member, in turn: on the CPU, where vmap ran at 0.18× and map at 0.03× of
  # sequential), or "auto" (sequential on the CPU, vmap elsewhere; logged).
  config.population_step = "auto"
  # The training loop: "scan" keeps the training split on the device and runs chunks of up to
  # `scan_steps` steps in one compiled lax.scan (one host sync per chunk at most); "step"
  # dispatches one step at a time from host batches; "auto" scans on an accelerator when the
  # split takes at most a quarter of one device's memory, and steps on the CPU (XLA:CPU runs
  # convolutions inside a loop far slower: jax-ml/jax#12868).
  config.train_loop = "auto"
  config.scan_steps = 32

  config.data = ml_collections.ConfigDict()
  config.data.source = "digits"  # 'digits' (embedded) | 'tfds' | 'image_folder'
  config.data.name = placeholder(str)  # tfds: dataset name, e.g. 'cifar10', 'cifar100', 'celeb_a'
  config.data.data_dir = placeholder(str)  # tfds: a prepared TFDS directory (None: TFDS default)
  config.data.dir = placeholder(str)  # image_folder: root with train/<class>/* and test/<class>/*
  config.data.cache_dir = placeholder(str)  # image_folder decode cache (None: the user cache dir)
  config.data.train_split = "train"
  config.data.test_split = "test"
  config.data.label_attribute = "Blond_Hair"  # celeb_a: the binary attribute used as label
  # Sensitive attribute(s) for DPD/EOD: a name or a tuple of names (intersectional groups);
  # celeb_a: attributes (None: 'Male'); tfds: scalar features; image_folder: table columns.
  config.data.group_attribute = placeholder(object)
  # image_folder: the attributes table (None: attributes.csv or attributes.jsonl at data.dir).
  config.data.attributes = placeholder(str)
  config.data.image_size = placeholder(int)  # resize to image_size² (None: keep)
  config.data.train_examples = 0  # >0: a seeded stratified subset of the training split
  config.data.test_examples = 0  # >0: a seeded stratified subset of the test split
  config.data.test_fraction = 0.4  # digits only: stratified train/test split
  config.data.split_seed = 0
  config.data.batch_size = 64
  config.data.eval_batch_size = 256
  config.data.crop_padding = 1  # random crop after zero padding (0 = off)
  config.data.flip = False  # random horizontal flip
  config.data.imbalance = ml_collections.ConfigDict()
  # Classes (indices or names) whose fine-tuning images are subsampled; none by default (the
  # digits demo and the CIFAR configs set the paper's).
  config.data.imbalance.classes = ()
  config.data.imbalance.keep_fractions = ()
  config.data.imbalance.seed = 0
  config.data.imbalance.apply_to_dense = False  # paper: the teacher trains on balanced data

  config.dense = ml_collections.ConfigDict()
  config.dense.epochs = 30
  config.dense.batch_size = placeholder(int)  # None: data.batch_size
  config.dense.optim = sgd(0.05)

  config.finetune = ml_collections.ConfigDict()
  config.finetune.epochs = 10
  config.finetune.batch_size = placeholder(int)  # None: data.batch_size
  config.finetune.optim = sgd(0.05)

  config.pruning = ml_collections.ConfigDict()
  config.pruning.methods = ("l1_filter", "global_magnitude", "layer_magnitude", "random")
  config.pruning.sparsities = (0.5, 0.7, 0.9, 0.95, 0.98)
  config.pruning.schedule = (
    "one_shot"  # or "gradual": AGP cubic from initial_sparsity to the target
  )
  config.pruning.initial_sparsity = 0.1
  config.pruning.frequency_epochs = 5  # gradual: re-prune every k epochs ...
  config.pruning.end_fraction = 0.5  # ... over this first fraction of fine-tuning
  # A sparsity-0 control cell (method "none"): the teacher fine-tuned with CE and with KD on
  # the same split, unpruned, so the bias of fine-tuning itself is separated from pruning's.
  # On in the study configs (configs/cifar10*.py, configs/paper/); off in the schema so the
  # digits demo stays a demo of the compressed cells.
  config.pruning.control = False

  # Watching a run (prunebias_jax.monitor): training scalars of every `every_steps`-th step of
  # each stage (and its last) in metrics.jsonl, and TensorBoard events with tensorboardX
  # installed. 0: none. Fetched at the progress syncs, so logging never stalls the device.
  config.monitor = ml_collections.ConfigDict()
  config.monitor.every_steps = 10
  # The test accuracy after every epoch in metrics.jsonl (one evaluation pass per epoch; only
  # watched: the models kept are the last-epoch ones).
  config.monitor.test_accuracy = True

  # The figures: 'png', or 'pdf' / 'svg' (vector, for a paper).
  config.report = ml_collections.ConfigDict()
  config.report.format = "png"
  # The cell of cka_layers and cie_grid, 'method,sparsity,ce|kd' (e.g. 'l1_filter,0.9,kd');
  # '': the compressed cell with the most CIEs.
  config.report.cka_cell = ""

  config.kd = ml_collections.ConfigDict()
  config.kd.alpha = 0.9  # loss = (1-α)·CE + α·T²·KL(teacher_T ‖ student_T)
  config.kd.temperature = 4.0
  # A KD temperature sweep: one KD student per value (empty: kd.temperature only).
  config.kd.temperatures = ()

  # The fine-tuning methods of every pruned cell (prunebias_jax/train/distill.py): a name or a
  # tuple of names of ce, kd, sp, at, pkt, crd, hint, sp+kd, at+kd, pkt+kd, crd+kd, hint+kd.
  # A feature method f trains with γ·CE + β_f·F_f, and f+kd adds α'·T²·KL (T = kd.temperature).
  config.distill = ml_collections.ConfigDict()
  config.distill.method = ml_collections.FieldReference(("ce", "kd"), field_type=object)
  config.distill.ce_weight = 1.0  # γ of the feature methods (the authors: 1)
  config.distill.kl_weight = 1.0  # α' of the f+kd methods (the authors: 1)
  # β_f: the authors' RepDistiller settings (Simon Says, CIFAR-100 ResNet32x4).
  config.distill.weights = ml_collections.ConfigDict(
    dict(sp=3000.0, at=1000.0, pkt=30000.0, crd=0.8, hint=1.0)
  )
  # The authors tuned the fine-tuning per method (AT and PKT: lr 0.005, batch 256; CRD: batch
  # 256): a value here replaces finetune.optim.learning_rate / the fine-tuning batch size for
  # that feature method and its +kd variant (None: the fine-tuning stage's own).
  config.distill.learning_rate = ml_collections.ConfigDict(
    {m: placeholder(float) for m in FEATURE_METHODS}
  )
  config.distill.batch_size = ml_collections.ConfigDict(
    {m: placeholder(int) for m in FEATURE_METHODS}
  )
  config.distill.crd = ml_collections.ConfigDict()
  config.distill.crd.feat_dim = 128  # embedding size of the two heads
  config.distill.crd.negatives = 16384  # negatives per example, drawn from other classes
  config.distill.crd.temperature = 0.07  # τ of the NCE scores
  config.distill.crd.momentum = 0.5  # memory-bank update: M ← normalize(μ·M + (1−μ)·v)

  # Quantization, through Qwix (prunebias_jax/quantization): every scheme is a compression
  # method of its own (sparsity 0, method = the scheme) and, with each pruning method of
  # `prune_first`, a pruned+quantized one at every pruning.sparsities ('<method>+<scheme>':
  # prune, then quantize the pruned model). Schemes: int8_weights, int4_weights (weights only),
  # int8_dynamic (weights and activations, per-example ranges at run time), int8_static
  # (activation ranges calibrated on training images).
  config.quantization = ml_collections.ConfigDict()
  config.quantization.schemes = ()
  config.quantization.prune_first = ()
  config.quantization.ptq = True  # the quantized model without fine-tuning (post-training)
  config.quantization.qat = True  # quantization-aware fine-tuning with every distill.method
  config.quantization.weight_calibration = (
    "absmax"  # per-channel range: "absmax" (symmetric) | "minmax"
  )
  config.quantization.act_calibration = "absmax"  # activation ranges: "absmax" | "minmax"
  config.quantization.calibration_examples = 512  # int8_static: training images of its ranges

  config.metrics = ml_collections.ConfigDict()
  # Zero reference rates: "floor" (in the denominator only) or "exclude" (docs/metrics.md).
  config.metrics.zero_rate = "floor"
  config.metrics.convention = "simon_says"  # or "nas2022"

  config.analysis = ml_collections.ConfigDict()
  config.analysis.dense_seeds = ()  # extra dense models: the dense population of CIE/significance
  config.analysis.bootstrap_resamples = 200  # CIs of CEV/SDE/DPD/EOD per model (0 = off)
  config.analysis.correlation_resamples = 1000
  config.analysis.confidence = 0.95
  config.analysis.permutations = 2000  # class-wise permutation tests
  config.analysis.fdr_q = 0.05  # the false discovery rate of the class-wise tests
  config.analysis.fdr = "bh"  # the correction of the class-wise tests: Benjamini–Hochberg
  # Class-wise tests on "normalized_recall" (per-class recall minus the model's accuracy:
  # a class changed disproportionately, Hooker et al.) or raw per-class "accuracy".
  config.analysis.classwise_statistic = "normalized_recall"
  # Intervals of the per-model bootstrap: "percentile", "bca" or "basic".
  config.analysis.bootstrap_interval = "percentile"
  # CIE: an example is a CIE when no label is modal in both populations (ties never broken
  # by label value); the only rule, recorded so every choice is in config.json.
  config.analysis.cie_tie_rule = "disjoint_modes"
  # SVCCA on a seeded, class-stratified subset of this many test examples (0: all; the
  # authors used 6,400), with the rule of the authors' library ("anatome") or "centered".
  config.analysis.svcca_examples = 6400
  config.analysis.svcca_rule = "anatome"
  # Also the per-position convolutional SVCCA of every stage output on that subset, as the
  # authors computed layers 1–3 (the maps average-pooled to at most size × size first; 16 as
  # the authors did). Off by default: a second evaluation pass and the subset's maps in memory.
  config.analysis.svcca_conv = False
  config.analysis.svcca_conv_size = 16
  config.analysis.cie_grid_images = 32
  return config
