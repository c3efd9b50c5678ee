// The per-element program of docs/KERNEL.md on one chunk of EPT elements (host + device).
//
// delta -> DARE drop (Philox, one evaluation per 4 elements; dare_div) -> keep mask -> trim (window
// trim_min..trim_max) -> combine (sum / mean with per-tensor or per-group coefficients, optionally
// fused multiply-add; TIES with its vote / agreement / divisor variants; RAM) -> scale and add ->
// RNE cast; NEARSWAP interpolates base and model directly. Stage B (merge_chunk) and stage A (delta_chunk, in
// the statistics kernels) share these functions, so both stages see the same deltas bit for bit.
//
// Template parameters: NMAX models at most; EXACT: n == NMAX (loops need no guard, so all
// loads of a chunk can be issued before the first one is used); EPT elements per chunk (a
// multiple of 4); C: kTies, kNearswap, kRam, or kSum for sum and mean (a.combine picks); DT the input
// dtype (-1: runtime, mixed dtypes).
#pragma once

#include <cstdint>

#include "chunk_io.cuh"
#include "m3k_common.cuh"
#include "merge_args.h"
#include "philox.cuh"

namespace m3k {

// Chunk index c -> first element, and whether the vector path applies.
M3K_HD int64_t chunk_start(int64_t c, int ept) {
    return c * ept;
}

template <int EPT>
M3K_HD bool chunk_vec(const MergeArgs& a, int64_t j0) {
    return a.aligned && j0 + EPT <= a.numel;
}

// The base chunk as float32 (zeros without a base).
template <int EPT, int DT>
M3K_HD void base_chunk(const MergeArgs& a, int64_t j0, bool vec, float (&b)[EPT]) {
    if (a.has_base) {
        load_chunk<EPT, DT>(a.base, a.base_dtype, j0, a.numel, vec, b);
    } else {
#pragma unroll
        for (int k = 0; k < EPT; ++k) b[k] = 0.0f;
    }
}

// DARE drop and rescale of model i on chunk [j0, j0 + EPT), j0 a multiple of 4; dt: model i's
// input dtype (dare_div rounds a kept d / dare_den to it, V7).
template <int EPT, bool EXT>
M3K_HD void dare_drop(const MergeArgs& a, int i, int64_t j0, int dt, float (&d)[EPT]) {
    static_assert(EPT % 4 == 0, "dare_drop: EPT must be a multiple of 4");
    if (!a.dare[i]) return;
    const uint64_t thr = a.dare_thr[i];
    const float scale = a.dare_scale[i];
    const float den = a.dare_den[i];
    const bool div = EXT && a.dare_div != 0;
#pragma unroll
    for (int g = 0; g < EPT / 4; ++g) {
        uint32_t w[4];
        philox4x32_10((static_cast<uint64_t>(j0) >> 2) + g, a.key0[i], a.key1[i], w);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int k = 4 * g + r;
            const bool keep = static_cast<uint64_t>(w[r]) < thr;
            if (div)
                d[k] = keep ? round_to_dtype(fdiv(d[k], den), dt) : 0.0f;
            else
                d[k] = keep ? fmul(d[k], scale) : 0.0f;
        }
    }
}

M3K_HD uint32_t load_mask_byte(const uint8_t* p) {
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}

// Keep mask of model i on chunk [j0, j0 + EPT) (V6, right after the DARE step): bit J = index_offset + j
// of the model's mask (byte J >> 3, LSB first) keeps d * mask_scale[i], else 0. EPT <= 8, so the
// chunk's bits lie in at most two bytes; only bytes of elements inside the tensor are read.
template <int EPT>
M3K_HD void mask_drop(const MergeArgs& a, int i, int64_t j0, float (&d)[EPT]) {
    static_assert(EPT <= 8, "mask_drop: EPT must be <= 8");
    const uint8_t* m = a.keep_mask + i * a.mask_stride;
    const int64_t J0 = a.index_offset + j0;
    const int64_t last = a.index_offset + (j0 + EPT < a.numel ? j0 + EPT : a.numel) - 1;
    uint32_t w = load_mask_byte(m + (J0 >> 3));
    if ((last >> 3) != (J0 >> 3)) w |= load_mask_byte(m + (J0 >> 3) + 1) << 8;
    const uint32_t bits = w >> (J0 & 7);
    const float scale = a.mask_scale[i];
#pragma unroll
    for (int k = 0; k < EPT; ++k) d[k] = ((bits >> k) & 1u) ? fmul(d[k], scale) : 0.0f;
}

