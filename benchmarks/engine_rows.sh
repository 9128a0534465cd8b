#!/bin/bash
# One device call for this round's engine rows: CUDA tests of the new model path (bf16), the fused
# MoE kernel, engine_speed for the Qwen3-8B and Qwen3-30B-A3B shapes. Each step gets what is left
# of a 570 s budget. From the repo root on the device machine:  bash benchmarks/engine_rows.sh
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pd/pdserve /tmp/rows
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/pd:$PWD/tests:$PWD/benchmarks
left() { echo $((570 - SECONDS)); }
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 timeout 120 python3 -m pytest -q -p no:cacheprovider -x \
  tests/engine/test_model_vs_transformers.py tests/engine/test_cuda_graphs.py tests/kernels/test_fused_moe.py \
  > /tmp/rows/cuda_tests.log 2>&1; echo "cuda tests exit $?"; tail -4 /tmp/rows/cuda_tests.log
timeout 90 python3 benchmarks/moe_kernel.py --out /tmp/rows > /tmp/rows/moe.log 2>&1; echo "moe exit $?"; tail -12 /tmp/rows/moe.log
timeout $(( $(left) * 6 / 10 )) python3 benchmarks/engine_speed.py --shape qwen3-8b --out /tmp/rows --name qwen3_8b \
  > /tmp/rows/qwen3_8b.log 2>&1; echo "qwen3-8b exit $?"; cat /tmp/rows/qwen3_8b.md 2>/dev/null || tail -20 /tmp/rows/qwen3_8b.log
timeout $(left) python3 benchmarks/engine_speed.py --shape qwen3-30b-a3b --out /tmp/rows --name qwen3_30b_a3b \
  > /tmp/rows/qwen3_30b.log 2>&1; echo "qwen3-30b-a3b exit $?"; cat /tmp/rows/qwen3_30b_a3b.md 2>/dev/null || tail -20 /tmp/rows/qwen3_30b.log
tar czf "$OUT/rows.tgz" -C /tmp/rows .
