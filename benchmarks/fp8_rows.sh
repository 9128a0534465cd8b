#!/bin/bash
# One device call (one H200) for the FP8 rows, < 9 minutes: the CUDA FP8 tests, the FP8 GEMV
# config sweep, fp8_speed.py (accuracy, decode/prefill rows against the floors), and the KV
# handoff with FP8 and bf16 KV (one GPU, cuda_ipc). Each step has its own cap; what it leaves
# lands in $OUT: fp8_rows.tgz (everything) and the step summaries (<= 8 files).
#   bash benchmarks/fp8_rows.sh        (from the repository root, on the GPU machine)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fp8_out}
mkdir -p /tmp/pd/pdserve /tmp/rows "$OUT"
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/pd:$PWD/tests:$PWD/benchmarks
# Ray's site (uvicorn and the rest the cluster package imports) from ../shared/tools/gpu-site, when carried
[ -f .carry/site.tar.xz ] && tar xJf .carry/site.tar.xz -C /tmp && PYTHONPATH=/tmp/site:$PYTHONPATH
step() { echo "== $1 exit $2 at ${SECONDS}s"; }

timeout 110 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_gemv.py \
  tests/kernels/test_fp8_kv_attention.py tests/engine/test_fp8_checkpoint.py > /tmp/rows/fp8_tests.log 2>&1
step "fp8 tests" $?; tail -5 /tmp/rows/fp8_tests.log
PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 timeout 50 python3 -m pytest -q -p no:cacheprovider \
  tests/engine/test_fp8_kv.py > /tmp/rows/fp8_kv_tests.log 2>&1
step "fp8 kv tests" $?; tail -3 /tmp/rows/fp8_kv_tests.log

timeout 140 python3 benchmarks/fp8_gemv_sweep.py --out /tmp/rows --name fp8_gemv_sweep --budget-s 95 \
  > /tmp/rows/fp8_gemv_sweep.log 2>&1
step "fp8_gemv_sweep" $?; sed -n '/Winners per shape class/,$p' /tmp/rows/fp8_gemv_sweep.md 2>/dev/null || tail -20 /tmp/rows/fp8_gemv_sweep.log

timeout 210 python3 benchmarks/fp8_speed.py --out /tmp/rows --name fp8_speed > /tmp/rows/fp8_speed.log 2>&1
step "fp8_speed" $?; cat /tmp/rows/fp8_speed.md 2>/dev/null || tail -30 /tmp/rows/fp8_speed.log

for kv in fp8_e4m3 auto; do
  timeout $(( SECONDS < 470 ? (530 - SECONDS) / 2 : 30 )) python3 benchmarks/handoff.py --device cuda --shape llama3-8b \
    --lengths 512,2048,8192 --repeats 3 --kv-dtype $kv --out /tmp/rows/handoff_$kv.md > /tmp/rows/handoff_$kv.log 2>&1
  step "handoff $kv" $?; cat /tmp/rows/handoff_$kv.md 2>/dev/null || tail -10 /tmp/rows/handoff_$kv.log
done
tar czf "$OUT/fp8_rows.tgz" -C /tmp/rows .
cp /tmp/rows/fp8_gemv_sweep.md /tmp/rows/fp8_speed.md /tmp/rows/handoff_fp8_e4m3.md /tmp/rows/handoff_auto.md \
  /tmp/rows/fp8_tests.log "$OUT"/ 2>/dev/null
echo "== done at ${SECONDS}s"
