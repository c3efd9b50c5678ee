// Exact-k ties (docs/KERNEL.md "Exact-k ties") on one tie block, host + device.
//
// An element whose key bits(|d'|) equals a model's trim_min (trim_max) is decided by its tie index
// t, the number of earlier elements (flat order) of that model with the same key: kept iff
// t < tie_keep (t >= tie_skip) when that rule is on. t = the Python-side prefix of the tie block
// (kTieBlock flat indices, aligned at 0) + a running count over the block in flat order, so one
// thread per tie block computes it exactly, whatever the grid. Generic code (any N <= 16, any
// dtypes, 4 elements per chunk): the exact rule is an option, not the bandwidth path.
#pragma once

#include <cstdint>

#include "merge_element.cuh"

namespace m3k {

constexpr int kTieEPT = 4;  // divides kTieBlock: a chunk never straddles two tie blocks

// The trim with the tie rule on chunk [j0, j0 + 4) of model i; cmin / cmax count the keys equal
// to trim_min / trim_max so far (elements past numel are not counted).
M3K_HD void tie_trim(const MergeArgs& a, int i, int64_t j0, float (&d)[kTieEPT], int64_t& cmin,
                     int64_t& cmax) {
    const uint64_t lo = a.trim_min[i], hi = a.trim_max[i];
    const int64_t keep = a.tie_keep[i], skip = a.tie_skip[i];
    for (int k = 0; k < kTieEPT; ++k) {
        if (j0 + k >= a.numel) break;
        const uint64_t x = abs_bits(d[k]);
        bool above = x > lo, below = x < hi;
        if (x == lo) above = keep < 0 || cmin++ < keep;
        if (x == hi) below = skip <= 0 || cmax++ >= skip;
        d[k] = (above && below) ? d[k] : 0.0f;
    }
}

// Sum / mean / TIES of element k (docs/KERNEL.md), on the trimmed deltas of n models.
M3K_HD float tie_combine(const MergeArgs& a, const float (&d)[kMaxModels][kTieEPT], int k) {
    if (a.combine != kTies) {
        float m = 0.0f;
        for (int i = 0; i < a.n; ++i)
            m = a.fma ? ffma(a.coef[i], d[i][k], m) : fadd(m, fmul(a.coef[i], d[i][k]));
        return a.combine == kMean ? fdiv(m, a.mean_den) : m;
    }
    return ties_element<kMaxModels, false, kTieEPT>(a, d, k);
}

// Stage B of tie block tb.
M3K_HD void merge_ties_block(const MergeArgs& a, int64_t tb) {
    const int64_t start = tb * kTieBlock;
    const int64_t end = start + kTieBlock < a.numel ? start + kTieBlock : a.numel;
    int64_t cmin[kMaxModels], cmax[kMaxModels];
    for (int i = 0; i < a.n; ++i) {
        cmin[i] = a.tie_prefix_min[i * a.tie_blocks + tb];
        cmax[i] = a.tie_prefix_max[i * a.tie_blocks + tb];
    }
    for (int64_t j0 = start; j0 < end; j0 += kTieEPT) {
        const bool vec = chunk_vec<kTieEPT>(a, j0);
        float b[kTieEPT], d[kMaxModels][kTieEPT], y[kTieEPT];
        base_chunk<kTieEPT, -1>(a, j0, vec, b);
        for (int i = 0; i < a.n; ++i) {
            delta_chunk<kTieEPT, -1>(a, i, j0, vec, b, d[i]);
            tie_trim(a, i, j0, d[i], cmin[i], cmax[i]);
        }
        for (int k = 0; k < kTieEPT; ++k) y[k] = fadd(b[k], fmul(a.lam, tie_combine(a, d, k)));
        store_chunk<kTieEPT>(a.out, a.out_dtype, j0, a.numel, vec, y);
    }
}

// Stage A of tie block tb: the keys bits(|d'|) (after DARE, no trim) equal to trim_min[i] and to
// trim_max[i], per model, into cmin / cmax [n][tie_blocks].
M3K_HD void tie_counts_block(const MergeArgs& a, int64_t tb, int64_t* cmin, int64_t* cmax) {
    const int64_t start = tb * kTieBlock;
    const int64_t end = start + kTieBlock < a.numel ? start + kTieBlock : a.numel;
    for (int i = 0; i < a.n; ++i) {
        int64_t e0 = 0, e1 = 0;
        for (int64_t j0 = start; j0 < end; j0 += kTieEPT) {
            const bool vec = chunk_vec<kTieEPT>(a, j0);
            float b[kTieEPT], d[kTieEPT];
            base_chunk<kTieEPT, -1>(a, j0, vec, b);
            delta_chunk<kTieEPT, -1>(a, i, j0, vec, b, d);
            for (int k = 0; k < kTieEPT && j0 + k < end; ++k) {
                const uint64_t x = abs_bits(d[k]);
                e0 += x == a.trim_min[i];
                e1 += x == a.trim_max[i];
            }
        }
        cmin[i * a.tie_blocks + tb] = e0;
        cmax[i * a.tie_blocks + tb] = e1;
    }
}

}  // namespace m3k
