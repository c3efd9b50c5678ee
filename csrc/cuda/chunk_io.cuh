// Loading and storing one chunk of EPT consecutive elements as float32 (host + device).
//
// Vector path (all pointers 16-byte aligned and the chunk fully inside the tensor): 16-byte
// loads, i.e. 8 x bf16/fp16 or 4 x fp32 per load. Scalar path (tail chunk or unaligned
// pointers): one element at a time, out-of-range elements read as 0 and are never stored.
// DT is the input dtype when known at compile time, -1 to dispatch on the runtime code.
#pragma once

#include <cstdint>
#include <cstring>

#include "m3k_common.cuh"
#include "merge_args.h"

namespace m3k {

// NW 32-bit words from 16-byte-aligned src: 16-byte loads (8-byte for NW == 2).
template <int NW>
M3K_HD void load_words(const void* src, uint32_t (&w)[NW]) {
    static_assert(NW % 4 == 0 || NW == 2, "load_words: 2 or a multiple of 4 words");
    if constexpr (NW % 4 == 0) {
#pragma unroll
        for (int q = 0; q < NW / 4; ++q) {
#ifdef __CUDA_ARCH__
            const uint4 t = __ldg(static_cast<const uint4*>(src) + q);
#else
            uint4 t;
            std::memcpy(&t, static_cast<const char*>(src) + 16 * q, 16);
#endif
            w[4 * q + 0] = t.x;
            w[4 * q + 1] = t.y;
            w[4 * q + 2] = t.z;
            w[4 * q + 3] = t.w;
        }
    } else {
#ifdef __CUDA_ARCH__
        const uint2 t = __ldg(static_cast<const uint2*>(src));
#else
        uint2 t;
        std::memcpy(&t, src, 8);
#endif
        w[0] = t.x;
        w[1] = t.y;
    }
}

template <int NW>
M3K_HD void store_words(void* dst, const uint32_t (&w)[NW]) {
    static_assert(NW % 4 == 0 || NW == 2, "store_words: 2 or a multiple of 4 words");
    if constexpr (NW % 4 == 0) {
#pragma unroll
        for (int q = 0; q < NW / 4; ++q) {
            const uint4 t = make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
#ifdef __CUDA_ARCH__
            static_cast<uint4*>(dst)[q] = t;
#else
            std::memcpy(static_cast<char*>(dst) + 16 * q, &t, 16);
#endif
        }
    } else {
        const uint2 t = make_uint2(w[0], w[1]);
#ifdef __CUDA_ARCH__
        *static_cast<uint2*>(dst) = t;
#else
        std::memcpy(dst, &t, 8);
#endif
    }
}

M3K_HD float load_one(const void* p, int dt, int64_t j) {
    if (dt == kF32) return static_cast<const float*>(p)[j];
    const uint32_t h = static_cast<const uint16_t*>(p)[j];
    return dt == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

// Chunk [j0, j0 + EPT) of p as float32, input dtype DT (compile time).
template <int EPT, int DT>
M3K_HD void load_chunk_dt(const void* p, int64_t j0, int64_t numel, bool vec, float (&v)[EPT]) {
    static_assert(DT == kF32 || DT == kBF16 || DT == kF16, "load_chunk_dt: bad dtype");
    if (vec) {
        if constexpr (DT == kF32) {
            uint32_t w[EPT];
            load_words<EPT>(static_cast<const float*>(p) + j0, w);
#pragma unroll
            for (int k = 0; k < EPT; ++k) v[k] = u2f(w[k]);
        } else {
            uint32_t w[EPT / 2];
            load_words<EPT / 2>(static_cast<const uint16_t*>(p) + j0, w);
#pragma unroll
            for (int q = 0; q < EPT / 2; ++q) {
                if constexpr (DT == kBF16) {
                    v[2 * q] = bf16_bits_to_f32(w[q] & 0xffffu);
                    v[2 * q + 1] = bf16_bits_to_f32(w[q] >> 16);
                } else {
                    v[2 * q] = f16_bits_to_f32(w[q] & 0xffffu);
                    v[2 * q + 1] = f16_bits_to_f32(w[q] >> 16);
                }
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < EPT; ++k) v[k] = (j0 + k < numel) ? load_one(p, DT, j0 + k) : 0.0f;
    }
}

// Same, dtype DT or (DT == -1) the runtime code dt.
template <int EPT, int DT>
M3K_HD void load_chunk(const void* p, int dt, int64_t j0, int64_t numel, bool vec, float (&v)[EPT]) {
    if constexpr (DT >= 0) {
        load_chunk_dt<EPT, DT>(p, j0, numel, vec, v);
    } else {
        if (dt == kF32)
            load_chunk_dt<EPT, kF32>(p, j0, numel, vec, v);
        else if (dt == kBF16)
            load_chunk_dt<EPT, kBF16>(p, j0, numel, vec, v);
        else
            load_chunk_dt<EPT, kF16>(p, j0, numel, vec, v);
    }
}

// Write chunk [j0, j0 + EPT) of y (float32) to p in dtype dt, RNE cast, only inside numel.
template <int EPT>
M3K_HD void store_chunk(void* p, int dt, int64_t j0, int64_t numel, bool vec, const float (&y_in)[EPT]) {
    float y[EPT];  // every NaN becomes the canonical quiet NaN 0x7FC00000 (KERNEL.md)
#pragma unroll
    for (int k = 0; k < EPT; ++k) y[k] = y_in[k] != y_in[k] ? u2f(0x7fc00000u) : y_in[k];
    if (dt == kF32) {
        if (vec) {
            uint32_t w[EPT];
#pragma unroll
            for (int k = 0; k < EPT; ++k) w[k] = f2u(y[k]);
            store_words<EPT>(static_cast<float*>(p) + j0, w);
        } else {
#pragma unroll
            for (int k = 0; k < EPT; ++k)
                if (j0 + k < numel) static_cast<float*>(p)[j0 + k] = y[k];
        }
        return;
    }
    uint32_t h[EPT];
#pragma unroll
    for (int k = 0; k < EPT; ++k) h[k] = dt == kBF16 ? f32_to_bf16_bits(y[k]) : f32_to_f16_bits(y[k]);
    if (vec) {
        uint32_t w[EPT / 2];
#pragma unroll
        for (int q = 0; q < EPT / 2; ++q) w[q] = h[2 * q] | (h[2 * q + 1] << 16);
        store_words<EPT / 2>(static_cast<uint16_t*>(p) + j0, w);
    } else {
#pragma unroll
        for (int k = 0; k < EPT; ++k)
            if (j0 + k < numel) static_cast<uint16_t*>(p)[j0 + k] = static_cast<uint16_t>(h[k]);
    }
}

}  // namespace m3k
