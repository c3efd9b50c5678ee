// Host entry points of the CUDA kernels, as called by the pybind11 bindings (plain C++).
//
// Streams are passed as integers (the value of torch.cuda.Stream.cuda_stream), pointers
// as raw device addresses inside MergeArgs. Launch errors are thrown as std::runtime_error.
// The emulate_* functions run the very same chunk code on the host, on host pointers: they
// let a machine without a GPU test the kernel bodies (vector/tail paths, dispatch, Philox).
#pragma once

#include <cstdint>

#include "merge_args.h"

namespace m3k {

struct RuntimeInfo {
    int runtime_version;  // e.g. 13000 for CUDA 13.0
    int driver_version;   // the newest CUDA version the installed driver supports (0: no driver)
    int device_count;     // 0 when the runtime cannot use any device
    const char* error;    // nullptr, or why cudaGetDeviceCount failed
};
RuntimeInfo runtime_info();

// Stage B: out = merge(base, models) for the whole tensor.
void launch_merge(const MergeArgs& a, int device, uintptr_t stream);
void emulate_merge(const MergeArgs& a);

// Stage A histogram of model i into hist (65536 uint64 counters, added to, not cleared):
// prefix < 0: counts of bits(|d_i|) >> 16; else counts of the low 16 bits of the elements
// whose high 16 bits equal prefix.
void launch_histogram(const MergeArgs& a, int model, int64_t prefix, uint64_t* hist, int device,
                      uintptr_t stream);
void emulate_histogram(const MergeArgs& a, int model, int64_t prefix, uint64_t* hist);

// Stage A L1 sums of model i: partials[0][b] = Σ|d_i|, partials[1][b] = Σ|d_i|·keep_i over
// the fixed element block b (l1_num_blocks(numel) blocks). The caller adds them in block
// order, so the result depends on numel only, not on the GPU or the launch shape.
int64_t l1_num_blocks(int64_t numel);
void launch_l1_partials(const MergeArgs& a, int model, double* partials, int device, uintptr_t stream);
void emulate_l1_partials(const MergeArgs& a, int model, double* partials);

// Stage A gram partials (docs/KERNEL.md, gram): gram_num_units(a) work units (group, chunk), each
// n * n float64 values at partials[unit * n * n + i * n + k], written for k >= i; the caller adds a
// group's chunks (units g * chunks .. g * chunks + chunks - 1) in order. Throws std::invalid_argument
// when row_len does not divide numel (grouped).
int64_t gram_num_units(const MergeArgs& a);
void launch_gram_partials(const MergeArgs& a, double* partials, int device, uintptr_t stream);
void emulate_gram_partials(const MergeArgs& a, double* partials);

// Stage A RAM counts: counts[i] += shared_i, counts[n + i] += unique_i (2n uint64, added to).
void launch_ram_counts(const MergeArgs& a, uint64_t* counts, int device, uintptr_t stream);
void emulate_ram_counts(const MergeArgs& a, uint64_t* counts);

// Exact-k ties (ties_kernel.cu): stage B of a tensor with a.tie_rule (launch_merge / emulate_merge
// call these), and the stage-A counts: cmin[i * tie_blocks + b], cmax[...] (written, not added).
void launch_merge_ties(const MergeArgs& a, int device, uintptr_t stream);
void emulate_merge_ties(const MergeArgs& a);
void launch_tie_counts(const MergeArgs& a, int64_t* cmin, int64_t* cmax, int device, uintptr_t stream);
void emulate_tie_counts(const MergeArgs& a, int64_t* cmin, int64_t* cmax);

}  // namespace m3k
