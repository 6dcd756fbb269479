"""Simon Says, the distillation zoo: CE, KD and five feature distillations (SP, AT, PKT, CRD,
feature hints), each alone and with the KD term, fine-tuning the gradually L1-filter-pruned
ResNet32x4 on imbalanced CIFAR-100 at 45% (the paper's imbalanced study), 4 seeds.

    python -m prunebias_jax.main --config configs/paper/cifar100_distill_zoo.py \
      --workdir runs/paper-c100-zoo
    # balanced data: add --config.data.imbalance.classes='()' \
    #   --config.data.imbalance.keep_fractions='()'
    # CPU check (needs TFDS cifar100 prepared: scripts/prepare_data.py): --config.runlocal=True

Loss = γ·CE + α·T²·KL + β·F with T = 4 (the authors' RepDistiller settings):
CE γ=1; KD γ=0.1, α=0.9; SP β=3000 (last stage); AT β=1000 (every stage; lr 0.005, batch 256);
PKT β=30000 (pooled features; lr 0.005, batch 256); CRD β=0.8 (128-d heads, 16384 negatives;
batch 256); hints β=1 (every stage); each "+kd" variant adds α'=1 (γ=1). The rest of the
protocol (teacher, 240 epochs, step decay, AGP 10% → 45%) is `configs/paper/cifar100_imbalanced.py`.
results.md's "Distillation methods" section and plots/distill_methods.png compare every method
with CE and KD, paired by seed.
"""

import ml_collections

from configs.paper._cifar100_resnet32x4 import paper_config

METHODS = ("ce", "kd", "sp", "at", "pkt", "crd", "hint")


def get_config() -> ml_collections.ConfigDict:
  config = paper_config(imbalanced=True, sparsities=(0.45,))
  config.distill.method = METHODS + tuple(f"{m}+kd" for m in METHODS[2:])
  # The authors' per-method settings (the schema's default weights are theirs too).
  config.distill.learning_rate.at = 0.005
  config.distill.learning_rate.pkt = 0.005
  config.distill.batch_size.at = 256
  config.distill.batch_size.pkt = 256
  config.distill.batch_size.crd = 256
  # runlocal: the paper config's few-minute CPU variant, with CRD's bank sampling shrunk and
  # every method at the one CPU batch size.
  config.runlocal_overrides = tuple(config.runlocal_overrides) + (
    ("distill.crd.negatives", 256),
    ("distill.batch_size.at", 64),
    ("distill.batch_size.pkt", 64),
    ("distill.batch_size.crd", 64),
  )
  return config
