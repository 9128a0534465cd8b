#!/bin/bash
# One device call for the pipeline on a GPU: the KV handoff table on the Llama-3-8B shape,
# then `pdserve serve` (1 prefill + 1 decode on one GPU, CUDA IPC) checked against transformers.
# Run from the repo root on the device machine with .carry carried.
set -u
export PYTHONUNBUFFERED=1
tar xJf .carry/site.tar.xz -C /tmp
mkdir -p /tmp/pd/pdserve
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/site:/tmp/pd:$PWD/tests
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 260 python3 benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192 --repeats 5 \
  --out "$OUT/handoff_h100.md" > "$OUT/handoff.log" 2>&1; echo "handoff exit $?"; tail -12 "$OUT/handoff.log"
timeout 280 python3 benchmarks/gpu_pipeline.py .carry/tokenizer "$OUT" > "$OUT/pipeline.log" 2>&1; echo "pipeline exit $?"
tail -15 "$OUT/pipeline.log"