// Magnitude trim of model i: keep iff trim_min <= bits(|d|) <= trim_max. trim_min 0 keeps all
// (2^32: none); trim_max >= 0x7fffffff keeps all (NaN included). Each test either keeps d or zeroes
// it and 0 passes the upper one, so testing the upper end first gives the two tests of
// docs/KERNEL.md in their order.
template <int EPT>
M3K_HD void trim(const MergeArgs& a, int i, float (&d)[EPT]) {
    const uint64_t hi = a.trim_max[i];
    if (hi < kTrimMaxKeepAll) {
#pragma unroll
        for (int k = 0; k < EPT; ++k) d[k] = (static_cast<uint64_t>(abs_bits(d[k])) <= hi) ? d[k] : 0.0f;
    }
    const uint64_t t = a.trim_min[i];
    if (t == 0) return;
#pragma unroll
    for (int k = 0; k < EPT; ++k) d[k] = (static_cast<uint64_t>(abs_bits(d[k])) >= t) ? d[k] : 0.0f;
}

// Per-group coefficients: gi[k] = g(J) * n for J = index_offset + j0 + k (row: J / row_len,
// column: J % row_len); one 64-bit division per chunk. Elements past numel get 0 (never used).
template <int EPT>
M3K_HD void group_rows(const MergeArgs& a, int64_t j0, int64_t (&gi)[EPT]) {
    const int64_t C = a.row_len, J0 = a.index_offset + j0;
    int64_t row = J0 / C, col = J0 - row * C;
#pragma unroll
    for (int k = 0; k < EPT; ++k) {
        const int64_t g = a.coef_group == kGroupRow ? row : col;
        gi[k] = j0 + k < a.numel ? g * a.n : 0;
        if (++col == C) {
            col = 0;
            ++row;
        }
    }
}

M3K_HD float load_coef(const float* p, int64_t idx) {
#ifdef __CUDA_ARCH__
    return __ldg(p + idx);
#else
    return p[idx];
#endif
}

// NEARSWAP (n == 1, base a, model x): y = w * x + (1 - w) * a with w = clamp((1 / max(|a - x|, 1e-6)) * t, 0,
// 1), every operation one float32 rounding in that order; a NaN operand of max / clamp gives NaN.
M3K_HD float nearswap(float a, float x, float t) {
    constexpr float kMinDist = 1e-6f;
    float dist = u2f(abs_bits(fsub(a, x)));
    dist = dist < kMinDist ? kMinDist : dist;  // NaN stays NaN
    float w = fmul(fdiv(1.0f, dist), t);       // torch's t / dist: f32(1 / dist) * t
    w = w < 0.0f ? 0.0f : w;
    w = w > 1.0f ? 1.0f : w;
    return fadd(fmul(w, x), fmul(fsub(1.0f, w), a));
}

// d = x_i - b, then the DARE drop and the keep mask: the delta stage A histograms (no trim).
// EXT = false (stage B's default kernels, a.ext == 0): without the round-2 steps (dare_div, the
// keep mask), so their registers and code stay those of the program without them.
template <int EPT, int DT, bool EXT = true>
M3K_HD void delta_chunk(const MergeArgs& a, int i, int64_t j0, bool vec, const float (&b)[EPT],
                        float (&d)[EPT]) {
    load_chunk<EPT, DT>(a.models[i], a.model_dtype[i], j0, a.numel, vec, d);
#pragma unroll
    for (int k = 0; k < EPT; ++k) d[k] = fsub(d[k], b[k]);
    dare_drop<EPT, EXT>(a, i, j0, DT >= 0 ? DT : a.model_dtype[i], d);
    if constexpr (EXT) {
        if (a.keep_mask) mask_drop<EPT>(a, i, j0, d);
    }
}

template <int NMAX, bool EXACT>
M3K_HD bool model_on(const MergeArgs& a, int i) {
    return EXACT ? true : i < a.n;
}

