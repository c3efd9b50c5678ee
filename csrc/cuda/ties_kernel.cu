// Exact-k ties: stage B and the stage-A counts, one thread per 1024-element tie block (grid-stride),
// with launchers and host emulation (the same per-block functions, ties_element.cuh).
#include <cstdint>
#include <stdexcept>

#include "launch.h"
#include "launch_util.cuh"
#include "ties_element.cuh"

namespace m3k {
namespace {

constexpr int kTieThreads = 128;

__global__ void __launch_bounds__(kTieThreads) merge_ties_kernel(const __grid_constant__ MergeArgs a) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t tb = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; tb < a.tie_blocks;
         tb += stride)
        merge_ties_block(a, tb);
}

__global__ void __launch_bounds__(kTieThreads)
    tie_counts_kernel(const __grid_constant__ MergeArgs a, int64_t* cmin, int64_t* cmax) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t tb = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; tb < a.tie_blocks;
         tb += stride)
        tie_counts_block(a, tb, cmin, cmax);
}

unsigned tie_grid(const void* kernel, int device, int64_t tie_blocks) {
    return grid_size(kernel, device, kTieThreads, 0, (tie_blocks + kTieThreads - 1) / kTieThreads);
}

}  // namespace

void launch_merge_ties(const MergeArgs& a, int device, uintptr_t stream) {
    if (a.numel <= 0) return;
    use_device(device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    merge_ties_kernel<<<tie_grid(reinterpret_cast<const void*>(merge_ties_kernel), device, a.tie_blocks),
                        kTieThreads, 0, s>>>(a);
    check_cuda(cudaGetLastError(), "exact-k ties merge kernel launch");
}

void emulate_merge_ties(const MergeArgs& a) {
    for (int64_t tb = 0; tb < a.tie_blocks; ++tb) merge_ties_block(a, tb);
}

void launch_tie_counts(const MergeArgs& a, int64_t* cmin, int64_t* cmax, int device, uintptr_t stream) {
    if (a.numel <= 0) return;
    use_device(device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    tie_counts_kernel<<<tie_grid(reinterpret_cast<const void*>(tie_counts_kernel), device, a.tie_blocks),
                        kTieThreads, 0, s>>>(a, cmin, cmax);
    check_cuda(cudaGetLastError(), "tie counts kernel launch");
}

void emulate_tie_counts(const MergeArgs& a, int64_t* cmin, int64_t* cmax) {
    for (int64_t tb = 0; tb < a.tie_blocks; ++tb) tie_counts_block(a, tb, cmin, cmax);
}

}  // namespace m3k
