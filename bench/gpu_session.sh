#!/usr/bin/env bash
# What a session with a lent GPU runs. The device tool allows 10 minutes a command, so the work
# comes in parts, and the parts of one call share a deadline ($SPARSEC_GPU_CALL_S seconds, default
# 570, from the start of this script): each benchmark gets what is left as its budget, starts no new
# row past it and records the rows it skipped; a part that would start with under 40 s left is
# skipped whole. Results land in $SPARSEC_RESULTS_DIR (the device tool's $OUT when set), to be
# committed under bench/results/ with the device name and date.
#   device run 1:  bash bench/gpu_session.sh decode tests
#   device run 2:  bash bench/gpu_session.sh decode-compile overhead large conv training condensed
# (parts: tests, quick, decode (sparse24 at M = 1, 16), large (sparse24 at M = 128, 2048, 8192), sparse24
#  (every M, both weight formats), sparse24-fp16, sparse24-int8, decode-compile, conv, training, condensed,
#  overhead, unstructured (method (d): the direct sparse conv kernel vs cuDNN and cuSPARSE CSR vs cuBLAS,
#  bench_unstructured.py's GPU part), ncu (Nsight Compute on the decode kernel, where the image has it))
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$(( $(date +%s) + ${SPARSEC_GPU_CALL_S:-570} ))
export SPARSEC_RESULTS_DIR="${OUT:-bench/results}" SPARSEC_CACHE_DIR="${SPARSEC_CACHE_DIR:-/tmp/sparsec-cache}"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
mkdir -p "$SPARSEC_RESULTS_DIR"
PY=python3
# The GPU image brings its own torch / triton (no network there): install sparsec editable, without
# dependencies or build isolation, so nothing of the image changes.
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 \
  || $PY -m pip install -q --user --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY -c "import sparsec, torch, triton; print('sparsec', sparsec.__version__, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv 2>&1 | tail -2
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests quick)
for part in "${parts[@]}"; do
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 40 ]; then echo "=== $part: skipped, ${left} s left of this call"; continue; fi
  budget=$(( left - 75 > 10 ? left - 75 : 10 ))  # the row in flight when the budget runs out must still finish
  echo "=== $part (${left} s left)"
  case "$part" in
    # (no -x: a failure must not hide the rest; -rfE lists every failure at the end; 12 workers compile
    # kernels in parallel: on 2026-11-24 the list took 276 s that way, and 8 workers ran out of 240 s.
    # The sm_80 / sm_90 build matrix is CPU CI's job.)
    tests)         timeout $(( left < 330 ? left : 330 )) $PY -m pytest -q -rfE -n 12 --dist loadfile -p no:cacheprovider \
                     tests/test_prmt_expand.py tests/test_codegen.py tests/test_condensed_layer.py tests/test_training.py \
                     tests/test_bench.py tests/test_triton_conv.py tests/test_layer_forms.py tests/test_weight_forms.py \
                     tests/test_serialization.py tests/test_direct_launch.py tests/test_sdgp.py tests/test_torch_compile.py tests/test_direct_conv.py -k "not builds_for_sm80_and_sm90 and not build_check_sees" \
                     > "$SPARSEC_RESULTS_DIR/tests.log" 2>&1
                   echo "pytest exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$SPARSEC_RESULTS_DIR/tests.log" | tail -25 ;;
    quick)         timeout "$left" $PY bench/bench_sparse24.py --quick --budget-s "$budget" ;;
    decode)        timeout "$left" $PY bench/bench_sparse24.py --ms 1,16 --budget-s "$budget" ;;
    large)         timeout "$left" $PY bench/bench_sparse24.py --ms 128,2048,8192 --budget-s "$budget" ;;
    sparse24)      timeout "$left" $PY bench/bench_sparse24.py --budget-s "$budget" ;;
    sparse24-fp16) timeout "$left" $PY bench/bench_sparse24.py --weights fp16 --budget-s "$budget" ;;
    sparse24-int8) timeout "$left" $PY bench/bench_sparse24.py --weights int8 --budget-s "$budget" ;;
    decode-compile) timeout "$left" $PY bench/bench_decode_compile.py ;;
    conv)          timeout "$left" $PY bench/bench_conv24.py --budget-s "$budget" ;;
    training)      timeout "$left" $PY bench/bench_training.py ;;
    condensed)     timeout "$left" $PY bench/bench_condensed_gpu.py ;;
    overhead)      timeout "$left" $PY bench/bench_call_overhead.py ;;
    unstructured)  timeout "$left" $PY bench/bench_unstructured.py --parts gpu --budget-s "$budget" ;;
    # Nsight Compute on the decode kernel (bench/profile_decode.py): stall reasons, occupancy, memory
    # throughput of each config at 1 x 14336 x 4096; the whole report lands in ncu-decode.txt.
    ncu)           NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
                   if [ -z "$NCU" ]; then echo "no ncu on this image (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute)"
                   else
                     timeout "$left" "$NCU" --target-processes all -k regex:sparse24 --section SpeedOfLight --section Occupancy \
                       --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
                       $PY bench/profile_decode.py > "$SPARSEC_RESULTS_DIR/ncu-decode.txt" 2>&1
                     echo "ncu exit $?"
                     grep -E "==ERROR==|==WARNING==|launch order|^  [0-9]+: |sparse24|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Stall|Issued Warp|No Eligible|DRAM Throughput|Memory Throughput" \
                       "$SPARSEC_RESULTS_DIR/ncu-decode.txt" | head -200
                   fi ;;
    *) echo "unknown part '$part' (tests, quick, decode, large, sparse24, sparse24-fp16, sparse24-int8, decode-compile,"\
            "conv, training, condensed, overhead, unstructured, ncu)"
       exit 2 ;;
  esac
done
