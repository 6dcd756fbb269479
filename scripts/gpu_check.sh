#!/usr/bin/env bash
# The GPU check of issue 15: one script for the moment a session is lent one H100/H200, sized to
# finish in about 8 minutes (each part has its own time limit and the script goes on past a
# part that fails or runs out of time). Every part is scripts/benchmark.py; each writes its
# JSON and a markdown table into OUT, and the tables are joined into OUT/gpu_check.md.
#
#   bash scripts/gpu_check.sh [OUT]          # default OUT: gpu_check/ ($OUT on the device tool)
#   bash scripts/gpu_check.sh --dry-run      # print the parts and their commands, run nothing
#
# Parts (issue 15, item 6): masked CE+KD train step, ResNet-20 b128/b512 and ResNet-18 b512, f32
# and bf16, against PyTorch eager channels-last and torch.compile (default and
# max-autotune-no-cudagraphs), cudnn.benchmark on; a population of 8 vs 8 sequential steps;
# metric kernels at n = 1M (inputs on the device) and streamed; two XLA flag rows; fit() end to
# end, per-step and scanned loop (images/s with the default checkpoint cadence ÷ bare-step
# images/s, and the loop's own cost per step around a no-op step).
# Needs: pip install -e '.[bench]' with a CUDA build of torch, and jax[cuda].
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out="${1:-${OUT:-gpu_check}}"
py="${PYTHON:-python}"
mkdir -p "$out"

part() {  # part NAME SECONDS [ENV=VALUE ...] -- benchmark.py arguments
  local name="$1" seconds="$2"
  shift 2
  local envs=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    envs+=("$1")
    shift
  done
  shift
  local cmd=(env "${envs[@]}" timeout "$seconds" "$py" scripts/benchmark.py "$@"
    --json "$out/$name.json" --markdown "$out/$name.md")
  echo "== $name (at most ${seconds} s): ${cmd[*]}"
  [ "$dry" -eq 1 ] && return 0
  local start=$SECONDS
  "${cmd[@]}" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s (log: $out/$name.log)"
}

if [ "$dry" -eq 0 ]; then
  "$py" -c 'import jax, sys; sys.exit(jax.devices()[0].platform != "gpu")' || {
    echo "error: JAX sees no GPU here (jax.devices(): $("$py" -c 'import jax; print(jax.devices())'))" >&2
    exit 2
  }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/nvidia-smi.csv" 2>&1
fi

torch="eager_cl,compile_cl,compile_max_cl"
part train_resnet20 150 -- --sections train --models resnet20 --batches 128,512 \
  --jax-dtypes float32,bfloat16 --torch-variants "$torch" --repeats 5
part train_resnet18 120 -- --sections train --models resnet18 --batches 512 \
  --jax-dtypes float32,bfloat16 --torch-variants "$torch" --repeats 5
part population 50 -- --sections population --population 8 --population-model resnet20 \
  --population-batch 128 --repeats 5
part metrics 60 -- --sections metrics,stream --metric-n 1000000 --metric-d 512 \
  --metric-repeats 3 --stream-n 1000000,10000000 --stream-d 512,2048 --stream-max-flops 3e14
part flag_conv_nhwc 25 XLA_FLAGS=--xla_gpu_force_conv_nhwc=true -- --sections train \
  --models resnet20 --batches 128 --torch-variants "" --repeats 5
part flag_graph_min_1 25 XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 -- --sections train \
  --models resnet20 --batches 128 --torch-variants "" --repeats 5
part loop 50 -- --sections loop --loop-model resnet20 --loop-batch 128 --loop-steps 390 \
  --loop-epochs 1 --fit-epochs 2 --repeats 3

[ "$dry" -eq 1 ] && exit 0
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  cat "$out/nvidia-smi.csv" 2>/dev/null
  for f in train_resnet20 train_resnet18 population metrics flag_conv_nhwc flag_graph_min_1 loop; do
    echo
    echo "## $f"
    if [ -s "$out/$f.md" ]; then cat "$out/$f.md"; else echo "(no table: see $f.log)"; fi
  done
} >"$out/gpu_check.md"
echo "== wrote $out/gpu_check.md"
