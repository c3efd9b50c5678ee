#!/usr/bin/env bash
# Everything that needs the lent GPU, in device calls of < 10 minutes each:
#   bench/gpu_session.sh test      build for the GPU, GPU tests, compute-sanitizer
#   bench/gpu_session.sh bench     bench/bench_gpu.py and bench/bench_gpu_pipeline.py
#   bench/gpu_session.sh features  the issue-8 pieces (trim window, group coefficients, nearswap, ram, gram,
#                                  ram_counts, exact-k ties) and the round-2 pieces (V1..V7): their tests,
#                                  compute-sanitizer, timings (< 9 min)
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

features_tests() {  # the issue-8 kernel pieces on the GPU (both backends, launched kernels vs emulation)
  echo "== issue-8 kernel pieces (trim window, group coefficients, nearswap, ram, gram, ram_counts, ties)" >> "$OUT/$phase.log"
  timeout 200 $PY -m pytest tests/test_kernel_features.py tests/test_kernel_features_gpu.py \
    -q -p no:cacheprovider -x >> "$OUT/$phase.log" 2>&1; echo "features pytest rc=$?" >> "$OUT/$phase.log"
  echo "== round-2 kernel pieces (keep mask, den_floor, agree_w, fma, count vote / divisor, dare_div)" >> "$OUT/$phase.log"
  # the launched kernels vs the emulation, and the methods end to end (the interpreter-sized cases of
  # this file would compile a Triton kernel per variant: they run without a GPU)
  timeout 120 $PY -m pytest tests/test_gpu_kernel_v2.py -k "gpu_ or methods_on" -q -p no:cacheprovider -x \
    >> "$OUT/$phase.log" 2>&1
  echo "round-2 pytest rc=$?" >> "$OUT/$phase.log"
}

features_sanitizer() {  # the issue-8 kernels (merge combines, gram, ram_counts) on small sizes
  for tool in memcheck racecheck; do
    M3K_SANITIZE_SMALL=1 timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest \
      tests/test_kernel_features_gpu.py tests/test_gpu_kernel_v2.py -k "gpu_" -q -p no:cacheprovider \
      >> "$OUT/sanitizer.log" 2>&1
    echo "features $tool rc=$?" >> "$OUT/sanitizer.log"
  done
}

features_timing() {  # stage B (group coefficients, ram, nearswap) and stage A (gram, ram_counts) times
  timeout 90 $PY - > "$OUT/features_gpu.txt" 2>&1 <<'PYEOF'
import time, numpy as np, torch
from m3kernels.merge.kernel_params import make_params
from m3kernels.merge.recipe import make_recipe
from m3kernels.backends import cuda, triton
rows, cols, n = 4096, 14336, 2
g = torch.Generator(device="cuda").manual_seed(0)
base = torch.randn(rows, cols, device="cuda", generator=g).to(torch.bfloat16)
models = [(base.float() + 0.01 * torch.randn(rows, cols, device="cuda", generator=g)).to(torch.bfloat16) for _ in range(n)]
out = torch.empty_like(base)
def p(k, **f):
    q = make_params(make_recipe(k, has_base=True, method="task_arithmetic"), "w", True)
    return q.with_fields(**f)
gc = np.full(rows * n, 0.5, np.float32)
cases = {
    "sum": (p(n), n), "group_row": (p(n, coef_group=1, row_len=cols, group_coef=gc), n),
    "ram": (p(n, combine=4, ram_eps=1e-5), n), "nearswap": (p(1, combine=3, clip_t=0.01), 1),
}
def pt(**f):  # round 2 (docs/KERNEL.md V1..V7): TIES with negative weights, fma, keep mask
    q = make_params(make_recipe(n, has_base=True, method="ties", weights=[1.0, -0.5]), "w", True)
    return q.with_fields(**f)
mask = np.random.default_rng(0).integers(0, 256, (n, (base.numel() + 7) // 8), dtype=np.uint8)  # ~50 % kept
cases |= {
    "ties": (pt(agree_w=None), n), "ties_agree": (pt(), n), "ties_v2": (pt(den_floor=1e-6), n),
    "ties_count": (pt(vote_kind=1, ties_div=1), n), "sum_fma": (p(n, fma=True), n),
    "ties_mask": (pt(keep_mask=mask.reshape(-1), mask_stride=mask.shape[1], mask_scale=[2.0] * n), n),
}
gbytes = base.numel() * 2 * (n + 2) / 1e9
def timed(fn, reps=5):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps
print(torch.cuda.get_device_name(), f"{rows}x{cols} bf16, n={n} (ties_mask: includes the mask's upload)")
for name, be in (("cuda", cuda), ("triton", triton)):
    for case, (q, k) in cases.items():
        s = timed(lambda: be.merge(q, base, models[:k], out))
        print(f"{name:6s} merge {case:10s} {s * 1e3:8.3f} ms  ~{base.numel() * 2 * (k + 2) / s / 1e9:7.1f} GB/s")
    for group, rl in ((0, 1), (1, cols), (2, cols)):
        q = p(n, coef_group=group, row_len=rl)
        s = timed(lambda: be.gram(q, base, models), reps=2)
        print(f"{name:6s} gram group={group}      {s * 1e3:8.3f} ms  ~{gbytes * n / (n + 2) / s:7.1f} GB/s of inputs")
    q = p(n, combine=4, ram_eps=1e-5)
    print(f"{name:6s} ram_counts          {timed(lambda: be.ram_counts(q, base, models), reps=2) * 1e3:8.3f} ms")
PYEOF
  echo "features timing rc=$?" >> "$OUT/$phase.log"
}

if [ "$phase" = test ]; then
  echo "== GPU tests" >> "$OUT/$phase.log"
  timeout 330 $PY -m pytest tests/test_gpu_backends.py tests/test_triton_backend.py tests/test_merge_tensors.py \
    tests/test_fisher_kernel.py \
    -q -p no:cacheprovider -x >> "$OUT/$phase.log" 2>&1; echo "pytest rc=$?" >> "$OUT/$phase.log"
  echo "== compute-sanitizer" > "$OUT/sanitizer.log"
  for tool in memcheck racecheck initcheck synccheck; do
    small=""; [ "$tool" = memcheck ] || small="--small"
    timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 $PY tests/cuda_sanitize_driver.py $small \
      >> "$OUT/sanitizer.log" 2>&1; echo "$tool rc=$?" >> "$OUT/sanitizer.log"
  done
elif [ "$phase" = features ]; then
  echo "== compute-sanitizer (issue-8 kernels)" > "$OUT/sanitizer.log"
  features_tests
  features_sanitizer
  features_timing
else
  timeout 200 $PY bench/bench_gpu.py --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
  echo "bench_gpu rc=$?" >> "$OUT/$phase.log"
  timeout 300 $PY bench/bench_gpu_pipeline.py --json "$OUT/bench_gpu_pipeline.json" > "$OUT/bench_gpu_pipeline.txt" 2>&1
  echo "bench_gpu_pipeline rc=$?" >> "$OUT/$phase.log"
fi
tail -3 "$OUT/$phase.log"
