// Launch helpers: error checking, device selection and grid sizing for grid-stride kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

namespace m3k {

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("m3kernels CUDA: ") + what + ": " + cudaGetErrorName(err) +
                                 " (" + cudaGetErrorString(err) + ")");
}

// Make `device` current for this thread (the primary context, the one PyTorch uses).
inline void use_device(int device) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

// Resident blocks of `kernel` per SM times the SM count: the grid of a grid-stride launch.
// Cached per (kernel, device, threads, shared memory).
inline int64_t resident_blocks(const void* kernel, int device, int threads, size_t smem) {
    static std::mutex mu;
    static std::map<std::pair<std::pair<const void*, int>, std::pair<int, size_t>>, int64_t> cache;
    const auto key = std::make_pair(std::make_pair(kernel, device), std::make_pair(threads, smem));
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    int sms = 0, per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem),
               "occupancy query");
    const int64_t blocks = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    cache[key] = blocks;
    return blocks;
}

// Grid for `work_blocks` blocks of work in a grid-stride loop: at most one full wave.
inline unsigned grid_size(const void* kernel, int device, int threads, size_t smem, int64_t work_blocks) {
    const int64_t wave = resident_blocks(kernel, device, threads, smem);
    int64_t g = work_blocks < wave ? work_blocks : wave;
    return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace m3k
