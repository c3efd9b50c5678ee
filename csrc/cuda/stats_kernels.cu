// Stage A kernels: radix-select histograms, L1 partial sums and RAM counts, with launchers and host
// emulation.
//
// Pass-1 histograms use a 32768-bin uint32 sub-histogram per block in shared memory
// (128 KiB: fits the opt-in limit of sm_80 and sm_90) flushed once per block with global
// atomics; where it does not fit, and for pass 2 (which only counts the few elements in
// the prefix bin), threads add straight to the global histogram. Each thread counts runs of
// one bin in registers (hist_thread), one atomic per run.
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "launch.h"
#include "launch_util.cuh"
#include "stats_element.cuh"

namespace m3k {
namespace {

constexpr int kHistSharedThreads = 1024;
constexpr int kHistGlobalThreads = 256;
constexpr size_t kHistSharedBytes = kPass1Bins * sizeof(uint32_t);
constexpr int64_t kMaxElemsPerHistBlock = int64_t(1) << 30;  // keeps uint32 counts exact

template <int DT, bool SHARED, bool EXT>
__global__ void __launch_bounds__(1024)
    hist_kernel(const __grid_constant__ MergeArgs a, int model, int64_t prefix, unsigned long long* hist) {
    extern __shared__ uint32_t sub[];
    if constexpr (SHARED) {
        for (int t = threadIdx.x; t < kPass1Bins; t += blockDim.x) sub[t] = 0;
        __syncthreads();
    }
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    hist_thread<DT, EXT>(a, model, prefix, first, stride, [&](uint32_t bin, uint32_t count) {
        if constexpr (SHARED)
            atomicAdd(&sub[bin], count);
        else
            atomicAdd(&hist[bin], static_cast<unsigned long long>(count));
    });
    if constexpr (SHARED) {
        __syncthreads();
        for (int t = threadIdx.x; t < kPass1Bins; t += blockDim.x)
            if (sub[t]) atomicAdd(&hist[t], static_cast<unsigned long long>(sub[t]));
    }
}

template <int DT>
__global__ void __launch_bounds__(kL1Threads)
    l1_kernel(const __grid_constant__ MergeArgs a, int model, double* partials) {
    __shared__ double s_total[kL1Threads];
    __shared__ double s_kept[kL1Threads];
    const int t = threadIdx.x;
    double total, kept;
    l1_thread<DT>(a, model, blockIdx.x, t, total, kept);
    s_total[t] = total;
    s_kept[t] = kept;
    __syncthreads();
    for (int s = kL1Threads / 2; s > 0; s >>= 1) {
        if (t < s) {
            s_total[t] += s_total[t + s];
            s_kept[t] += s_kept[t + s];
        }
        __syncthreads();
    }
    if (t == 0) {
        partials[blockIdx.x] = s_total[0];
        partials[gridDim.x + blockIdx.x] = s_kept[0];
    }
}

__global__ void __launch_bounds__(256)
    ram_counts_kernel(const __grid_constant__ MergeArgs a, unsigned long long* counts) {
    __shared__ unsigned long long s_counts[2 * kMaxModels];
    const int t = threadIdx.x;
    if (t < 2 * kMaxModels) s_counts[t] = 0;
    __syncthreads();
    uint64_t shared[kMaxModels], unique[kMaxModels];
    ram_counts_thread(a, static_cast<int64_t>(blockIdx.x) * blockDim.x + t,
                      static_cast<int64_t>(gridDim.x) * blockDim.x, shared, unique);
    for (int i = 0; i < a.n; ++i) {
        if (shared[i]) atomicAdd(&s_counts[i], static_cast<unsigned long long>(shared[i]));
        if (unique[i]) atomicAdd(&s_counts[a.n + i], static_cast<unsigned long long>(unique[i]));
    }
    __syncthreads();
    if (t < 2 * a.n && s_counts[t]) atomicAdd(&counts[t], s_counts[t]);
}

// Input dtype shared by the base (if used) and model i, or -1.
int pair_dtype(const MergeArgs& a, int i) {
    if (a.has_base && a.base_dtype != a.model_dtype[i]) return -1;
    return a.model_dtype[i];
}

template <class F>
void with_dtype(int dt, F&& f) {
    switch (dt) {
        case kF32:
            return f(std::integral_constant<int, kF32>{});
        case kBF16:
            return f(std::integral_constant<int, kBF16>{});
        case kF16:
            return f(std::integral_constant<int, kF16>{});
        default:
            return f(std::integral_constant<int, -1>{});
    }
}

// with_dtype, and f's second argument std::bool_constant<ext> (the histograms' EXT kernels).
template <class F>
void with_dtype_ext(int dt, bool ext, F&& f) {
    with_dtype(dt, [&](auto d) {
        if (ext)
            f(d, std::true_type{});
        else
            f(d, std::false_type{});
    });
}

void check_model(const MergeArgs& a, int model) {
    if (model < 0 || model >= a.n) throw std::invalid_argument("m3kernels CUDA: model index out of range");
}

bool shared_pass1_fits(int device) {
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "shared memory limit");
    return static_cast<size_t>(optin) >= kHistSharedBytes;
}

}  // namespace

