// Stage B: the fused merge kernel (one pass, grid-stride, 16-byte vector loads) and its launcher.
//
// Instantiations: exact N = 1..4 with one input dtype shared by base and models (8 elements
// per thread and chunk, every load of a chunk issued up front); anything else (N up to 16,
// or mixed input dtypes) goes to the generic kernel (NMAX = 16, guarded loops, 4 elements,
// runtime dtype switch per load). Sum and mean share a kernel (the final division and the
// per-group coefficients are uniform branches), TIES, RAM and NEARSWAP (one model) have their own;
// the round-2 pieces (a.ext) have their own sum / mean and TIES kernels (and a generic RAM one), so the
// kernels without them keep their code and registers;
// the output dtype is a runtime switch at the store. emulate_merge runs the same dispatch
// and chunk code on the host.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launch.h"
#include "launch_util.cuh"
#include "merge_element.cuh"

namespace m3k {
namespace {

constexpr int kMergeThreads = 256;

template <int NMAX, bool EXACT, int EPT, int C, int DT, bool EXT>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const __grid_constant__ MergeArgs a) {
    const int64_t nchunks = (a.numel + EPT - 1) / EPT;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks; c += stride)
        merge_chunk<NMAX, EXACT, EPT, C, DT, EXT>(a, c);
}

template <int V>
using Int = std::integral_constant<int, V>;

// The input dtype shared by the base (if used) and every model, or -1 when they differ.
inline int uniform_dtype(const MergeArgs& a) {
    int dt = a.model_dtype[0];
    for (int i = 1; i < a.n; ++i)
        if (a.model_dtype[i] != dt) return -1;
    if (a.has_base && a.base_dtype != dt) return -1;
    return dt;
}

// Call f(Int<NMAX>, std::bool_constant<EXACT>, Int<EPT>, Int<C>, Int<DT>, std::bool_constant<EXT>) for
// the kernel configuration of `a`. EXT (a.ext: a round-2 piece is on) has its own sum / mean and TIES
// kernels; RAM with EXT runs in the generic kernel only (with_merge_config routes it there).
template <int NMAX, bool EXACT, int EPT, int DT, class F>
void with_combine(const MergeArgs& a, F&& f) {
    using E = std::true_type;
    using P = std::false_type;
    const auto nm = Int<NMAX>{};
    const auto ex = std::bool_constant<EXACT>{};
    const auto ept = Int<EPT>{};
    const auto dt = Int<DT>{};
    switch (a.combine) {
        case kSum:
        case kMean:
            return a.ext ? f(nm, ex, ept, Int<kSum>{}, dt, E{}) : f(nm, ex, ept, Int<kSum>{}, dt, P{});
        case kTies:
            return a.ext ? f(nm, ex, ept, Int<kTies>{}, dt, E{}) : f(nm, ex, ept, Int<kTies>{}, dt, P{});
        case kRam:
            if constexpr (!EXACT) {
                if (a.ext) return f(nm, ex, ept, Int<kRam>{}, dt, E{});
            }
            if (!a.ext) return f(nm, ex, ept, Int<kRam>{}, dt, P{});
            break;
        case kNearswap:
            // n == 1 (checked when the arguments are parsed): only the one-model kernels exist.
            if constexpr (NMAX == 1 || !EXACT) return f(nm, ex, ept, Int<kNearswap>{}, dt, P{});
            break;
    }
    throw std::invalid_argument("m3kernels CUDA merge: combine code must be 0..4 (nearswap: one model)");
}

template <int NMAX, bool EXACT, int EPT, class F>
void with_dtype(const MergeArgs& a, int dt, F&& f) {
    switch (dt) {
        case kF32:
            return with_combine<NMAX, EXACT, EPT, kF32>(a, f);
        case kBF16:
            return with_combine<NMAX, EXACT, EPT, kBF16>(a, f);
        default:
            return with_combine<NMAX, EXACT, EPT, kF16>(a, f);
    }
}

template <class F>
void with_merge_config(const MergeArgs& a, F&& f) {
    const int dt = uniform_dtype(a);
    if (dt >= 0 && !(a.ext && a.combine == kRam)) {
        switch (a.n) {
            case 1:
                return with_dtype<1, true, 8>(a, dt, f);
            case 2:
                return with_dtype<2, true, 8>(a, dt, f);
            case 3:
                return with_dtype<3, true, 8>(a, dt, f);
            case 4:
                return with_dtype<4, true, 8>(a, dt, f);
            default:
                break;
        }
    }
    return with_combine<kMaxModels, false, 4, -1>(a, f);
}

}  // namespace

void launch_merge(const MergeArgs& a, int device, uintptr_t stream) {
    if (a.numel <= 0) return;
    if (a.tie_rule) return launch_merge_ties(a, device, stream);
    use_device(device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    with_merge_config(a, [&](auto nmax, auto exact, auto ept, auto comb, auto dt, auto ext) {
        constexpr int EPT = decltype(ept)::value;
        auto kernel = merge_kernel<decltype(nmax)::value, decltype(exact)::value, EPT, decltype(comb)::value,
                                   decltype(dt)::value, decltype(ext)::value>;
        const int64_t chunks = (a.numel + EPT - 1) / EPT;
        const int64_t work = (chunks + kMergeThreads - 1) / kMergeThreads;
        const unsigned grid =
            grid_size(reinterpret_cast<const void*>(kernel), device, kMergeThreads, 0, work);
        kernel<<<grid, kMergeThreads, 0, s>>>(a);
        check_cuda(cudaGetLastError(), "merge kernel launch");
    });
}

void emulate_merge(const MergeArgs& a) {
    if (a.numel <= 0) return;
    if (a.tie_rule) return emulate_merge_ties(a);
    with_merge_config(a, [&](auto nmax, auto exact, auto ept, auto comb, auto dt, auto ext) {
        constexpr int EPT = decltype(ept)::value;
        const int64_t chunks = (a.numel + EPT - 1) / EPT;
        for (int64_t c = 0; c < chunks; ++c)
            merge_chunk<decltype(nmax)::value, decltype(exact)::value, EPT, decltype(comb)::value,
                        decltype(dt)::value, decltype(ext)::value>(a, c);
    });
}

}  // namespace m3k
