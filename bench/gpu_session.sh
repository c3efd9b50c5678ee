#!/usr/bin/env bash
# Everything that needs the lent GPU, in two device calls of < 10 minutes each:
#   bench/gpu_session.sh test    build for the GPU, GPU tests, compute-sanitizer
#   bench/gpu_session.sh bench   bench/bench_gpu.py and bench/bench_gpu_pipeline.py
# Results go to $OUT (the device tool brings them back): at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
phase=${1:-test}

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
echo "== build" > "$OUT/$phase.log"
M3KERNELS_BUILD_CUDA=1 M3KERNELS_CUDA_ARCHS="${M3KERNELS_CUDA_ARCHS:-90}" \
  $PY setup.py build_ext --inplace >> "$OUT/$phase.log" 2>&1 || { echo "BUILD FAILED" >> "$OUT/$phase.log"; exit 1; }
$PY -c "import m3kernels; print(m3kernels.available_backends())" >> "$OUT/$phase.log" 2>&1

if [ "$phase" = test ]; then
  echo "== GPU tests" >> "$OUT/$phase.log"
  timeout 330 $PY -m pytest tests/test_gpu_backends.py tests/test_triton_backend.py tests/test_merge_tensors.py \
    -q -p no:cacheprovider -x >> "$OUT/$phase.log" 2>&1; echo "pytest rc=$?" >> "$OUT/$phase.log"
  echo "== compute-sanitizer" > "$OUT/sanitizer.log"
  for tool in memcheck racecheck initcheck synccheck; do
    small=""; [ "$tool" = memcheck ] || small="--small"
    timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 $PY tests/cuda_sanitize_driver.py $small \
      >> "$OUT/sanitizer.log" 2>&1; echo "$tool rc=$?" >> "$OUT/sanitizer.log"
  done
else
  timeout 200 $PY bench/bench_gpu.py --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
  echo "bench_gpu rc=$?" >> "$OUT/$phase.log"
  timeout 300 $PY bench/bench_gpu_pipeline.py --json "$OUT/bench_gpu_pipeline.json" > "$OUT/bench_gpu_pipeline.txt" 2>&1
  echo "bench_gpu_pipeline rc=$?" >> "$OUT/$phase.log"
fi
tail -3 "$OUT/$phase.log"