void launch_histogram(const MergeArgs& a, int model, int64_t prefix, uint64_t* hist, int device,
                      uintptr_t stream) {
    check_model(a, model);
    if (a.numel <= 0) return;
    use_device(device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    auto* h = reinterpret_cast<unsigned long long*>(hist);
    const int64_t nchunks = (a.numel + kHistEPT - 1) / kHistEPT;
    const int64_t min_grid = (a.numel + kMaxElemsPerHistBlock - 1) / kMaxElemsPerHistBlock;
    const bool shared = prefix < 0 && shared_pass1_fits(device);
    with_dtype_ext(pair_dtype(a, model), a.ext_delta != 0, [&](auto dt, auto ext) {
        constexpr int DT = decltype(dt)::value;
        constexpr bool EXT = decltype(ext)::value;
        if (shared) {
            auto kernel = hist_kernel<DT, true, EXT>;
            check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kHistSharedBytes)),
                       "histogram shared memory");
            const int64_t work = (nchunks + kHistSharedThreads - 1) / kHistSharedThreads;
            unsigned grid = grid_size(reinterpret_cast<const void*>(kernel), device, kHistSharedThreads,
                                      kHistSharedBytes, work);
            if (grid < min_grid) grid = static_cast<unsigned>(min_grid);
            kernel<<<grid, kHistSharedThreads, kHistSharedBytes, s>>>(a, model, prefix, h);
        } else {
            auto kernel = hist_kernel<DT, false, EXT>;
            const int64_t work = (nchunks + kHistGlobalThreads - 1) / kHistGlobalThreads;
            unsigned grid =
                grid_size(reinterpret_cast<const void*>(kernel), device, kHistGlobalThreads, 0, work);
            if (grid < min_grid) grid = static_cast<unsigned>(min_grid);
            kernel<<<grid, kHistGlobalThreads, 0, s>>>(a, model, prefix, h);
        }
        check_cuda(cudaGetLastError(), "histogram kernel launch");
    });
}

// flush() of the host emulation: plain additions (host + device so hist_thread stays HD-only).
struct HostFlush {
    uint64_t* hist;
    M3K_HD void operator()(uint32_t bin, uint32_t count) const { hist[bin] += count; }
};

void emulate_histogram(const MergeArgs& a, int model, int64_t prefix, uint64_t* hist) {
    check_model(a, model);
    // The device threads' loops, run one thread after the other over a small odd-sized grid.
    constexpr int64_t kEmulatedThreads = 3 * 97;
    with_dtype_ext(pair_dtype(a, model), a.ext_delta != 0, [&](auto dt, auto ext) {
        for (int64_t t = 0; t < kEmulatedThreads; ++t)
            hist_thread<decltype(dt)::value, decltype(ext)::value>(a, model, prefix, t, kEmulatedThreads,
                                                                   HostFlush{hist});
    });
}

int64_t l1_num_blocks(int64_t numel) {
    return numel <= 0 ? 0 : (numel + kL1BlockElems - 1) / kL1BlockElems;
}

void launch_l1_partials(const MergeArgs& a, int model, double* partials, int device, uintptr_t stream) {
    check_model(a, model);
    const int64_t blocks = l1_num_blocks(a.numel);
    if (blocks == 0) return;
    if (blocks > 0x7fffffff) throw std::invalid_argument("m3kernels CUDA: tensor too large for l1 sums");
    use_device(device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    with_dtype(pair_dtype(a, model), [&](auto dt) {
        l1_kernel<decltype(dt)::value>
            <<<static_cast<unsigned>(blocks), kL1Threads, 0, s>>>(a, model, partials);
        check_cuda(cudaGetLastError(), "l1 kernel launch");
    });
}

void emulate_l1_partials(const MergeArgs& a, int model, double* partials) {
    check_model(a, model);
    const int64_t blocks = l1_num_blocks(a.numel);
    with_dtype(pair_dtype(a, model), [&](auto dt) {
        std::vector<double> total(kL1Threads), kept(kL1Threads);
        for (int64_t blk = 0; blk < blocks; ++blk) {
            for (int t = 0; t < kL1Threads; ++t)
                l1_thread<decltype(dt)::value>(a, model, blk, t, total[t], kept[t]);
            for (int s = kL1Threads / 2; s > 0; s >>= 1)
                for (int t = 0; t < s; ++t) {
                    total[t] += total[t + s];
                    kept[t] += kept[t + s];
                }
            partials[blk] = total[0];
            partials[blocks + blk] = kept[0];
        }
    });
}

void launch_ram_counts(const MergeArgs& a, uint64_t* counts, int device, uintptr_t stream) {
    if (a.numel <= 0) return;
    use_device(device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    constexpr int kThreads = 256;
    const int64_t work = ((a.numel + kRamEPT - 1) / kRamEPT + kThreads - 1) / kThreads;
    const unsigned grid =
        grid_size(reinterpret_cast<const void*>(ram_counts_kernel), device, kThreads, 0, work);
    ram_counts_kernel<<<grid, kThreads, 0, s>>>(a, reinterpret_cast<unsigned long long*>(counts));
    check_cuda(cudaGetLastError(), "ram counts kernel launch");
}

void emulate_ram_counts(const MergeArgs& a, uint64_t* counts) {
    constexpr int64_t kEmulatedThreads = 5 * 61;  // a small odd grid, threads one after the other
    for (int64_t t = 0; t < kEmulatedThreads; ++t) {
        uint64_t shared[kMaxModels], unique[kMaxModels];
        ram_counts_thread(a, t, kEmulatedThreads, shared, unique);
        for (int i = 0; i < a.n; ++i) {
            counts[i] += shared[i];
            counts[a.n + i] += unique[i];
        }
    }
}

}  // namespace m3k
