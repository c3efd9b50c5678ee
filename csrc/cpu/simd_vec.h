// Native-width float32 vectors (GCC vector extensions) and the dtype conversions of the kernels.
//
// Included inside a variant's namespace (see variant_impl.h). `vf` holds W floats: one zmm
// (16) with AVX-512, one ymm (8) with AVX2, one xmm (4) in the generic build; every operation
// is the same IEEE float32 operation per lane on every variant (no FMA: -ffp-contract=off; the
// `fma` piece calls vfma explicitly, one correctly rounded fused operation on every variant),
// which is why all variants give identical bits. Conversions that the ISA has (F16C) use
// intrinsics; the generic variant uses exact scalar code that agrees with them bit for bit.

#define M3K_INLINE static inline __attribute__((always_inline))

// Lanes per vector: the variant's native register width, so no operation is split or spilled.
// Results never depend on W (every lane runs the same float32 operations).
#if M3K_HAVE_AVX512
constexpr int W = 16;
#elif M3K_HAVE_AVX2
constexpr int W = 8;
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

// ---------------------------------------------------------------- scalars

M3K_INLINE uint32_t f32_bits(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}

M3K_INLINE float bits_f32(uint32_t u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

// fp16 -> fp32, exact (normals by re-biasing, subnormals as em * 2^-24 which is exact in float32,
// NaN quieted as vcvtph2ps does).
M3K_INLINE float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    uint32_t r;
    if (em >= 0x7c00u) {
        r = 0x7f800000u | (em << 13) | (em > 0x7c00u ? 0x00400000u : 0u);
    } else if (em >= 0x0400u) {
        r = (em << 13) + 0x38000000u;
    } else {
        r = f32_bits(float(int32_t(em)) * 0x1p-24f);
    }
    return bits_f32(r | sign);
}

// fp32 -> fp16: round to nearest even, overflow to inf, gradual underflow; NaN as vcvtps2ph
// (quiet bit set, top payload bits and sign kept).
M3K_INLINE uint16_t f32_to_f16(float f) {
    const uint32_t x = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u) {
        h = 0x7e00u | ((a >> 13) & 0x3ffu);
    } else if (a >= 0x477ff000u) {  // >= 65520 rounds to infinity
        h = 0x7c00u;
    } else if (a >= 0x38800000u) {  // normal fp16 range (>= 2^-14)
        h = (a + 0x0fffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
    } else {
        const uint32_t e = a >> 23;
        if (e < 102u) {  // below 2^-25: rounds to zero
            h = 0;
        } else {
            const uint32_t m = (a & 0x7fffffu) | 0x800000u;
            const uint32_t s = 126u - e;  // 14 .. 24
            h = (m + (1u << (s - 1)) - 1u + ((m >> s) & 1u)) >> s;
        }
    }
    return uint16_t(h | sign);
}

// ---------------------------------------------------------------- vector helpers

// x in every lane: one broadcast (`vf{} + x` would add 0 and turn -0 into +0; a lane loop is
// sometimes lowered by GCC into W masked inserts).
M3K_INLINE vf vsplat(float x) {
#if M3K_HAVE_AVX512
    return (vf)_mm512_set1_ps(x);
#elif M3K_HAVE_AVX2
    return (vf)_mm256_set1_ps(x);
#elif defined(__SSE2__)
    return (vf)_mm_set1_ps(x);
#else
    vf v;
    for (int l = 0; l < W; ++l) v[l] = x;
    return v;
#endif
}

// m ? a : b per lane (m is 0 or -1): a blend, both operands already computed.
M3K_INLINE vf vsel(vi m, vf a, vf b) {
    return m ? a : b;
}

M3K_INLINE vf vabs(vf x) {
    return (vf)((vu)x & 0x7fffffffu);
}

