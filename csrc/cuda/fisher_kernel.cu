// Fisher stage B on the GPU (docs/DATA_AWARE.md, "Fisher in the fused kernel"): one grid-stride pass
// over chunks of kFisherEpt elements, 2N + 1 streams (N models, N Fisher tensors, the output).
//
// Per element, in float32, every operation one __f*_rn intrinsic (never contracted; the host
// emulation uses plain operators, x86-64 SSE), in the documented order:
//   num = den = avg = 0; for i: f = f32(F_i); f = mode 0 ? (f < floor ? floor : f) : f + floor;
//   cf = coef_i * f; num = num + cf * x_i; den = den + cf; avg = avg + coef_i * x_i
//   y = den != 0 ? num / den : avg / coef_sum
// then store_chunk's NaN canonicalisation and RNE cast (chunk_io.cuh): the same bits as the CPU
// and Triton kernels. Chunks use 16-byte loads when every pointer is 16-byte aligned and the chunk is
// whole. emulate_fisher runs the same chunk code on host pointers (tests without a GPU).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "chunk_io.cuh"
#include "launch_util.cuh"
#include "m3k_common.cuh"
#include "merge_args.h"

namespace m3k {
namespace {

constexpr int kFisherEpt = 8;
constexpr int kFisherThreads = 256;

struct FisherArgs {
    const void* models[kMaxModels];
    const void* stats[kMaxModels];
    int32_t model_dtype[kMaxModels];
    int32_t stat_dtype[kMaxModels];
    float coef[kMaxModels];
    int32_t n;
    float coef_sum;
    float floor;
    int32_t floor_mode;  // 0: max(F, floor); 1: F + floor
    int32_t aligned;
    int32_t out_dtype;
    int64_t numel;
    void* out;
};

M3K_HD void fisher_chunk(const FisherArgs& a, int64_t c) {
    constexpr int E = kFisherEpt;
    const int64_t j0 = c * E;
    const bool vec = a.aligned && j0 + E <= a.numel;
    float num[E], den[E], avg[E];
#pragma unroll
    for (int k = 0; k < E; ++k) num[k] = den[k] = avg[k] = 0.0f;
    for (int i = 0; i < a.n; ++i) {
        float f[E], x[E];
        load_chunk<E, -1>(a.stats[i], a.stat_dtype[i], j0, a.numel, vec, f);
        load_chunk<E, -1>(a.models[i], a.model_dtype[i], j0, a.numel, vec, x);
        const float ci = a.coef[i];
#pragma unroll
        for (int k = 0; k < E; ++k) {
            float fk = f[k];
            fk = a.floor_mode == 0 ? (fk < a.floor ? a.floor : fk) : fadd(fk, a.floor);  // NaN stays NaN
            const float cf = fmul(ci, fk);
            num[k] = fadd(num[k], fmul(cf, x[k]));
            den[k] = fadd(den[k], cf);
            avg[k] = fadd(avg[k], fmul(ci, x[k]));
        }
    }
    float y[E];
#pragma unroll
    for (int k = 0; k < E; ++k) y[k] = den[k] != 0.0f ? fdiv(num[k], den[k]) : fdiv(avg[k], a.coef_sum);
    store_chunk<E>(a.out, a.out_dtype, j0, a.numel, vec, y);
}

__global__ void __launch_bounds__(kFisherThreads) fisher_kernel(const __grid_constant__ FisherArgs a) {
    const int64_t nchunks = (a.numel + kFisherEpt - 1) / kFisherEpt;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks; c += stride)
        fisher_chunk(a, c);
}

int32_t dtype_code(int code, const char* what) {
    if (code < 0 || code > 2)
        throw std::invalid_argument(std::string("m3kernels CUDA fisher: ") + what +
                                    " dtype code must be 0, 1 or 2");
    return code;
}

FisherArgs make_args(int n, const uintptr_t* models, const int* model_dtypes, const uintptr_t* stats,
                     const int* stat_dtypes, const float* coef, float coef_sum, float floor, int floor_mode,
                     int64_t numel, uintptr_t out, int out_dtype) {
    if (n < 1 || n > kMaxModels)
        throw std::invalid_argument("m3kernels CUDA fisher: the number of models must be between 1 and " +
                                    std::to_string(kMaxModels) + ", got " + std::to_string(n));
    if (floor_mode != 0 && floor_mode != 1)
        throw std::invalid_argument("m3kernels CUDA fisher: floor_mode must be 0 (max) or 1 (add)");
    if (numel < 0) throw std::invalid_argument("m3kernels CUDA fisher: numel must be >= 0");
    FisherArgs a{};
    bool aligned = out % 16 == 0;
    for (int i = 0; i < n; ++i) {
        if (numel > 0 && (models[i] == 0 || stats[i] == 0))
            throw std::invalid_argument("m3kernels CUDA fisher: null pointer");
        a.models[i] = reinterpret_cast<const void*>(models[i]);
        a.stats[i] = reinterpret_cast<const void*>(stats[i]);
        a.model_dtype[i] = dtype_code(model_dtypes[i], "model");
        a.stat_dtype[i] = dtype_code(stat_dtypes[i], "statistics");
        a.coef[i] = coef[i];
        aligned = aligned && models[i] % 16 == 0 && stats[i] % 16 == 0;
    }
    if (numel > 0 && out == 0) throw std::invalid_argument("m3kernels CUDA fisher: null out pointer");
    a.n = n;
    a.coef_sum = coef_sum;
    a.floor = floor;
    a.floor_mode = floor_mode;
    a.aligned = aligned ? 1 : 0;
    a.out_dtype = dtype_code(out_dtype, "out");
    a.numel = numel;
    a.out = reinterpret_cast<void*>(out);
    return a;
}

}  // namespace

void launch_fisher(int n, const uintptr_t* models, const int* model_dtypes, const uintptr_t* stats,
                   const int* stat_dtypes, const float* coef, float coef_sum, float floor, int floor_mode,
                   int64_t numel, uintptr_t out, int out_dtype, int device, uintptr_t stream) {
    const FisherArgs a = make_args(n, models, model_dtypes, stats, stat_dtypes, coef, coef_sum, floor,
                                   floor_mode, numel, out, out_dtype);
    if (numel == 0) return;
    use_device(device);
    const int64_t chunks = (numel + kFisherEpt - 1) / kFisherEpt;
    const int64_t work = (chunks + kFisherThreads - 1) / kFisherThreads;
    const unsigned grid =
        grid_size(reinterpret_cast<const void*>(fisher_kernel), device, kFisherThreads, 0, work);
    fisher_kernel<<<grid, kFisherThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    check_cuda(cudaGetLastError(), "fisher kernel launch");
}

void emulate_fisher(int n, const uintptr_t* models, const int* model_dtypes, const uintptr_t* stats,
                    const int* stat_dtypes, const float* coef, float coef_sum, float floor, int floor_mode,
                    int64_t numel, uintptr_t out, int out_dtype) {
    const FisherArgs a = make_args(n, models, model_dtypes, stats, stat_dtypes, coef, coef_sum, floor,
                                   floor_mode, numel, out, out_dtype);
    const int64_t chunks = (numel + kFisherEpt - 1) / kFisherEpt;
    for (int64_t c = 0; c < chunks; ++c) fisher_chunk(a, c);
}

}  // namespace m3k
