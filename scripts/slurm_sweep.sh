#!/usr/bin/env bash
# A sweep on SLURM: three dependent jobs on one shared workdir (README, "Sweeps on a cluster").
#
#   scripts/slurm_sweep.sh CONFIG WORKDIR SHARDS [--config.key=value ...]
#
#   1. the dense stage (the teacher and the dense population): one job;
#   2. the cells: a job array of SHARDS tasks (--array=0-(SHARDS-1)), after 1 succeeded; task i
#      runs the i-th of SHARDS balanced shards (config.shard.index from $SLURM_ARRAY_TASK_ID);
#   3. the report, after every task of 2 ended (afterany: if a shard failed, the report job
#      fails with one line naming the cells that are missing; rerun that shard with the line
#      the script prints, then the report).
#
# Environment: SBATCH_ARGS (options of every job, e.g. "--partition=gpu --account=lab
# --time=48:00:00"), CELL_ARGS (options of the dense and cell jobs; default "--gres=gpu:1
# --cpus-per-task=8"), REPORT_ARGS (of the report job; default "--cpus-per-task=4"), PYTHON
# (default: python3), SBATCH (default: sbatch). WORKDIR must be on a filesystem every node
# mounts at the same path, with POSIX locks (NFSv4, GPFS, Lustre with -o flock).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG WORKDIR SHARDS [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2 shards=$3
shift 3
if ! [[ $shards =~ ^[1-9][0-9]*$ ]]; then
  echo "error: SHARDS=$shards is not allowed; expected an integer >= 1" >&2
  exit 2
fi
sbatch=${SBATCH:-sbatch}
python=${PYTHON:-python3}
read -r -a common <<< "${SBATCH_ARGS:-}"
read -r -a cell <<< "${CELL_ARGS:---gres=gpu:1 --cpus-per-task=8}"
read -r -a report <<< "${REPORT_ARGS:---cpus-per-task=4}"
mkdir -p "$workdir/slurm"
# The command each job runs, quoted for the shell SLURM starts it in (overrides keep their
# parentheses and quotes).
run=$(printf '%q ' "$python" -m prunebias_jax.main --config "$config" --workdir "$workdir" "$@")
logs=(--output "$workdir/slurm/%x-%A_%a.out")

dense=$("$sbatch" --parsable "${common[@]}" "${cell[@]}" "${logs[@]}" --job-name=prunebias-dense \
  --wrap "$run --config.stage=dense")
dense=${dense%%;*}  # --parsable prints "id" or "id;cluster"
cells=$("$sbatch" --parsable "${common[@]}" "${cell[@]}" "${logs[@]}" --job-name=prunebias-cells \
  --array="0-$((shards - 1))" --dependency="afterok:$dense" \
  --wrap "$run --config.stage=cells --config.shard.count=$shards")
cells=${cells%%;*}
report_job=$("$sbatch" --parsable "${common[@]}" "${report[@]}" "${logs[@]}" \
  --job-name=prunebias-report --dependency="afterany:$cells" --wrap "$run --config.stage=report")
report_job=${report_job%%;*}
echo "submitted: dense $dense; cells $cells (array 0-$((shards - 1))); report $report_job"
echo "logs: $workdir/slurm/; progress: $workdir/provenance.jsonl"
echo "a failed shard i: $run --config.stage=cells --config.shard.count=$shards --config.shard.index=i"