// RAM on element k of a chunk: c = #{i : |d_i| > eps}; m = Σ over those, in model order, of
// d_i * unique_scale[i] (c == 1) or d_i / c.
template <int NMAX, bool EXACT, int EPT>
M3K_HD int ram_count(const MergeArgs& a, const float (&d)[NMAX][EPT], int k) {
    int c = 0;
#pragma unroll
    for (int i = 0; i < NMAX; ++i)
        if (model_on<NMAX, EXACT>(a, i) && u2f(abs_bits(d[i][k])) > a.ram_eps) ++c;
    return c;
}

template <int NMAX, bool EXACT, int EPT>
M3K_HD float ram_element(const MergeArgs& a, const float (&d)[NMAX][EPT], int k) {
    const int c = ram_count<NMAX, EXACT, EPT>(a, d, k);
    const float cf = static_cast<float>(c);
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
        const float x = d[i][k];
        if (model_on<NMAX, EXACT>(a, i) && u2f(abs_bits(x)) > a.ram_eps)
            m = fadd(m, c == 1 ? fmul(x, a.unique_scale[i]) : fdiv(x, cf));
    }
    return m;
}

// sgn(x) as float32: 1, -1, or 0 for +-0 and NaN (the count vote and count divisor, V3 / V4).
M3K_HD float sgnf(float x) {
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}

// TIES on element k (docs/KERNEL.md combine 2 with V2..V5): the sign vote (weighted sum, or count),
// then the disjoint merge of the models agreeing by the sign of agree_w[i] * d_i, divided by the
// agreeing coefficients (normalize; den_floor > 0: by max(den, den_floor)) or by their count.
template <int NMAX, bool EXACT, int EPT>
M3K_HD float ties_element(const MergeArgs& a, const float (&d)[NMAX][EPT], int k) {
    float v = 0.0f;
    if (a.vote_kind == 1) {
#pragma unroll
        for (int i = 0; i < NMAX; ++i)
            if (model_on<NMAX, EXACT>(a, i)) v = fadd(v, sgnf(fmul(a.vote_w[i], d[i][k])));
    } else {
#pragma unroll
        for (int i = 0; i < NMAX; ++i)
            if (model_on<NMAX, EXACT>(a, i)) v = fadd(v, fmul(a.vote_w[i], d[i][k]));
    }
    const bool pos = v >= 0.0f;
    float num = 0.0f, den = 0.0f;
    if (a.ties_div == 1) {
        const float want = pos ? 1.0f : -1.0f;
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (!model_on<NMAX, EXACT>(a, i)) continue;
            const float x = d[i][k];
            const float one = sgnf(fmul(a.agree_w[i], x)) == want ? 1.0f : 0.0f;
            num = fadd(num, fmul(fmul(a.coef[i], x), one));  // times 0: a non-agreeing inf / NaN gives NaN
            den = fadd(den, one);
        }
        return fdiv(num, den < 1.0f ? 1.0f : den);
    }
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
        if (!model_on<NMAX, EXACT>(a, i)) continue;
        const float x = d[i][k];
        const float e = fmul(a.agree_w[i], x);  // agree_w 1 (the default): e == x bit for bit
        if (e != 0.0f && ((e > 0.0f) == pos)) {
            num = fadd(num, fmul(a.coef[i], x));
            den = fadd(den, a.coef[i]);
        }
    }
    if (!a.normalize) return num;
    if (a.den_floor > 0.0f) return fdiv(num, den < a.den_floor ? a.den_floor : den);
    return den != 0.0f ? fdiv(num, den) : 0.0f;
}

