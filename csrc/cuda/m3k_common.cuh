// Float32 arithmetic, bit casts and dtype conversions shared by the kernels (host + device).
//
// Every operation is one IEEE float32 operation rounded to nearest even and never fused
// (docs/KERNEL.md): on the device the __f*_rn intrinsics (which nvcc never contracts into
// FMA, independently of -fmad), on the host plain operators (x86-64 SSE, no FMA). The host
// versions exist so the exact kernel bodies can be emulated on a machine without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_fp16.h>

#include "merge_args.h"

#if defined(__CUDACC__)
#define M3K_HD __host__ __device__ __forceinline__
#else
#define M3K_HD inline
#endif

namespace m3k {

M3K_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

M3K_HD float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

M3K_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

M3K_HD float fdiv(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// One correctly rounded fused multiply-add a * b + c (docs/KERNEL.md V1: the sum / mean with fma).
M3K_HD float ffma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return std::fmaf(a, b, c);
#endif
}

// float64: the gram sums (products of two float32 values are exact in float64).
M3K_HD double dadd(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}

M3K_HD double dmul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

M3K_HD uint32_t f2u(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
#endif
}

M3K_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, 4);
    return x;
#endif
}

// 16-bit storage -> float32 (both exact).
M3K_HD float bf16_bits_to_f32(uint32_t h) {
    return u2f(h << 16);
}

M3K_HD float f16_bits_to_f32(uint32_t h) {
    __half_raw r;
    r.x = static_cast<unsigned short>(h);
    return __half2float(__half(r));
}

// float32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 with the sign kept (the store
// canonicalises NaN first, so the output is always 0x7FC0; KERNEL.md).
// Equal to __float2bfloat16_rn for every non-NaN input; written on the bits so that the
// host emulation and every GPU generation give the same NaN pattern.
M3K_HD uint32_t f32_to_bf16_bits(float y) {
    const uint32_t u = f2u(y);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// float32 -> fp16 bits, IEEE round to nearest even (overflow to inf, gradual underflow).
M3K_HD uint32_t f32_to_f16_bits(float y) {
    if (y != y) return 0x7e00u;  // canonical quiet NaN (__float2half_rn would give 0x7FFF)
    const __half h = __float2half_rn(y);
    return static_cast<__half_raw>(h).x;
}

// x rounded to input dtype dt and back (dare_div, V7): RNE; fp16 overflows to inf; NaN stays NaN.
M3K_HD float round_to_dtype(float x, int dt) {
    if (dt == kF32) return x;
    if (dt == kBF16) {
        const uint32_t u = f2u(x);
        return x != x ? x : u2f((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
    }
    return __half2float(__float2half_rn(x));
}

// bits(|x|) as uint32: the sign-free float32 pattern the trim and the histograms compare.
M3K_HD uint32_t abs_bits(float x) {
    return f2u(x) & 0x7fffffffu;
}

}  // namespace m3k
