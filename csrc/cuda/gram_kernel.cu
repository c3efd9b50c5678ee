// Stage A gram kernel: per (group, chunk) work unit the upper triangle of Σ v_i * v_k, float64.
//
// One block per unit at a time (grid-stride over units), 16 * n threads: thread (i, lane) runs
// gram_lane, writes its lane sums to shared memory, and after a barrier n * n threads add the lanes
// of one entry in lane order (gram_element.cuh). partials[unit * n * n + i * n + k] (k >= i) is the
// chunk value; the host adds a group's chunks in chunk order. Column groups read with a stride of
// row_len (uncoalesced within a block; neighbouring blocks share the cache lines).
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "launch.h"
#include "launch_util.cuh"
#include "gram_element.cuh"

namespace m3k {
namespace {

template <int NMAX>
__global__ void __launch_bounds__(kGramLanes* kMaxModels)
    gram_kernel(const __grid_constant__ MergeArgs a, GramShape s, double* partials) {
    extern __shared__ double lanes[];
    const int t = threadIdx.x, i = t / kGramLanes, lane = t % kGramLanes, nn = a.n * a.n;
    for (int64_t u = blockIdx.x; u < s.units(); u += gridDim.x) {
        double acc[NMAX];
        gram_lane<NMAX>(a, s, u, i, lane, acc);
#pragma unroll
        for (int k = 0; k < NMAX; ++k)  // compile-time indices keep acc in registers
            if (k >= i && k < a.n) lanes[(i * a.n + k) * kGramLanes + lane] = acc[k];
        __syncthreads();
        if (t < nn && t % a.n >= t / a.n) partials[u * nn + t] = gram_lanes_sum(lanes, t);
        __syncthreads();
    }
}

void check_gram(const MergeArgs& a) {
    if (a.coef_group != kGroupNone) {
        if (a.row_len < 1) throw std::invalid_argument("m3kernels CUDA gram: row_len must be >= 1");
        if (a.numel % a.row_len != 0)
            throw std::invalid_argument("m3kernels CUDA gram: numel must be a multiple of row_len");
    }
}

}  // namespace

int64_t gram_num_units(const MergeArgs& a) {
    check_gram(a);
    return gram_shape(a).units();
}

void launch_gram_partials(const MergeArgs& a, double* partials, int device, uintptr_t stream) {
    check_gram(a);
    const GramShape s = gram_shape(a);
    if (s.units() == 0) return;
    use_device(device);
    auto st = reinterpret_cast<cudaStream_t>(stream);
    const int threads = kGramLanes * a.n;
    const size_t smem = sizeof(double) * a.n * a.n * kGramLanes;
    auto launch = [&](auto kernel) {
        const unsigned grid =
            grid_size(reinterpret_cast<const void*>(kernel), device, threads, smem, s.units());
        kernel<<<grid, threads, smem, st>>>(a, s, partials);
        check_cuda(cudaGetLastError(), "gram kernel launch");
    };
    if (a.n <= 4)
        launch(gram_kernel<4>);
    else
        launch(gram_kernel<kMaxModels>);
}

void emulate_gram_partials(const MergeArgs& a, double* partials) {
    check_gram(a);
    const GramShape s = gram_shape(a);
    const int nn = a.n * a.n;
    std::vector<double> lanes(static_cast<size_t>(nn) * kGramLanes);
    auto run = [&](auto nmax) {  // the instantiation the launcher picks
        constexpr int NMAX = decltype(nmax)::value;
        for (int64_t u = 0; u < s.units(); ++u) {
            for (int t = 0; t < kGramLanes * a.n; ++t) {
                const int i = t / kGramLanes, lane = t % kGramLanes;
                double acc[NMAX];
                gram_lane<NMAX>(a, s, u, i, lane, acc);
                for (int k = i; k < a.n; ++k) lanes[(i * a.n + k) * kGramLanes + lane] = acc[k];
            }
            for (int t = 0; t < nn; ++t)
                if (t % a.n >= t / a.n) partials[u * nn + t] = gram_lanes_sum(lanes.data(), t);
        }
    };
    if (a.n <= 4)
        run(std::integral_constant<int, 4>{});
    else
        run(std::integral_constant<int, kMaxModels>{});
}

}  // namespace m3k
