#!/usr/bin/env bash
# Multi-host smoke test on one machine: 2 processes × 2 CPU devices (4 global devices) joined
# with jax.distributed over loopback, against the same run in 1 process × 4 CPU devices.
#
#   scripts/multihost_smoke.sh [BASE_DIR] [--config.key=value ...]
#
# BASE_DIR (default runs/multihost_smoke, wiped first) gets multi/ (the 2-process workdir),
# single/ (the 1-process workdir) and the logs proc0.log, proc1.log, single.log. The 2-process
# run trains everything from scratch; the 1-process run restores its dense teacher and prunes and
# fine-tunes it again, so the two fine-tune the same teacher (trained separately, float-order
# differences grow chaotically over the dense steps: even 1 vs 4 devices in one process differ by
# several test images). Prints both processes' logs and a per-record diff of results.jsonl; exits
# non-zero when a run fails or the records differ beyond float tolerance (accuracy 3/719,
# CKA 5e-3, realised sparsity exact).
# PYTHON (default .venv/bin/python, else python3) and TIMEOUT (seconds per run, default 900) can be set.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TIMEOUT="${TIMEOUT:-900}"
BASE="runs/multihost_smoke"
if [[ $# -gt 0 && "$1" != --* ]]; then BASE="$1"; shift; fi
EXTRA=("$@")
ARGS=(--config configs/default.py --config.runlocal=True "--config.pruning.methods=('l1_filter',)"
      "--config.pruning.sparsities=(0.5,)" ${EXTRA[@]+"${EXTRA[@]}"})

rm -rf "$BASE"
mkdir -p "$BASE"
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "== 2 processes × 2 CPU devices, coordinator 127.0.0.1:$PORT, workdir $BASE/multi"

pids=()
cleanup() {
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for i in 0 1; do
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    timeout "$TIMEOUT" "$PYTHON" -u -m prunebias_jax.main "${ARGS[@]}" \
      --config.distributed=True --config.coordinator_address="127.0.0.1:$PORT" \
      --config.num_processes=2 --config.process_id=$i --workdir "$BASE/multi" \
      >"$BASE/proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
rc=()
for i in 0 1; do
  if wait "${pids[$i]}"; then rc+=(0); else rc+=($?); status=1; fi
done
pids=()
for i in 0 1; do
  echo
  echo "== process $i (exit ${rc[$i]}): $BASE/proc$i.log"
  cat "$BASE/proc$i.log"
done
if [[ $status -ne 0 ]]; then
  echo "multihost_smoke: a process failed (exit codes ${rc[*]})" >&2
  exit 1
fi

echo
echo "== 1 process × 4 CPU devices, workdir $BASE/single (restores the 2-process run's dense teacher)"
mkdir -p "$BASE/single/checkpoints"
cp -r "$BASE/multi/checkpoints/dense" "$BASE/single/checkpoints/dense"
if ! JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    timeout "$TIMEOUT" "$PYTHON" -m prunebias_jax.main "${ARGS[@]}" --workdir "$BASE/single" \
    >"$BASE/single.log" 2>&1; then
  cat "$BASE/single.log"
  echo "multihost_smoke: the single-process run failed" >&2
  exit 1
fi
grep -E "devices:|stage dense|dense model|\[[0-9]+/[0-9]+\]" "$BASE/single.log" || true

echo
echo "== results.jsonl: 2 processes vs 1 process"
diff <(cd "$BASE/single" && find . -type f ! -path './checkpoints/*' | sort) \
     <(cd "$BASE/multi" && find . -type f ! -path './checkpoints/*' | sort) \
  && echo "same files in both workdirs (checkpoints aside)" || echo "(the file lists above differ)"
diff "$BASE/single/results.jsonl" "$BASE/multi/results.jsonl" \
  && echo "results.jsonl: identical" || echo "(textual diff above; float tolerances below)"
"$PYTHON" - "$BASE/single/results.jsonl" "$BASE/multi/results.jsonl" <<'EOF'
import json, sys
import numpy as np

single, multi = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
ok = len(single) == len(multi)
print(f"{len(single)} vs {len(multi)} records")
for a, b in zip(single, multi):
  key = (a["method"], a["sparsity"], a["kd"])
  same_key = key == (b["method"], b["sparsity"], b["kd"])
  d = {f: float(np.max(np.abs(np.asarray(a[f], float) - np.asarray(b[f], float))))
       for f in ("accuracy", "cka", "agreement", "cev", "sde", "fpr", "fnr", "realized_sparsity")}
  good = same_key and d["accuracy"] <= 3 / 719 and d["cka"] <= 5e-3 and d["realized_sparsity"] == 0
  ok &= good
  print(f"{'ok ' if good else 'BAD'} {key}: " + ", ".join(f"|Δ{f}|={v:.3g}" for f, v in d.items()))
print("multihost_smoke: PASS" if ok else "multihost_smoke: FAIL")
sys.exit(0 if ok else 1)
EOF
