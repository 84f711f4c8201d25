#!/usr/bin/env bash
# What a session with a lent GPU should run. The device tool allows 10 minutes a command, so the
# work comes in parts; results land in $SPARSEC_RESULTS_DIR (the device tool's $OUT when set), to
# be committed under bench/results/ with the device name and date.
#   device run 1:  bash bench/gpu_session.sh tests quick      (GPU tests, then the 2:4 grid at M = 1, 2048)
#   device run 2:  bash bench/gpu_session.sh sparse24         (the whole 2:4 grid with the config sweep)
#   device run 3:  bash bench/gpu_session.sh training condensed conv
set -uo pipefail
cd "$(dirname "$0")/.."
export SPARSEC_RESULTS_DIR="${OUT:-bench/results}" SPARSEC_CACHE_DIR="${SPARSEC_CACHE_DIR:-/tmp/sparsec-cache}"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
PY=python3
# The GPU image brings its own torch / triton (no network there): install sparsec editable, without
# dependencies or build isolation, so nothing of the image changes.
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 \
  || $PY -m pip install -q --user --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY -c "import sparsec, torch, triton; print('sparsec', sparsec.__version__, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests quick)
for part in "${parts[@]}"; do
  case "$part" in
    # (no -x: a failure must not hide the rest; -rfE lists every failure at the end. The sm_80 / sm_90
    # build matrix is CPU CI's job: it would spend minutes of this call compiling without the GPU.)
    tests)     timeout 300 $PY -m pytest -q -rfE tests/test_prmt_expand.py tests/test_codegen.py tests/test_condensed_layer.py \
                 tests/test_training.py tests/test_bench.py tests/test_triton_conv.py -p no:cacheprovider \
                 -k "not builds_for_sm80_and_sm90 and not build_check_sees" 2>&1 | tail -40 ;;
    quick)     timeout 30 $PY bench/bench_call_overhead.py; timeout 240 $PY bench/bench_sparse24.py --quick ;;
    sparse24)  timeout 560 $PY bench/bench_sparse24.py ;;
    training)  timeout 240 $PY bench/bench_training.py ;;
    condensed) timeout 240 $PY bench/bench_condensed_gpu.py ;;
    conv)      timeout 300 $PY bench/bench_conv24.py ;;
    *) echo "unknown part '$part' (tests, quick, sparse24, training, condensed, conv)"; exit 2 ;;
  esac
done
