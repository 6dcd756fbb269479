"""Simon Says, CIFAR-100 balanced: ResNet32x4 teacher, structured L1 filter pruning (gradual AGP)
at 30/45/60/75/90%, fine-tuned with CE ("Struct") and with KD (0.1·CE + 0.9·T²·KL, T = 4),
4 seeds per cell; CEV/SDE from seed-averaged rates (paper Figs. on CEV/SDE vs sparsity).

    python -m prunebias_jax.main --config configs/paper/cifar100_balanced.py \
      --workdir runs/paper-c100
    # CPU check: add --config.runlocal=True (needs TFDS cifar100 prepared: scripts/prepare_data.py)
"""

import ml_collections

from configs.paper._cifar100_resnet32x4 import paper_config


def get_config() -> ml_collections.ConfigDict:
  return paper_config(imbalanced=False, sparsities=(0.3, 0.45, 0.6, 0.75, 0.9))