// Bit l set iff lane l of the mask m (0 or -1 per lane) is set.
M3K_INLINE uint32_t lane_bits(vi m) {
#if M3K_HAVE_AVX512
    return uint32_t(_mm512_movepi32_mask((__m512i)m));
#elif M3K_HAVE_AVX2
    return uint32_t(_mm256_movemask_ps((__m256)m));
#elif defined(__SSE2__)
    return uint32_t(_mm_movemask_ps((__m128)m));
#else
    uint32_t bits = 0;
    for (int l = 0; l < W; ++l) bits |= uint32_t(m[l] & 1) << l;
    return bits;
#endif
}

// -1 in lane l iff bit l of bits is set.
M3K_INLINE vi lanes_of(uint32_t bits) {
#if M3K_HAVE_AVX512
    return (vi)_mm512_movm_epi32(__mmask16(bits));
#else
    vu one_hot;
    for (int l = 0; l < W; ++l) one_hot[l] = 1u << l;
    return (vi)(((vu{} + bits) & one_hot) != 0u);
#endif
}

// a * b + c with one rounding (the `fma` piece of docs/KERNEL.md; the only fused operation).
M3K_INLINE vf vfma(vf a, vf b, vf c) {
#if M3K_HAVE_AVX512
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif M3K_HAVE_AVX2
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    vf r;
    for (int l = 0; l < W; ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return r;
#endif
}

// ---------------------------------------------------------------- loads (W elements -> vf)

M3K_INLINE vf load_f16_vec(const uint16_t* p) {
#if M3K_HAVE_AVX512
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif M3K_HAVE_F16C
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vf r;
    for (int l = 0; l < W; ++l) r[l] = f16_to_f32(p[l]);
    return r;
#endif
}

// bf16 -> f32 is the 16 bits moved to the top of the word.
M3K_INLINE vf load_bf16_vec(const uint16_t* p) {
#if M3K_HAVE_AVX512
    return (vf)_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif M3K_HAVE_AVX2
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                 16);
#elif defined(__SSE2__)
    return (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
    vh h;
    __builtin_memcpy(&h, p, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

// Elements [k, k + W) of a tensor of dtype `dtype` as float32 (exact).
M3K_INLINE vf load_vec(const void* src, int dtype, int64_t k) {
    if (dtype == kBF16) return load_bf16_vec(static_cast<const uint16_t*>(src) + k);
    if (dtype == kF32) {
        vf v;
        __builtin_memcpy(&v, static_cast<const float*>(src) + k, sizeof(v));
        return v;
    }
    return load_f16_vec(static_cast<const uint16_t*>(src) + k);
}

// The first `cnt` (< W) elements from k; the other lanes are 0.
M3K_INLINE vf load_vec_partial(const void* src, int dtype, int64_t k, int cnt) {
    alignas(64) unsigned char buf[4 * W] = {};
    const int size = dtype == kF32 ? 4 : 2;
    __builtin_memcpy(buf, static_cast<const unsigned char*>(src) + k * size, size_t(cnt) * size);
    return load_vec(buf, dtype, 0);
}

M3K_INLINE vu load_u32(const uint32_t* p) {
    vu v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}

// ---------------------------------------------------------------- stores (vf -> W elements)

// The bf16 bits of float32 bits u, rounded to nearest even (docs/KERNEL.md; not for NaN).
M3K_INLINE vu bf16_rne_bits(vu u) {
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// bf16: round to nearest even on the bits; NaN -> 0x7FC0 with its sign (docs/KERNEL.md).
M3K_INLINE vh to_bf16(vf y) {
    const vu u = (vu)y;
    const vu rounded = bf16_rne_bits(u);
    const vu nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    const vu r = y != y ? nan : rounded;
    return __builtin_convertvector(r, vh);
}

M3K_INLINE void store_f16_vec(uint16_t* p, vf y) {
#if M3K_HAVE_AVX512
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)y, _MM_FROUND_TO_NEAREST_INT));
#elif M3K_HAVE_F16C
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)y, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int l = 0; l < W; ++l) p[l] = f32_to_f16(y[l]);
#endif
}

