#!/bin/bash
# One device call for the serving pipeline on a GPU. Run from the repo root on the device
# machine with .carry carried (Ray's site from ../shared/tools/gpu-site, tokenizer files):
#   bash benchmarks/gpu_run.sh [handoff] [handoff_profile] [pipeline] [ipc_tests] [bench] [overlap] [plane] [plane_si4] [plane_all] [serving8b] [serving8b_1p1d] [diagnose8b]  (one GPU)
#   bash benchmarks/gpu_run.sh [nccl_tests] [pipeline2] [handoff2] [goodput2]     (two GPUs)
set -u
export PYTHONUNBUFFERED=1
# Never NVLink multicast on a shared host (the device docs say why); Ray's workers inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
tar xJf .carry/site.tar.xz -C /tmp
mkdir -p /tmp/pd/pdserve
for d in engine prefill_worker decode_worker router cluster protos; do ln -sfn "$PWD/$d" /tmp/pd/pdserve/$d; done
export PYTHONPATH=/tmp/site:/tmp/pd:$PWD/tests
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
[ "$(nvidia-smi -L | wc -l)" -gt 1 ] && nvidia-smi topo -m
nccl_paths() { grep -h -o -E "via (P2P|SHM|NET)[^ ]*" "$@" | sort | uniq -c; }  # NCCL_DEBUG=INFO's transports
then_keep_rc() { local rc=$?; "$@"; return $rc; }  # run a follow-up; the step's exit stays the benchmark's
for step in "$@"; do
  case $step in
    handoff) timeout 200 python3 benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 512,2048,8192 \
               --repeats 5 --out "$OUT/handoff_h100.md" > "$OUT/handoff.log" 2>&1 ;;
    handoff_profile) timeout 130 python3 benchmarks/handoff.py --device cuda --shape llama3-8b --lengths 128,2048 \
               --repeats 3 --sample-stacks "$OUT/prefill_stacks.txt" --out "$OUT/handoff_profile.md" > "$OUT/handoff_profile.log" 2>&1 ;;
    pipeline) timeout ${PIPELINE_S:-280} python3 benchmarks/gpu_pipeline.py .carry/tokenizer "$OUT" > "$OUT/pipeline.log" 2>&1 ;;
    ipc_tests) timeout 120 python3 -m pytest -q -p no:cacheprovider tests/transfer > "$OUT/ipc_tests.log" 2>&1 ;;
    bench) timeout 420 python3 benchmarks/gpu_bench.py .carry/tokenizer "$OUT" > "$OUT/bench.log" 2>&1 ;;
    plane) timeout 560 python3 benchmarks/serving_plane.py .carry/tokenizer "$OUT" --parts plane --routers 1,2,4 --stream-intervals 1 --seconds 8 > "$OUT/plane.log" 2>&1 ;;
    plane_si4) timeout 400 python3 benchmarks/serving_plane.py .carry/tokenizer "$OUT" --parts plane --routers 1,2 \
               --stream-intervals 4 --seconds 8 > "$OUT/plane_si4.log" 2>&1 ;;
    plane_all) timeout 570 python3 benchmarks/serving_plane.py .carry/tokenizer "$OUT" --parts plane --routers 1,2,4 \
               --stream-intervals 1,4 --seconds 8 > "$OUT/plane_all.log" 2>&1 ;;
    serving8b) timeout ${SERVING8B_S:-560} python3 benchmarks/serving_plane.py .carry/tokenizer "$OUT" --parts 8b > "$OUT/serving8b.log" 2>&1 ;;
    serving8b_1p1d) timeout ${SERVING8B_1P1D_S:-$((540 - SECONDS))} python3 benchmarks/serving_plane.py .carry/tokenizer "$OUT" --parts 8b --deployments 1P1D \
               > "$OUT/serving8b_1p1d.log" 2>&1 ;;
    diagnose8b) timeout ${DIAGNOSE8B_S:-450} python3 benchmarks/diagnose_h200.py .carry/tokenizer "$OUT" > "$OUT/diagnose8b.log" 2>&1
               then_keep_rc cat "$OUT/diagnose_h200.md" ;;
    cuda_tests) PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 timeout 150 python3 -m pytest -q -p no:cacheprovider \
               tests/engine/test_model_vs_transformers.py tests/engine/test_cuda_graphs.py tests/engine/test_overlap.py \
               tests/engine/test_fp8_kv.py tests/kernels/test_fp8_gemm.py tests/engine/test_fp8_checkpoint.py \
               tests/engine/test_penalties_runner.py \
               > "$OUT/cuda_tests.log" 2>&1 ;;
    moe) timeout 200 python3 benchmarks/moe_kernel.py --out "$OUT" --sweep > "$OUT/moe.log" 2>&1 ;;
    overlap) timeout 560 python3 benchmarks/gpu_overlap.py .carry/tokenizer "$OUT" > "$OUT/overlap.log" 2>&1 ;;
    nccl_tests) timeout 90 python3 -m pytest -q -p no:cacheprovider tests/transfer/test_nccl.py \
               tests/transfer/test_cuda_ipc.py > "$OUT/nccl_tests.log" 2>&1 ;;
    pipeline2) NCCL_DEBUG=INFO timeout 200 python3 benchmarks/gpu_pipeline.py .carry/tokenizer "$OUT" --two-gpus \
               > "$OUT/pipeline2.log" 2>&1
               then_keep_rc nccl_paths /tmp/pdserve-e2e-*.log ;;
    handoff2) NCCL_DEBUG=INFO timeout 240 python3 benchmarks/handoff.py --device cuda --shape llama3-8b \
               --lengths 512,2048,8192 --repeats 5 --backend nccl --out "$OUT/handoff_nccl.md" > "$OUT/handoff2.log" 2>&1
               then_keep_rc nccl_paths "$OUT/handoff2.log" ;;
    handoff2i) NCCL_DEBUG=INFO timeout 150 python3 benchmarks/handoff.py --device cuda --shape llama3-8b \
               --lengths 512,2048,8192 --repeats 3 --backend nccl --isolate --out "$OUT/handoff_nccl_isolated.md" \
               > "$OUT/handoff2i.log" 2>&1
               then_keep_rc nccl_paths "$OUT/handoff2i.log" ;;
    goodput2b) mkdir -p /tmp/goodputb && timeout $((440 - SECONDS)) python3 benchmarks/gpu2_goodput.py .carry/tokenizer \
               /tmp/goodputb --only 1p1d --requests 60 > "$OUT/goodput2b.log" 2>&1
               then_keep_rc tar czf "$OUT/goodput2b.tgz" -C /tmp/goodputb . ;;
    goodput2)  # runs on in its own session; a later call with the same step waits for it again
      if [ ! -e /tmp/goodput/started ]; then
        mkdir -p /tmp/goodput && touch /tmp/goodput/started
        setsid nohup bash -c "python3 benchmarks/gpu2_goodput.py .carry/tokenizer /tmp/goodput; touch /tmp/goodput/done" \
          > /tmp/goodput/run.log 2>&1 &
      fi
      timeout $((570 - SECONDS)) bash -c 'until [ -e /tmp/goodput/done ]; do sleep 5; done'
      cp /tmp/goodput/run.log "$OUT/goodput2.log"; tar czf "$OUT/goodput2.tgz" -C /tmp/goodput . ;;
  esac
  echo "$step exit $?"; tail -12 "$OUT/$step.log"
done
