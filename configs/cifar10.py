"""CIFAR-10, ResNet-20: the Simon Says protocol on CIFAR-10 (imbalanced fine-tuning split).

Full experiment (GPU/TPU; TFDS 'cifar10' prepared in --config.data.data_dir or the TFDS default):

    python -m prunebias_jax.main --config configs/cifar10.py --workdir runs/c10

From the JPEG image folder instead of TFDS:

    python -m prunebias_jax.main --config configs/cifar10.py \
      --config.data.source=image_folder --config.data.dir=PATH/TO/cifar10 --workdir runs/c10

A ≤ 10-minute check on 2 CPU cores (subset of the data, few epochs, one method):

    python -m prunebias_jax.main --config configs/cifar10.py --config.runlocal=True \
      --config.data.source=image_folder --config.data.dir=PATH/TO/cifar10 --workdir runs/c10-local

The dense teacher trains on the balanced training split; pruning + fine-tuning see an
imbalanced one (bird keeps 10%, cat 20%, deer 50% of their images; test split untouched).
Structured L1 filter pruning, gradual (AGP) over the first half of fine-tuning, CE vs KD
(α = 0.9, T = 4), 4 seeds per cell, as in the paper (the schedule scaled to CIFAR-10/ResNet-20).
"""

import ml_collections

from prunebias_jax.config import base_config, sgd


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.model = "resnet20"
  config.seeds = (0, 1, 2, 3)

  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.batch_size = 128
  config.data.eval_batch_size = 512  # divides by 8/16/32/64 devices
  config.data.crop_padding = 4
  config.data.flip = True
  config.data.imbalance.classes = (2, 3, 4)  # bird, cat, deer (alphabetical class order)
  config.data.imbalance.keep_fractions = (0.1, 0.2, 0.5)

  config.dense.epochs = 200
  config.dense.optim = sgd(0.1, schedule="cosine")
  config.finetune.epochs = 240
  config.finetune.optim = sgd(0.05, schedule="step", decay_epochs=(150, 180, 210))

  config.pruning.methods = ("l1_filter",)
  config.pruning.sparsities = (0.3, 0.45, 0.6, 0.75, 0.9)
  config.pruning.schedule = "gradual"
  config.pruning.frequency_epochs = 5
  config.pruning.end_fraction = 0.5
  config.pruning.control = True  # the sparsity-0 control cell (CE and KD, unpruned)

  config.runlocal_overrides = (
    ("seeds", (0,)),
    ("data.train_examples", 5000),
    ("data.test_examples", 2000),
    ("dense.epochs", 6),
    ("dense.optim.schedule", "cosine"),
    ("finetune.epochs", 2),
    ("finetune.optim.schedule", "cosine"),
    ("finetune.optim.learning_rate", 0.02),
    ("pruning.sparsities", (0.5, 0.9)),
    ("pruning.frequency_epochs", 1),
    ("pruning.end_fraction", 1.0),  # keep a ramp over the few epochs (10%, then the target)
  )
  return config
