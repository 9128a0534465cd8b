#!/bin/bash
# One device call for the FP8 rows: CUDA tests of the FP8 paths, fp8_speed.py, the handoff with bf16
# and FP8 KV (one GPU, cuda_ipc). Each step gets what is left of a 420 s budget.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pd/pdserve /tmp/rows
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/pd:$PWD/tests:$PWD/benchmarks
left() { echo $((420 - SECONDS)); }
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_kv_attention.py \
  tests/engine/test_fp8_checkpoint.py > /tmp/rows/fp8_tests.log 2>&1; echo "fp8 tests exit $?"; tail -5 /tmp/rows/fp8_tests.log
PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/engine/test_fp8_kv.py \
  > /tmp/rows/fp8_kv_tests.log 2>&1; echo "fp8 kv tests exit $?"; tail -3 /tmp/rows/fp8_kv_tests.log
timeout $(( $(left) * 7 / 10 )) python3 benchmarks/fp8_speed.py --out /tmp/rows --name fp8_speed > /tmp/rows/fp8_speed.log 2>&1
echo "fp8_speed exit $?"; cat /tmp/rows/fp8_speed.md 2>/dev/null || tail -30 /tmp/rows/fp8_speed.log
for kv in auto fp8_e4m3; do
  timeout $(( $(left) / 2 )) python3 benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192 --repeats 3 \
    --kv-dtype $kv --out /tmp/rows/handoff_$kv.md > /tmp/rows/handoff_$kv.log 2>&1; echo "handoff $kv exit $?"
  cat /tmp/rows/handoff_$kv.md 2>/dev/null || tail -10 /tmp/rows/handoff_$kv.log
done
tar czf "$OUT/fp8_rows.tgz" -C /tmp/rows .
