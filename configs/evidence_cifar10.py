"""The pre-registered CIFAR-10 evidence run of docs/results.md: one design, fixed before the run.

Two fine-tuning settings from one dense teacher; run the imbalanced one first, give the
balanced one the same teacher (its checkpoint is restored because its training identity is
the same), then the analysis of the decision rules (about 2 h 15 min in all on 2 CPU cores):

    python -m prunebias_jax.main --config configs/evidence_cifar10.py:imbalanced \
      --workdir runs/evidence/imbalanced
    mkdir -p runs/evidence/balanced/checkpoints
    cp -r runs/evidence/imbalanced/checkpoints/dense runs/evidence/balanced/checkpoints/
    python -m prunebias_jax.main --config configs/evidence_cifar10.py:balanced \
      --workdir runs/evidence/balanced
    python scripts/evidence_analysis.py runs/evidence --markdown runs/evidence/evidence.md

`scripts/evidence_cifar10.sh runs/evidence` runs all four. The data default to the CIFAR-10
JPEG image folder at ../shared/data/cifar10 (the development machines' copy); elsewhere give
`--config.data.dir=PATH/TO/cifar10`, or `--config.data.source=tfds --config.data.name=cifar10`.

The design (docs/results.md states it, with the decision rules, above the numbers):
- a seeded, class-stratified 10,000-image training subset (1,000 per class) and the full
  10,000-image test set;
- ResNet-20; one dense teacher, 15 epochs, SGD lr 0.1 cosine, batch 128, crop + flip, on the
  balanced subset;
- fine-tuning split: `balanced` (the subset) or `imbalanced` (bird keeps 10%, cat 20%, deer 50%
  of their images: 7,800 images);
- structured L1 filter pruning, one shot, at sparsity 0.5 and 0.8, plus the sparsity-0 control
  (the teacher fine-tuned unpruned); CE and KD (α = 0.9, T = 4); seeds 0, 1, 2, the CE and KD
  students of a seed sharing masks and data order;
- fine-tuning 1 epoch, SGD lr 0.02 cosine.
The epochs are what a ~2 h budget on the 2-core CPU allows, sized from throughput measured on
the day of the run, before any model was trained: 1.5 s per CE step and 2.45 s per KD step of
ResNet-20 at batch 128 (2.4x slower than the 0.6 s the brief quotes), about 40 s per full
test-set evaluation. The 30 teacher epochs first planned would have taken an hour alone.

A GPU variant with the paper's schedule (240 fine-tuning epochs, step decay at 150/180/210,
gradual AGP over the first half, 200 teacher epochs, all 50,000 training images, 4 seeds):

    python -m prunebias_jax.main --config configs/evidence_cifar10.py:imbalanced \
      --config.data.train_examples=0 --config.dense.epochs=200 --config.finetune.epochs=240 \
      --config.finetune.optim.schedule=step \
      --config.finetune.optim.decay_epochs='(150,180,210)' \
      --config.finetune.optim.learning_rate=0.05 --config.pruning.schedule=gradual \
      --config.seeds='(0,1,2,3)' --workdir runs/evidence-gpu/imbalanced

(and the same with `:balanced`). `--config.runlocal=True` is a minutes-long check of the
pipeline.
"""

import ml_collections

from prunebias_jax.config import base_config, sgd

SETTINGS = ("imbalanced", "balanced")


def get_config(setting: str = "imbalanced") -> ml_collections.ConfigDict:
  if setting not in SETTINGS:
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
  config = base_config()
  config.model = "resnet20"
  config.seeds = (0, 1, 2)

  config.data.source = "image_folder"
  config.data.dir = "../shared/data/cifar10"
  config.data.train_examples = 10_000  # seeded, class-stratified: 1,000 per class
  config.data.test_examples = 0  # the full test set: no class has a zero dense error rate
  config.data.batch_size = 128
  config.data.eval_batch_size = 500
  config.data.crop_padding = 4
  config.data.flip = True
  if setting == "imbalanced":
    config.data.imbalance.classes = (2, 3, 4)  # bird, cat, deer (alphabetical class order)
    config.data.imbalance.keep_fractions = (0.1, 0.2, 0.5)

  config.dense.epochs = 15
  config.dense.optim = sgd(0.1, schedule="cosine")
  config.finetune.epochs = 1
  config.finetune.optim = sgd(0.02, schedule="cosine")

  config.pruning.methods = ("l1_filter",)
  config.pruning.sparsities = (0.5, 0.8)
  config.pruning.schedule = "one_shot"
  config.pruning.control = True
  config.kd.alpha = 0.9
  config.kd.temperature = 4.0
  config.distill.method = ("ce", "kd")

  # Only watched, and a full test pass per epoch would cost ~14 s × 51 epochs of training.
  config.monitor.test_accuracy = False

  config.runlocal_overrides = (
    ("seeds", (0, 1)),
    ("data.train_examples", 1000),
    ("data.test_examples", 1000),
    ("dense.epochs", 2),
    ("finetune.epochs", 1),
    ("analysis.svcca_examples", 500),
  )
  return config
