"""Simon Says, CIFAR-100 imbalanced: 15 classes keep 10/20/50% of their training images for
pruning + fine-tuning (44,500 images remain; test set and teacher untouched); ResNet32x4,
structured L1 filter pruning (gradual AGP) at 45%, CE vs KD (T = 4, α = 0.9), 4 seeds.

    python -m prunebias_jax.main --config configs/paper/cifar100_imbalanced.py \
      --workdir runs/paper-c100-imb
    # CPU check: add --config.runlocal=True (needs TFDS cifar100 prepared: scripts/prepare_data.py)
"""

import ml_collections

from configs.paper._cifar100_resnet32x4 import paper_config


def get_config() -> ml_collections.ConfigDict:
  return paper_config(imbalanced=True, sparsities=(0.45,))
