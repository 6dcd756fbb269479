"""CIFAR-10, ResNet-20, balanced fine-tuning split: the control setting of configs/cifar10.py.

Everything as in configs/cifar10.py (the same teacher recipe, structured L1 filter pruning,
gradual AGP, CE vs KD with α = 0.9, T = 4, 4 seeds, the sparsity-0 control cell) except that
pruning + fine-tuning see the full, balanced training split. The paper's second claim (KD
helps, and much more on imbalanced data) is a comparison of the two settings.

Full experiment (GPU/TPU; TFDS 'cifar10' prepared in --config.data.data_dir or the TFDS default):

    python -m prunebias_jax.main --config configs/cifar10_balanced.py --workdir runs/c10-balanced

From the JPEG image folder, and a ≤ 10-minute check on 2 CPU cores:

    python -m prunebias_jax.main --config configs/cifar10_balanced.py \
      --config.data.source=image_folder --config.data.dir=PATH/TO/cifar10 --workdir runs/c10-bal
    python -m prunebias_jax.main --config configs/cifar10_balanced.py --config.runlocal=True \
      --config.data.source=image_folder --config.data.dir=PATH/TO/cifar10 \
      --workdir runs/c10-bal-local
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  config = cifar10.get_config()
  config.data.imbalance.classes = ()
  config.data.imbalance.keep_fractions = ()
  return config
