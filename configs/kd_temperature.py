"""KD temperature study: does a higher distillation temperature make the pruned student fairer?

    python -m prunebias_jax.main --config configs/kd_temperature.py --workdir runs/kd-temperature

One sparsity (70%, structured L1 filter pruning), CE once and one KD student per temperature
T ∈ {1, 2, 4, 8, 16}, 3 seeds and 3 dense models (so CIE and significance have populations);
results.md gets a table of accuracy, CEV, SDE, DPD, EOD per T. On the embedded digits (no
sensitive attribute: DPD/EOD are reported where the data has one, e.g. CelebA:
`--config.data.source=tfds --config.data.name=celeb_a --config.data.label_attribute=Blond_Hair
--config.data.group_attribute=Male --config.data.image_size=64 --config.model=resnet20`).
`--config.runlocal=True`: two temperatures, one seed.
"""

import ml_collections

from prunebias_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.seeds = (0, 1, 2)
  config.analysis.dense_seeds = (1, 2)
  config.pruning.methods = ("l1_filter",)
  config.pruning.sparsities = (0.7,)
  config.kd.temperatures = (1.0, 2.0, 4.0, 8.0, 16.0)
  config.runlocal_overrides = (
    ("seeds", (0,)),
    ("analysis.dense_seeds", ()),
    ("dense.epochs", 3),
    ("finetune.epochs", 1),
    ("kd.temperatures", (1.0, 4.0)),
  )
  return config
