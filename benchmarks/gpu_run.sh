#!/bin/bash
# One device call for the serving pipeline on a GPU. Run from the repo root on the device
# machine with .carry carried (Ray's site from ../shared/tools/gpu-site, tokenizer files):
#   bash benchmarks/gpu_run.sh [handoff] [pipeline] [ipc_tests] [bench]
set -u
export PYTHONUNBUFFERED=1
tar xJf .carry/site.tar.xz -C /tmp
mkdir -p /tmp/pd/pdserve
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/site:/tmp/pd:$PWD/tests
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
for step in "$@"; do
  case $step in
    handoff) timeout 200 python3 benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192 \
               --repeats 5 --out "$OUT/handoff_h100.md" > "$OUT/handoff.log" 2>&1 ;;
    pipeline) timeout 280 python3 benchmarks/gpu_pipeline.py .carry/tokenizer "$OUT" > "$OUT/pipeline.log" 2>&1 ;;
    ipc_tests) timeout 120 python3 -m pytest -q -p no:cacheprovider tests/transfer > "$OUT/ipc_tests.log" 2>&1 ;;
    bench) timeout 420 python3 benchmarks/gpu_bench.py .carry/tokenizer "$OUT" > "$OUT/bench.log" 2>&1 ;;
  esac
  echo "$step exit $?"; tail -12 "$OUT/$step.log"
done
