#!/usr/bin/env bash
# The pre-registered CIFAR-10 evidence run (configs/evidence_cifar10.py, docs/results.md):
# the imbalanced setting, then the balanced one from the same teacher, then the analysis of
# the decision rules. Resumable: rerun the same command after an interruption.
#
#   scripts/evidence_cifar10.sh [WORKDIR (runs/evidence)] [extra --config.* flags...]
set -euo pipefail
workdir="${1:-runs/evidence}"
shift || true
python="${PYTHON:-python}"
config=configs/evidence_cifar10.py

"$python" -m prunebias_jax.main --config "$config:imbalanced" --workdir "$workdir/imbalanced" "$@"
# The balanced setting fine-tunes from the same teacher: its checkpoint carries its training
# identity (the balanced subset, the dense recipe), which the balanced run restores as its own.
if [[ ! -e "$workdir/balanced/checkpoints/dense" ]]; then
  mkdir -p "$workdir/balanced/checkpoints"
  cp -r "$workdir/imbalanced/checkpoints/dense" "$workdir/balanced/checkpoints/dense.tmp"
  mv "$workdir/balanced/checkpoints/dense.tmp" "$workdir/balanced/checkpoints/dense"
fi
"$python" -m prunebias_jax.main --config "$config:balanced" --workdir "$workdir/balanced" "$@"
"$python" scripts/evidence_analysis.py "$workdir" --markdown "$workdir/evidence.md"
