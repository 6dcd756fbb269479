"""The default Simon Says experiment on the embedded 8x8 digits (no download; minutes on 2 CPU
cores).

    python -m prunebias_jax.main --config configs/default.py --workdir runs/default

Dense small CNN trained from scratch on the balanced training split; every pruning method ×
sparsity is fine-tuned twice from the same masked weights (CE, and KD from the dense teacher)
on an imbalanced training split (classes 3, 5, 8 keep 10/15/20% of their images; the test
split is untouched), then compared with the dense reference on the full test set.
Override any value, e.g. `--config.pruning.sparsities='(0.5,0.9)' --config.seeds='(0,1,2)'`;
`--config.runlocal=True` is a seconds-long smoke run.
"""

import ml_collections

from prunebias_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()  # the schema's defaults are this experiment's values, but for:
  config.data.imbalance.classes = (3, 5, 8)  # the paper's imbalanced fine-tuning split
  config.data.imbalance.keep_fractions = (0.1, 0.15, 0.2)
  config.runlocal_overrides = (
    ("dense.epochs", 3),
    ("finetune.epochs", 1),
    ("pruning.methods", ("l1_filter", "global_magnitude")),
    ("pruning.sparsities", (0.5, 0.9)),
  )
  return config