// Elements [k, k + W) of the output, rounded to its dtype.
M3K_INLINE void store_vec(void* dst, int dtype, int64_t k, vf y) {
    if (dtype == kBF16) {
        const vh h = to_bf16(y);
        __builtin_memcpy(static_cast<uint16_t*>(dst) + k, &h, sizeof(h));
    } else if (dtype == kF32) {
        __builtin_memcpy(static_cast<float*>(dst) + k, &y, sizeof(y));
    } else {
        store_f16_vec(static_cast<uint16_t*>(dst) + k, y);
    }
}

// y rounded to dtype (round to nearest even; fp16: overflow to inf) and back to float32: the
// value a tensor of that dtype would hold (identity for float32; NaN stays NaN).
M3K_INLINE vf round_to(int dtype, vf y) {
    if (dtype == kBF16) {
        const vu u = (vu)y;
        const vf r = (vf)(bf16_rne_bits(u) << 16);
        return vsel(y != y, y, r);
    }
    if (dtype == kF16) {
        alignas(64) uint16_t h[W];
        store_f16_vec(h, y);
        return load_f16_vec(h);
    }
    return y;
}

// The first `cnt` (< W) lanes only.
M3K_INLINE void store_vec_partial(void* dst, int dtype, int64_t k, int cnt, vf y) {
    alignas(64) unsigned char buf[4 * W];
    store_vec(buf, dtype, 0, y);
    const int size = dtype == kF32 ? 4 : 2;
    __builtin_memcpy(static_cast<unsigned char*>(dst) + k * size, buf, size_t(cnt) * size);
}

// y with every NaN made the one canonical quiet NaN (docs/KERNEL.md), then store_vec. bf16 in one
// step: a NaN lane becomes 0x7FC0 (the canonical NaN's bf16) instead of being canonicalised
// first and then rounded, which gives the same 0x7FC0 (0x7FC00000 + 0x7FFF >> 16).
M3K_INLINE void store_vec_canon(void* dst, int dtype, int64_t k, vf y) {
    if (dtype == kBF16) {
        const vu r = y != y ? vu{} + 0x7fc0u : bf16_rne_bits((vu)y);
        const vh h = __builtin_convertvector(r, vh);
        __builtin_memcpy(static_cast<uint16_t*>(dst) + k, &h, sizeof(h));
        return;
    }
    store_vec(dst, dtype, k, vsel(y != y, vsplat(__builtin_nanf("")), y));
}

// The CPU has AVX512_BF16 (vcvtneps2bf16), checked once; false outside the AVX-512 variant.
static inline bool cpu_has_bf16_cvt() {
#if M3K_HAVE_AVX512
    static const bool has = __builtin_cpu_supports("avx512bf16");
    return has;
#else
    return false;
#endif
}

#if M3K_HAVE_AVX512

// store_vec_canon for bf16 (W = 16 lanes from k) through vcvtneps2bf16: one instruction where
// to_bf16's rounding takes seven. Its rounding is the same (nearest even on the bits) for normal
// numbers, zeros and infinities; it flushes subnormals to zero and keeps a NaN's sign and payload,
// so a vector holding either (vfpclassps: QNaN, SNaN, denormal) takes store_vec_canon. Inline asm:
// the intrinsic would need the avx512bf16 target on every function it is inlined into; only
// CPUs with cpu_has_bf16_cvt() run this.
M3K_INLINE void store_bf16_cvt(void* dst, int64_t k, vf y) {
    if (_mm512_fpclass_ps_mask((__m512)y, 0xa1)) return store_vec_canon(dst, kBF16, k, y);
    __m256i h;
    __asm__("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"((__m512)y));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + k), h);
}
#endif

// store_vec_canon of the first `cnt` (< W) lanes only.
M3K_INLINE void store_vec_partial_canon(void* dst, int dtype, int64_t k, int cnt, vf y) {
    alignas(64) unsigned char buf[4 * W];
    store_vec_canon(buf, dtype, 0, y);
    const int size = dtype == kF32 ? 4 : 2;
    __builtin_memcpy(static_cast<unsigned char*>(dst) + k * size, buf, size_t(cnt) * size);
}
