"""Quantization-induced bias beside pruning-induced bias, on the embedded 8x8 digits (a few
minutes on 2 CPU cores):

    python -m prunebias_jax.main --config configs/quantization.py --workdir runs/quantization

The dense small CNN (the teacher and reference) is compressed four ways: int8 weights, int4
weights, int8 weights and activations (per-example ranges), and global magnitude pruning at
50% and 90% sparsity; each scheme is also combined with that pruning at both sparsities
('global_magnitude+int8_weights': prune, then quantize). Every quantized method gets its
post-training model (PTQ, no fine-tuning) and quantization-aware fine-tuning with CE and with
KD from the dense teacher, on the imbalanced split of the default experiment, so one
results.md answers: is the int8 / int4 model more or less biased than the 90%-sparse one, and
does KD help both? The control cell (method 'none': the teacher fine-tuned unquantized and
unpruned) separates the bias of fine-tuning on the imbalanced split from that of compression.
`--config.runlocal=True` is a seconds-long smoke run.

CIFAR-10 (ResNet-20; GPU or TPU, with the prepared dataset of scripts/prepare_data.py):

    python -m prunebias_jax.main --config configs/quantization.py --workdir runs/quant_cifar10 \\
      --config.model=resnet20 --config.data.source=tfds --config.data.name=cifar10 \\
      --config.data.flip=True --config.data.crop_padding=4 --config.data.batch_size=128 \\
      --config.dense.epochs=160 --config.finetune.epochs=30 \\
      --config.quantization.schemes="('int8_weights','int4_weights','int8_dynamic','int8_static')"
"""

import ml_collections

from prunebias_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.data.imbalance.classes = (3, 5, 8)  # the default experiment's imbalanced fine-tuning
  config.data.imbalance.keep_fractions = (0.1, 0.15, 0.2)
  config.pruning.methods = ("global_magnitude",)
  config.pruning.sparsities = (0.5, 0.9)
  config.quantization.schemes = ("int8_weights", "int4_weights", "int8_dynamic")
  config.quantization.prune_first = ("global_magnitude",)
  # The unpruned, unquantized teacher fine-tuned on the same imbalanced split (CE and KD):
  # the bias of the fine-tuning alone, which QAT cells carry too (their PTQ models do not).
  config.pruning.control = True
  config.runlocal_overrides = (
    ("dense.epochs", 3),
    ("finetune.epochs", 1),
    ("pruning.sparsities", (0.9,)),
  )
  return config
