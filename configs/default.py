"""The default Simon Says experiment on the embedded 8x8 digits (no download; ~1 min on 2 CPU cores).

    python -m prunebias_jax.main --config configs/default.py --workdir runs/default

Dense small CNN trained from scratch on the balanced training split; every pruning method ×
sparsity is fine-tuned twice from the same masked weights (CE, and KD from the dense teacher)
on an imbalanced training split (classes 3, 5, 8 keep 10/15/20% of their images, the test
split is untouched), then compared with the dense reference on the full test set.
Override any value, e.g. `--config.pruning.sparsities='(0.5,0.9)' --config.seeds='(0,1,2)'`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "small_cnn"
  config.seed = 0  # dense (teacher) initialisation and data order
  config.seeds = (0,)  # one fine-tuned student per seed for every (method, sparsity, CE/KD) cell
  config.runlocal = False  # tiny settings for a quick local check (see below)
  config.progress_seconds = 10.0  # one progress line per stage at least this often
  config.overwrite = False  # True: discard checkpoints/results of a different config in --workdir

  config.data = ml_collections.ConfigDict()
  config.data.source = "digits"
  config.data.test_fraction = 0.4  # stratified; ~72 test images per class
  config.data.split_seed = 0
  config.data.batch_size = 64
  config.data.eval_batch_size = 256
  config.data.crop_padding = 1  # random crop after zero padding (0 = off)
  config.data.flip = False  # digits are not mirror-symmetric
  config.data.imbalance = ml_collections.ConfigDict()
  config.data.imbalance.classes = (3, 5, 8)
  config.data.imbalance.keep_fractions = (0.1, 0.15, 0.2)
  config.data.imbalance.seed = 0
  config.data.imbalance.apply_to_dense = False  # paper: the teacher trains on balanced data

  config.dense = ml_collections.ConfigDict()
  config.dense.epochs = 30
  config.dense.optim = _sgd(learning_rate=0.05)

  config.finetune = ml_collections.ConfigDict()
  config.finetune.epochs = 10
  config.finetune.optim = _sgd(learning_rate=0.05)

  config.pruning = ml_collections.ConfigDict()
  config.pruning.methods = ("l1_filter", "global_magnitude", "layer_magnitude", "random")
  config.pruning.sparsities = (0.5, 0.7, 0.9, 0.95, 0.98)
  config.pruning.schedule = "one_shot"  # or "gradual": AGP cubic from initial_sparsity to the target
  config.pruning.initial_sparsity = 0.1
  config.pruning.frequency_epochs = 5  # gradual: re-prune every k epochs ...
  config.pruning.end_fraction = 0.5  # ... over this first fraction of fine-tuning

  config.kd = ml_collections.ConfigDict()
  config.kd.alpha = 0.9  # loss = (1-α)·CE + α·T²·KL(teacher_T ‖ student_T)
  config.kd.temperature = 4.0

  config.metrics = ml_collections.ConfigDict()
  config.metrics.zero_rate = "floor"  # or "exclude" (METRICS.md)
  config.metrics.convention = "simon_says"  # or "nas2022"

  # --config.runlocal=True: a seconds-long smoke run of the same pipeline (tests use it).
  config.runlocal_overrides = (
      ("dense.epochs", 3),
      ("finetune.epochs", 1),
      ("pruning.methods", ("l1_filter", "global_magnitude")),
      ("pruning.sparsities", (0.5, 0.9)),
  )
  return config


def _sgd(learning_rate: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, momentum=0.9, nesterov=False, weight_decay=5e-4,
      schedule="cosine", decay_epochs=(), decay_factor=0.1))
