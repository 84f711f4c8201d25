#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (the device tool allows 10 minutes a
# command): the GPU tests, then the GPU benchmarks. Results land in $SPARSEC_RESULTS_DIR (the device
# tool's $OUT when set), to be committed under bench/results/.
#   device run:  bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export SPARSEC_RESULTS_DIR="${OUT:-bench/results}" SPARSEC_CACHE_DIR="${SPARSEC_CACHE_DIR:-/tmp/sparsec-cache}"
export TRITON_DEFAULT_FP_FUSION=1
PY=python3
# The GPU image brings its own torch / triton (no network there): install sparsec editable, without
# dependencies or build isolation, so nothing of the image changes.
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 \
  || $PY -m pip install -q --user --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY -c "import sparsec, torch, triton; print('sparsec', sparsec.__version__, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 200 $PY -m pytest -q -x tests/test_codegen.py tests/test_condensed_layer.py tests/test_training.py -p no:cacheprovider 2>&1 | tail -15
timeout 150 $PY bench/bench_sparse24.py --quick
timeout 120 $PY bench/bench_condensed_gpu.py
timeout 120 $PY bench/bench_training.py
