"""Shared by the CIFAR-100 / ResNet32x4 configs of the Simon Says paper (Blakeney et al.
2021); not a config itself."""

import ml_collections

from prunebias_jax.config import base_config, sgd

# CIFAR-100 fine-label indices that keep only part of their 500 training images (the paper's
# imbalanced CIFAR-100 setting).
IMBALANCED_CLASSES = {
  0.1: (83, 20, 75, 85, 90),  # shrew, apple, crocodile, maple_tree, bicycle
  0.2: (17, 86, 87, 94, 37),  # can, oak_tree, palm_tree, train, butterfly
  0.5: (76, 22, 58, 63, 6),  # dinosaur, orange, elephant, raccoon, flatfish
}


def paper_config(*, imbalanced: bool, sparsities: tuple[float, ...]) -> ml_collections.ConfigDict:
  config = base_config()
  config.model = "resnet32x4"
  config.seeds = (0, 1, 2, 3)  # 4 trials per configuration

  config.data.source = "tfds"
  config.data.name = "cifar100"
  config.data.batch_size = 64  # the teacher's batch (RepDistiller)
  config.data.eval_batch_size = 512  # divides by 8/16/32/64 devices
  config.data.crop_padding = 4
  config.data.flip = True
  if imbalanced:
    config.data.imbalance.classes = tuple(
      c for f in IMBALANCED_CLASSES for c in IMBALANCED_CLASSES[f]
    )
    config.data.imbalance.keep_fractions = tuple(
      f for f in IMBALANCED_CLASSES for _ in IMBALANCED_CLASSES[f]
    )
  else:
    config.data.imbalance.classes = ()
    config.data.imbalance.keep_fractions = ()
  config.data.imbalance.apply_to_dense = False  # the teacher is the balanced one

  # Teacher: 240 epochs, lr 0.05, ×0.1 after 150/180/210 (79.42% top-1 in the paper).
  config.dense.epochs = 240
  config.dense.optim = sgd(0.05, schedule="step", decay_epochs=(150, 180, 210))
  # Student: starts from the teacher; same schedule, batch 512; AGP over epochs 1-120, every 5.
  config.finetune.epochs = 240
  config.finetune.batch_size = 512
  config.finetune.optim = sgd(0.05, schedule="step", decay_epochs=(150, 180, 210))

  config.pruning.methods = ("l1_filter",)
  config.pruning.sparsities = sparsities
  config.pruning.schedule = "gradual"
  config.pruning.initial_sparsity = 0.1
  config.pruning.frequency_epochs = 5
  config.pruning.end_fraction = 0.5
  config.pruning.control = True  # the sparsity-0 control cell (CE and KD, unpruned)

  config.kd.alpha = 0.9
  config.kd.temperature = 4.0

  # Minutes on a CPU (with a prepared TFDS cifar100): tiny subset, 1-2 epochs, one seed.
  config.runlocal_overrides = (
    ("seeds", (0,)),
    ("data.train_examples", 2000),
    ("data.test_examples", 1000),
    ("dense.epochs", 1),
    ("dense.optim.schedule", "cosine"),
    ("finetune.epochs", 2),
    ("finetune.batch_size", 64),
    ("finetune.optim.schedule", "cosine"),
    ("pruning.sparsities", sparsities[:1]),
    ("pruning.frequency_epochs", 1),
    ("pruning.end_fraction", 1.0),  # keep a ramp over the few epochs (10%, then the target)
  )
  return config
