#!/bin/bash
# One device call: benchmark (+ sweeps/profile when asked), then the engine and kernel tests on CUDA.
# Usage on the device machine, from the repo root: bash benchmarks/device_run.sh NAME [engine_speed args...]
name=$1; shift
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pd/pdserve
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/pd:$PWD/tests
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 330 python3 benchmarks/engine_speed.py --out "$OUT" --name "$name" "$@" > "$OUT/bench.out" 2>&1
echo "benchmark exit $?"
grep -E "^(ceilings|correctness|captured|decode|prefill|baseline|sweep|profile|gemv|variant|    |SECTION|\[|Traceback|  File|[A-Za-z]*Error)" "$OUT/bench.out" | head -120
{
for dtype in float32 bfloat16; do
  echo "== tests/engine on cuda, $dtype"
  PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=$dtype timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_model_vs_transformers.py tests/engine/test_disaggregation.py tests/engine/test_cuda_graphs.py \
    tests/engine/test_overlap.py tests/engine/test_sampler.py tests/engine/test_penalties_runner.py 2>&1 | tail -25
done
echo "== tests/kernels on cuda"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -15
} > "$OUT/tests.log" 2>&1
grep -E "passed|failed|error|==" "$OUT/tests.log"
cat "$OUT/$name.md"
