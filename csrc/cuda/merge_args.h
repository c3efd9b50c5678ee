// The per-tensor argument block every CUDA kernel receives by value (plain C++, no CUDA).
//
// It mirrors m3kernels.merge.kernel_params.KernelParams plus the raw device pointers and dtype
// codes of the tensors. Passed by value as a kernel parameter (well under the 4 KiB limit),
// so a launch needs no device allocation and no host-to-device copy of its own.
#pragma once

#include <cstdint>

namespace m3k {

constexpr int kMaxModels = 16;  // N beyond this is refused with a clear error

enum DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };  // m3kernels.merge.kernel_params.DTYPE_CODES
enum Combine : int32_t { kSum = 0, kMean = 1, kTies = 2, kNearswap = 3, kRam = 4 };  // COMBINE_CODES
enum CoefGroup : int32_t { kGroupNone = 0, kGroupRow = 1, kGroupColumn = 2 };  // KernelParams.coef_group

constexpr uint64_t kTrimMaxKeepAll = 0x7fffffffu;  // bits(|d|) <= 0x7fffffff always: trim_max keeps all
constexpr int64_t kTieBlock = 1024;                // exact-k ties: flat indices per tie block

struct MergeArgs {
    const void* models[kMaxModels];  // x_i, contiguous, numel elements each
    const void* base;                // nullptr when has_base == 0
    void* out;                       // nullptr for the stage-A kernels
    int64_t numel;
    int32_t n;  // 1 .. kMaxModels
    int32_t model_dtype[kMaxModels];
    int32_t base_dtype;
    int32_t out_dtype;
    int32_t has_base;
    int32_t combine;
    int32_t normalize;
    int32_t aligned;  // every pointer is 16-byte aligned: vector loads allowed
    float lam;
    float mean_den;
    float vote_w[kMaxModels];
    float coef[kMaxModels];
    float dare_scale[kMaxModels];
    uint32_t dare[kMaxModels];  // 1: DARE drop on for model i
    uint32_t key0[kMaxModels];
    uint32_t key1[kMaxModels];
    uint64_t dare_thr[kMaxModels];   // keep iff u32 < dare_thr (0 .. 2^32)
    uint64_t trim_min[kMaxModels];   // 0: no trim; keep iff bits(|d|) >= trim_min (2^32: none)
    uint64_t trim_max[kMaxModels];   // keep iff bits(|d|) <= trim_max (>= 0x7fffffff: keep all)
    float unique_scale[kMaxModels];  // RAM: the multiplier of a delta no other model shares
    float clip_t;                    // NEARSWAP: the similarity threshold t
    float ram_eps;                   // RAM: |d| > ram_eps counts as a contribution
    int32_t coef_group;              // CoefGroup: per-row / per-column coefficients for sum and mean
    int64_t row_len;                 // C, the length of the last dim (>= 1)
    int64_t index_offset;            // flat index of element 0 (chunked calls; 0 for a whole tensor)
    const float* group_coef;         // coef of model i in group g at [g * n + i]; nullptr when unused
    // Exact-k ties (trim_ties: k, docs/KERNEL.md "Exact-k ties"; ties_kernel.cu). tie_rule 0: off.
    int32_t tie_rule;
    int64_t tie_keep[kMaxModels];   // key == trim_min kept iff tie index < tie_keep (< 0: off)
    int64_t tie_skip[kMaxModels];   // key == trim_max kept iff tie index >= tie_skip (<= 0: off)
    const int64_t* tie_prefix_min;  // [n][tie_blocks] equal-to-trim_min keys before each tie block
    const int64_t* tie_prefix_max;  // [n][tie_blocks] equal-to-trim_max keys before each tie block
    int64_t tie_blocks;             // tie blocks of kTieBlock flat indices the prefixes cover
    // Round 2 (docs/KERNEL.md V1..V7); zero / nullptr / 1.0 leave the program above unchanged.
    int32_t ext_delta;  // the keep mask or dare_div is on: stage A's EXT histogram kernels run
    int32_t ext;  // ext_delta, fma (sum / mean) or a TIES vote / divisor variant: the EXT stage-B kernels
    int32_t fma;  // V1: sum / mean accumulate m = fmaf(coef_i, d_i, m)
    int32_t vote_kind;             // V3: TIES vote 0 Σ vote_w·d, 1 Σ sgn(vote_w·d)
    int32_t ties_div;              // V4: TIES divisor 0 Σ agreeing coef (normalize), 1 the agreeing count
    float den_floor;               // V5: > 0 (ties_div 0, normalize): m = num / max(den, den_floor)
    float agree_w[kMaxModels];     // V2
    const uint8_t* keep_mask;      // V6: bit J of model i at byte i * mask_stride + (J >> 3), LSB first
    int64_t mask_stride;           // V6: bytes between two models' masks (0: one shared mask)
    float mask_scale[kMaxModels];  // V6: a kept d_i times mask_scale[i]
    int32_t dare_div;              // V7: a DARE-kept d_i = round_to(dtype_i, d_i / dare_den[i])
    float dare_den[kMaxModels];    // V7
};

}  // namespace m3k
