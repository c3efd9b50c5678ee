// The plain-C interface between the Python bindings and the per-ISA kernel variants.
//
// Everything a kernel needs for one tensor travels in `TensorArgs` (raw pointers, dtype codes,
// the KernelParams arrays of m3kernels/merge/kernel_params.py). Each SIMD variant (generic, AVX2,
// AVX-512) is compiled in its own translation unit and exports one `KernelTable`; dispatch.cpp
// picks the table at run time. No libtorch, no STL in this interface.
#pragma once

#include <cstddef>
#include <cstdint>

namespace m3k {

// dtype codes: m3kernels.merge.kernel_params.DTYPE_CODES
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
// combine codes: m3kernels.merge.kernel_params.COMBINE_CODES
enum Combine : int { kSum = 0, kMean = 1, kTies = 2, kNearswap = 3, kRam = 4 };
// coefficient groups: KernelParams.coef_group (also the grouping of the Gram matrices)
enum CoefGroup : int { kGroupNone = 0, kGroupRow = 1, kGroupColumn = 2 };

struct TensorArgs {
    int n;                     // number of fine-tuned models
    int has_base;              // 0: base is zero
    int combine;               // Combine
    int normalize;             // ties: divide by the agreeing weights
    float lam;                 // scaling coefficient s
    float mean_den;            // sum of coef (mean combine)
    const float* vote_w;       // [n]
    const float* coef;         // [n]
    const uint8_t* dare;       // [n] 1: DARE drop on
    const uint32_t* key0;      // [n]
    const uint32_t* key1;      // [n]
    const uint64_t* dare_thr;  // [n] keep iff u32 < thr (0 .. 2^32)
    const float* dare_scale;   // [n]
    const uint64_t* trim_min;  // [n] keep iff bits(|d|) >= trim_min; 0 keep all, 2^32 none
    const void* base;          // nullptr when has_base == 0
    int base_dtype;
    const void* const* models;  // [n]
    const int* model_dtypes;    // [n]
    int64_t numel;
    int64_t index_offset;  // flat index of element 0 (DARE counter); 0 for whole tensors
    // issue 8 (docs/KERNEL.md): all optional, the defaults leave the program above unchanged
    const uint64_t* trim_max;   // [n] keep iff bits(|d|) <= trim_max (after trim_min); nullptr: keep all
    int coef_group;             // CoefGroup: per-row / per-column coefficients (sum, mean)
    int64_t row_len;            // C, the length of the last dimension (coef_group != 0)
    int64_t groups;             // rows of group_coef
    const float* group_coef;    // [groups][n] coefficient of model i in group g
    float clip_t;               // nearswap: t
    float ram_eps;              // ram: |d| > eps counts
    const float* unique_scale;  // [n] ram: scale of a delta no other model shares; nullptr: 1
    // exact-k ties (docs/KERNEL.md "Exact-k ties"); all nullptr: every tie kept
    const int64_t* tie_keep;        // [n] key == trim_min kept iff tie index < tie_keep (< 0: off)
    const int64_t* tie_skip;        // [n] key == trim_max kept iff tie index >= tie_skip (0: off)
    const int64_t* tie_prefix_min;  // [n][tie_blocks] equal-to-trim_min keys before each tie block
    const int64_t* tie_prefix_max;  // [n][tie_blocks] equal-to-trim_max keys before each tie block
    int64_t tie_blocks;             // tie blocks of 1024 flat indices the prefixes cover
    // round 2 (docs/KERNEL.md "Round-2 pieces"): all optional, the defaults leave the program unchanged
    int fma;                   // sum / mean: m = fmaf(coef_i, d_i, m) (one rounding)
    const float* agree_w;      // [n] ties: model i agrees by the sign of agree_w[i] * d_i; nullptr: 1
    int vote_kind;             // ties: 0 v += vote_w * d; 1 v += sgn(vote_w * d) (count)
    int ties_div;              // ties: 0 Σ agreeing coef (normalize); 1 the agreeing count
    float den_floor;           // ties, ties_div 0, normalize: > 0: m = num / max(den, den_floor)
    const uint8_t* keep_mask;  // bit J of model i at byte i * mask_stride + (J >> 3), LSB first
    int64_t mask_stride;       // bytes between two models' masks (0: one mask for every model)
    const float* mask_scale;   // [n] kept d_i * mask_scale[i]; nullptr: 1
    int dare_div;              // DARE: kept d_i = round_to(dtype_i, d_i / dare_den[i])
    const float* dare_den;     // [n] (dare_div)
};

struct KernelTable {
    const char* name;
    // stage B: out[j] for j < numel; false: no memory
    bool (*merge)(const TensorArgs& a, void* out, int out_dtype);
    // stage A: hist is int64[n][65536], zeroed by the caller, counts are added.
    // prefix == nullptr: high-16 pass; else low-16 of elements whose high 16 equal prefix[i].
    void (*histogram)(const TensorArgs& a, const uint32_t* prefix, int64_t* hist);
    // stage A: float64 sums of |d| and of |d| over DARE-kept elements (fixed chunk order).
    void (*l1_sums)(const TensorArgs& a, double* total, double* kept, uint8_t* keep_mask);
    // Philox words u32 for flat indices [first, first + count) (tests and tools).
    void (*philox_u32)(uint32_t key0, uint32_t key1, int64_t first, int64_t count, uint32_t* out);
    // stage A, small tensors: keys is uint32[n][numel], filled with bits(|d'|) (the values the
    // high-16 pass counts); false when scratch memory could not be allocated.
    bool (*delta_keys)(const TensorArgs& a, uint32_t* keys);
    // stage A, single-pass threshold: keys is uint32[n][runs * 64], bits(|d'|) of runs of 64
    // elements at a stride of numel / runs (>= 64); false on a bad stride or no memory.
    bool (*sample_keys)(const TensorArgs& a, int64_t runs, uint32_t* keys);
    // stage A, single-pass threshold: for each model with span[i] > 0, above[i] += #elements with
    // bits(|d'|) >= (lo[i] + span[i]) << 16; range (rows of span[i] int64 back to back) += the
    // high-16 counts of buckets lo[i] .. lo[i] + span[i] - 1; fine (int64[n][4][65536]) += the
    // low-16 counts of buckets fine_buckets[i * 4 + f] (0xffffffff: none, and each inside the
    // range). All zeroed by the caller. False: no memory.
    bool (*bracket_count)(const TensorArgs& a, const uint32_t* lo, const uint32_t* span,
                          const uint32_t* fine_buckets, int64_t* above, int64_t* range, int64_t* fine);
    // stage A: Gram matrices float64[groups][n][n] of v_i = f32(x_i) - b (groups: 1, the rows or the
    // columns by a.coef_group), in the fixed summation order of docs/KERNEL.md. False: no memory.
    bool (*gram)(const TensorArgs& a, int64_t groups, double* out);
    // stage A: per model, the elements with |d_i| > ram_eps that c > 1 / c == 1 models share
    // (d after DARE and trim, c as in combine 4). Zeroed by the callee. False: no memory.
    bool (*ram_counts)(const TensorArgs& a, int64_t* shared, int64_t* unique);
    // stage A, exact-k ties: int64[n][ceil(numel / 1024)] counts of keys == trim_min / trim_max.
    bool (*tie_counts)(const TensorArgs& a, int64_t* cmin, int64_t* cmax);
};

const KernelTable& table_generic();
const KernelTable& table_avx2();
const KernelTable& table_avx512();

}  // namespace m3k
