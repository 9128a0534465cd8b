#!/bin/bash
# One device call for the MoE decode path (issue 20): the MoE kernel tests compiled on CUDA and the
# model-vs-transformers tests in bf16 (judged against transformers' own bf16 error), then
# benchmarks/moe_kernel.py (grouped rows, the few-token pair-major vs grouped table with its sweep,
# the whole-block rows), then engine_speed's Qwen3-30B-A3B rows with whatever is left of 570 s.
# From the repo root on the device machine:  bash benchmarks/moe_rows.sh   (results: $OUT/rows.tgz)
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pd/pdserve /tmp/rows
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/pd:$PWD/tests:$PWD/benchmarks
left() { echo $((570 - SECONDS)); }
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 timeout 170 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_fused_moe.py tests/kernels/test_fused_moe_pairs.py tests/kernels/test_qk_norm_rope.py \
  tests/engine/test_model_vs_transformers.py \
  > /tmp/rows/moe_tests.log 2>&1; echo "cuda tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" /tmp/rows/moe_tests.log | tail -20
timeout 150 python3 benchmarks/moe_kernel.py --sweep --out /tmp/rows > /tmp/rows/moe.log 2>&1; echo "moe_kernel exit $?"
cat /tmp/rows/moe_kernel.md 2>/dev/null || tail -30 /tmp/rows/moe.log
timeout $(left) python3 benchmarks/engine_speed.py --shape qwen3-30b-a3b --profile --out /tmp/rows --name qwen3_30b_a3b \
  > /tmp/rows/qwen3_30b.log 2>&1; echo "qwen3-30b-a3b exit $?"; cat /tmp/rows/qwen3_30b_a3b.md 2>/dev/null || tail -20 /tmp/rows/qwen3_30b.log
grep -A12 "^profile decode" /tmp/rows/qwen3_30b.log | head -30  # GPU time per kernel of an eager step
tar czf "$OUT/rows.tgz" -C /tmp/rows .
