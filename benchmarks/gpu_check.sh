#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, in under 8 minutes,
#   1. the GPU tests (`pytest -m gpu`: training on cuda in no/bf16/fp16/auto precision with the grad scaler for
#      fp16, channels_last, the data kept on the device, torch.compile, kill -9 + bitwise resume with
#      deterministic algorithms), then
#   2. the benchmark on cuda (disttrain vs the tutorial loop vs a bare loop, samples/s and ratios),
#   3. the GPT's tokens/s on cuda (disttrain vs a nanoGPT-style hand loop; needs data/shakespeare from setup.sh);
# and writes OUT/gpu_check.json (device, tests, benchmark) and OUT/summary.md (also printed).
# Without CUDA it prints one line and exits 0, having written nothing.
#
#   bash benchmarks/gpu_check.sh [OUT]        (OUT defaults to ./gpu_check; PYTHON, DATA_DIR override)
#
# Exit status: 0 when every GPU test passed and the benchmark ran; 1 otherwise (the JSON says what failed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, installed or not

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); skipped"
  exit 0
fi

OUT="${1:-gpu_check}"
DATA="${DATA_DIR:-$OUT/data}"
mkdir -p "$OUT" "$DATA"
start=$(date +%s)

# 1. GPU tests: at most 4.5 minutes
timeout 270 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests 2>&1 \
  | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. The benchmark on cuda: at most 2 minutes (2 rounds of 400 timed steps, lenet and cnn)
timeout 120 "$PY" -m disttrain.bench --data-dir "$DATA" --rounds 2 --steps 400 --multi-models '' \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

# 3. The GPT on cuda: at most 1 minute (1 round of 200 timed steps, tokens/s)
if [ -d data/shakespeare ]; then
  timeout 60 "$PY" -m disttrain.bench --workload lm --corpus data/shakespeare --data-dir "$DATA" --rounds 1 \
    --steps 200 --multi-models '' --json "$OUT/bench_lm.json" 2>&1 | tee "$OUT/bench_lm.log"
else
  echo "gpu_check: no data/shakespeare (run launch/setup.sh): GPT tokens/s skipped" | tee "$OUT/bench_lm.log"
fi

"$PY" benchmarks/gpu_summary.py "$OUT" "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))"