// Stage B on chunk c: reads base and every model once, writes the output once.
// EXT: the round-2 pieces (a.ext: keep mask, dare_div, fma, the TIES vote / divisor variants) are
// compiled in; the default kernels (EXT = false) run the program without them. Both read agree_w
// (one multiply per model: cheaper in registers than a branch on it).
template <int NMAX, bool EXACT, int EPT, int C, int DT, bool EXT = false>
M3K_HD void merge_chunk(const MergeArgs& a, int64_t c) {
    const int64_t j0 = chunk_start(c, EPT);
    const bool vec = chunk_vec<EPT>(a, j0);
    float b[EPT];
    base_chunk<EPT, DT>(a, j0, vec, b);
    float m[EPT], y[EPT];
    if constexpr (C == kNearswap) {  // y directly: no delta, no b + lam * m
        float x[EPT];
        load_chunk<EPT, DT>(a.models[0], a.model_dtype[0], j0, a.numel, vec, x);
#pragma unroll
        for (int k = 0; k < EPT; ++k) y[k] = nearswap(b[k], x[k], a.clip_t);
    } else if constexpr (C == kSum) {
        int64_t gi[EPT];
        if (a.coef_group != kGroupNone) group_rows<EPT>(a, j0, gi);
#pragma unroll
        for (int k = 0; k < EPT; ++k) m[k] = 0.0f;
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (model_on<NMAX, EXACT>(a, i)) {
                float d[EPT];
                delta_chunk<EPT, DT, EXT>(a, i, j0, vec, b, d);
                trim<EPT>(a, i, d);
                if (a.coef_group != kGroupNone) {
                    if (EXT && a.fma) {
#pragma unroll
                        for (int k = 0; k < EPT; ++k)
                            m[k] = ffma(load_coef(a.group_coef, gi[k] + i), d[k], m[k]);
                    } else {
#pragma unroll
                        for (int k = 0; k < EPT; ++k)
                            m[k] = fadd(m[k], fmul(load_coef(a.group_coef, gi[k] + i), d[k]));
                    }
                } else {
                    const float coef = a.coef[i];
                    if (EXT && a.fma) {
#pragma unroll
                        for (int k = 0; k < EPT; ++k) m[k] = ffma(coef, d[k], m[k]);
                    } else {
#pragma unroll
                        for (int k = 0; k < EPT; ++k) m[k] = fadd(m[k], fmul(coef, d[k]));
                    }
                }
            }
        }
        if (a.combine == kMean) {
#pragma unroll
            for (int k = 0; k < EPT; ++k) m[k] = fdiv(m[k], a.mean_den);
        }
    } else if constexpr (C == kRam) {
        float d[NMAX][EPT];
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (model_on<NMAX, EXACT>(a, i)) {
                delta_chunk<EPT, DT, EXT>(a, i, j0, vec, b, d[i]);
                trim<EPT>(a, i, d[i]);
            }
        }
#pragma unroll
        for (int k = 0; k < EPT; ++k) m[k] = ram_element<NMAX, EXACT, EPT>(a, d, k);
    } else if constexpr (EXT) {
        float d[NMAX][EPT];
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (model_on<NMAX, EXACT>(a, i)) {
                delta_chunk<EPT, DT, EXT>(a, i, j0, vec, b, d[i]);
                trim<EPT>(a, i, d[i]);
            } else {
#pragma unroll
                for (int k = 0; k < EPT; ++k) d[i][k] = 0.0f;
            }
        }
#pragma unroll
        for (int k = 0; k < EPT; ++k) m[k] = ties_element<NMAX, EXACT, EPT>(a, d, k);
    } else {  // TIES without the vote / divisor variants: the vote as the deltas come in
        float d[NMAX][EPT];
        float v[EPT];
#pragma unroll
        for (int k = 0; k < EPT; ++k) v[k] = 0.0f;
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (model_on<NMAX, EXACT>(a, i)) {
                delta_chunk<EPT, DT, EXT>(a, i, j0, vec, b, d[i]);
                trim<EPT>(a, i, d[i]);
                const float w = a.vote_w[i];
#pragma unroll
                for (int k = 0; k < EPT; ++k) v[k] = fadd(v[k], fmul(w, d[i][k]));
            } else {
#pragma unroll
                for (int k = 0; k < EPT; ++k) d[i][k] = 0.0f;
            }
        }
#pragma unroll
        for (int k = 0; k < EPT; ++k) {
            const bool pos = v[k] >= 0.0f;
            float num = 0.0f, den = 0.0f;
#pragma unroll
            for (int i = 0; i < NMAX; ++i) {
                const float x = d[i][k];
                const float e = fmul(a.agree_w[i], x);  // agree_w 1 (the default): e == x bit for bit
                if (model_on<NMAX, EXACT>(a, i) && e != 0.0f && ((e > 0.0f) == pos)) {
                    num = fadd(num, fmul(a.coef[i], x));
                    den = fadd(den, a.coef[i]);
                }
            }
            m[k] = a.normalize ? (den != 0.0f ? fdiv(num, den) : 0.0f) : num;
        }
    }
    if constexpr (C != kNearswap) {
#pragma unroll
        for (int k = 0; k < EPT; ++k) y[k] = fadd(b[k], fmul(a.lam, m[k]));
    }
    store_chunk<EPT>(a.out, a.out_dtype, j0, a.numel, vec, y);
}

}  // namespace m3k
