// Stage A per-chunk work (host + device): histogram bins and L1 partial sums of one model, RAM counts.
//
// Histograms count bits(|d_i|) of the DARE-dropped delta (no trim), pass 1 the high 16
// bits, pass 2 the low 16 bits of the elements whose high 16 bits equal the prefix. The L1
// partials use a fixed element partition (kL1BlockElems per block, a fixed thread
// assignment and a fixed reduction tree), so their values depend on numel only.
#pragma once

#include <cstdint>

#include "merge_element.cuh"

namespace m3k {

constexpr int kHistEPT = 8;
constexpr int kPass1Bins = 1 << 15;  // bits(|d|) < 2^31, so the high half has 32768 values
constexpr int kHistBins = 1 << 16;

// Bin of one |d| bit pattern; false when pass 2 skips the element.
M3K_HD bool hist_bin(uint32_t x, int64_t prefix, uint32_t& bin) {
    if (prefix < 0) {
        bin = x >> 16;
        return true;
    }
    if ((x >> 16) != static_cast<uint32_t>(prefix)) return false;
    bin = x & 0xffffu;
    return true;
}

// The |d| bit patterns of chunk c of model i (the caller skips elements past numel).
// EXT: with the keep mask and dare_div (a.ext_delta; the kernels without them keep their registers).
template <int DT, bool EXT>
M3K_HD void hist_chunk_bits(const MergeArgs& a, int i, int64_t c, uint32_t (&x)[kHistEPT]) {
    const int64_t j0 = c * kHistEPT;
    const bool vec = a.aligned && j0 + kHistEPT <= a.numel;
    float b[kHistEPT], d[kHistEPT];
    base_chunk<kHistEPT, DT>(a, j0, vec, b);
    delta_chunk<kHistEPT, DT, EXT>(a, i, j0, vec, b, d);
#pragma unroll
    for (int k = 0; k < kHistEPT; ++k) x[k] = abs_bits(d[k]);
}

// One thread of the histogram kernels: chunks first, first + stride, ... of model i. Consecutive
// elements of one bin are counted in registers and handed to flush(bin, count) per run, so the
// exact zeros DARE leaves cost one atomic per run, not one per element.
template <int DT, bool EXT, class Flush>
M3K_HD void hist_thread(const MergeArgs& a, int i, int64_t prefix, int64_t first, int64_t stride,
                        Flush&& flush) {
    const int64_t nchunks = (a.numel + kHistEPT - 1) / kHistEPT;
    uint32_t run_bin = 0, run_count = 0;
    for (int64_t c = first; c < nchunks; c += stride) {
        uint32_t x[kHistEPT];
        hist_chunk_bits<DT, EXT>(a, i, c, x);
#pragma unroll
        for (int k = 0; k < kHistEPT; ++k) {
            uint32_t bin;
            if (c * kHistEPT + k < a.numel && hist_bin(x[k], prefix, bin)) {
                if (bin != run_bin) {
                    if (run_count) flush(run_bin, run_count);
                    run_bin = bin;
                    run_count = 0;
                }
                ++run_count;
            }
        }
    }
    if (run_count) flush(run_bin, run_count);
}

constexpr int kL1Threads = 256;
constexpr int kL1EPT = 8;
constexpr int kL1Iters = 8;
constexpr int64_t kL1BlockElems = static_cast<int64_t>(kL1Threads) * kL1EPT * kL1Iters;  // 16384

// Thread t of L1 block blk: Σ|d_i| and Σ|d_i|·keep_i (float64) over its fixed elements,
// d_i the raw delta (before the drop), in a fixed order.
template <int DT>
M3K_HD void l1_thread(const MergeArgs& a, int i, int64_t blk, int t, double& total, double& kept) {
    total = 0.0;
    kept = 0.0;
    for (int it = 0; it < kL1Iters; ++it) {
        const int64_t j0 =
            (blk * (kL1Threads * kL1Iters) + static_cast<int64_t>(it) * kL1Threads + t) * kL1EPT;
        if (j0 >= a.numel) break;
        const bool vec = a.aligned && j0 + kL1EPT <= a.numel;
        float b[kL1EPT], d[kL1EPT];
        base_chunk<kL1EPT, DT>(a, j0, vec, b);
        load_chunk<kL1EPT, DT>(a.models[i], a.model_dtype[i], j0, a.numel, vec, d);
        uint32_t w[kL1EPT];
#pragma unroll
        for (int g = 0; g < kL1EPT / 4; ++g) {
            uint32_t q[4] = {0u, 0u, 0u, 0u};
            if (a.dare[i]) philox4x32_10((static_cast<uint64_t>(j0) >> 2) + g, a.key0[i], a.key1[i], q);
#pragma unroll
            for (int r = 0; r < 4; ++r) w[4 * g + r] = q[r];
        }
#pragma unroll
        for (int k = 0; k < kL1EPT; ++k) {
            if (j0 + k < a.numel) {
                const double ad = static_cast<double>(u2f(abs_bits(fsub(d[k], b[k]))));
                total += ad;
                if (!a.dare[i] || static_cast<uint64_t>(w[k]) < a.dare_thr[i]) kept += ad;
            }
        }
    }
}

// RAM contribution counts, one thread's share (chunks first, first + stride, ... of 4 elements):
// for each element c = #{i : |d_i| > ram_eps} (d_i after DARE and trim, as stage B's RAM combine
// sees them); a model with |d_i| > ram_eps counts the element in unique[i] when c == 1, else in
// shared[i]. Integer counts: any split of the elements gives the same totals.
constexpr int kRamEPT = 4;

M3K_HD void ram_counts_thread(const MergeArgs& a, int64_t first, int64_t stride,
                              uint64_t (&shared)[kMaxModels], uint64_t (&unique)[kMaxModels]) {
    for (int i = 0; i < kMaxModels; ++i) shared[i] = unique[i] = 0;
    const int64_t nchunks = (a.numel + kRamEPT - 1) / kRamEPT;
    for (int64_t c = first; c < nchunks; c += stride) {
        const int64_t j0 = c * kRamEPT;
        const bool vec = chunk_vec<kRamEPT>(a, j0);
        float b[kRamEPT], d[kMaxModels][kRamEPT];
        base_chunk<kRamEPT, -1>(a, j0, vec, b);
        for (int i = 0; i < a.n; ++i) {
            delta_chunk<kRamEPT, -1>(a, i, j0, vec, b, d[i]);
            trim<kRamEPT>(a, i, d[i]);
        }
        for (int k = 0; k < kRamEPT && j0 + k < a.numel; ++k) {
            const int cnt = ram_count<kMaxModels, false, kRamEPT>(a, d, k);
            for (int i = 0; i < a.n; ++i)
                if (u2f(abs_bits(d[i][k])) > a.ram_eps) ++(cnt == 1 ? unique[i] : shared[i]);
        }
    }
}

}  // namespace m3k
