// The fused kernels (stage A statistics, stage B merge) for one instruction-set variant.
//
// This header is included by variant_generic.cpp, variant_avx2.cpp and variant_avx512.cpp, each
// after its `#pragma GCC target(...)` and with M3K_VARIANT naming a private namespace, so the
// same source compiles three times without ODR clashes. It must not instantiate any std::
// template (those would be shared between the variants); it uses plain loops, C library calls
// and the intrinsics the variant enables through M3K_HAVE_AVX2 / M3K_HAVE_F16C /
// M3K_HAVE_AVX512 (g++ does not update __AVX2__ etc. after `#pragma GCC target`).
//
// Work is cut into blocks of kBlock elements; inside a block every input is converted to float32
// stack buffers, the per-element pipeline of docs/KERNEL.md runs on them in the order written
// there (float32, no FMA: the build has -ffp-contract=off), and the output is converted once.
// Blocks are independent, so any OpenMP thread count gives identical bytes.

#ifndef M3K_VARIANT
#error "define M3K_VARIANT (the namespace of this variant) before including variant_impl.h"
#endif
#ifndef M3K_HAVE_AVX2
#define M3K_HAVE_AVX2 0
#endif
#ifndef M3K_HAVE_F16C
#define M3K_HAVE_F16C 0
#endif
#ifndef M3K_HAVE_AVX512
#define M3K_HAVE_AVX512 0
#endif

namespace m3k {
namespace M3K_VARIANT {

constexpr int64_t kBlock = 1024;            // elements per block (multiple of 128)
constexpr int64_t kPhiloxSlack = 256;       // extra words of the Philox buffer (group rounding)
constexpr int64_t kL1Chunk = 1 << 16;       // L1 sums: fixed chunk (multiple of kBlock)
constexpr int kL1Lanes = 8;                 // L1 sums: accumulators per chunk (fixed order)
constexpr int64_t kHistRound = int64_t(1) << 31;  // uint32 per-thread counts stay exact
constexpr int kBins = 1 << 16;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// ---------------------------------------------------------------- scalar helpers

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

// c ? a : b on the bit patterns. Both operands are always computed, so the compiler never has
// to move a float operation under a condition (which -ftrapping-math forbids, and which would
// stop the loops from vectorizing without AVX-512 masks).
static inline float select_f(bool c, float a, float b) {
    const uint32_t m = 0u - uint32_t(c);
    return bits_f32((f32_bits(a) & m) | (f32_bits(b) & ~m));
}

// fp16 -> fp32, exact (normals by re-biasing, subnormals as em * 2^-24, NaN quieted like vcvtph2ps).
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
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

// fp32 -> fp16, round to nearest even, overflow to inf, gradual underflow; NaN as vcvtps2ph
// (quiet bit set, top 9 payload bits kept, sign kept).
static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u) {
        h = 0x7e00u | ((a >> 13) & 0x3ffu);
    } else if (a >= 0x477ff000u) {          // >= 65520 rounds to infinity
        h = 0x7c00u;
    } else if (a >= 0x38800000u) {          // normal fp16 range (>= 2^-14)
        h = (a + 0x0fffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
    } else {
        uint32_t e = a >> 23;
        if (e < 102u) {                     // below 2^-25: rounds to zero
            h = 0;
        } else {
            uint32_t m = (a & 0x7fffffu) | 0x800000u;
            uint32_t s = 126u - e;          // 14 .. 24
            h = (m + (1u << (s - 1)) - 1u + ((m >> s) & 1u)) >> s;
        }
    }
    return uint16_t(h | sign);
}

// fp32 -> bf16, round to nearest even on the bits; NaN -> 0x7FC0 with the sign kept.
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    const uint32_t m = 0u - uint32_t(f != f);
    return uint16_t((nan & m) | (rounded & ~m));
}

// ---------------------------------------------------------------- dtype conversion of a block

static inline void load_f32(const void* src, int dtype, int64_t start, int64_t cnt,
                            float* __restrict dst) {
    if (dtype == kF32) {
        const float* s = static_cast<const float*>(src) + start;
                for (int64_t k = 0; k < cnt; ++k) dst[k] = s[k];
    } else if (dtype == kBF16) {
        const uint16_t* s = static_cast<const uint16_t*>(src) + start;
                for (int64_t k = 0; k < cnt; ++k) dst[k] = bits_f32(uint32_t(s[k]) << 16);
    } else {
        const uint16_t* s = static_cast<const uint16_t*>(src) + start;
        int64_t k = 0;
#if M3K_HAVE_AVX512
        for (; k + 16 <= cnt; k += 16)
            _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k))));
#elif M3K_HAVE_F16C
        for (; k + 8 <= cnt; k += 8)
            _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k))));
#endif
        for (; k < cnt; ++k) dst[k] = f16_to_f32(s[k]);
    }
}

static inline void store_out(const float* __restrict y, int64_t cnt, void* dst, int dtype,
                             int64_t start) {
    if (dtype == kF32) {
        float* o = static_cast<float*>(dst) + start;
                for (int64_t k = 0; k < cnt; ++k) o[k] = y[k];
    } else if (dtype == kBF16) {
        uint16_t* o = static_cast<uint16_t*>(dst) + start;
                for (int64_t k = 0; k < cnt; ++k) o[k] = f32_to_bf16(y[k]);
    } else {
        uint16_t* o = static_cast<uint16_t*>(dst) + start;
        int64_t k = 0;
#if M3K_HAVE_AVX512
        for (; k + 16 <= cnt; k += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                                _mm512_cvtps_ph(_mm512_loadu_ps(y + k), _MM_FROUND_TO_NEAREST_INT));
#elif M3K_HAVE_F16C
        for (; k + 8 <= cnt; k += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k),
                             _mm256_cvtps_ph(_mm256_loadu_ps(y + k), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; k < cnt; ++k) o[k] = f32_to_f16(y[k]);
    }
}

// ---------------------------------------------------------------- Philox4x32-10

// Round keys: ka[r], kb[r] for rounds 0..9.
struct PhiloxKeys {
    uint32_t ka[10], kb[10];
};

static inline PhiloxKeys philox_keys(uint32_t k0, uint32_t k1) {
    PhiloxKeys k;
    for (int r = 0; r < 10; ++r) {
        k.ka[r] = k0;
        k.kb[r] = k1;
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
    }
    return k;
}

#if M3K_HAVE_AVX2
// An empty asm makes the value opaque to the optimizer: without it GCC rewrites the 64-bit
// lane products of vpmuludq into packed 32-bit lanes, vpmovzxdq and vpmullq (much slower).
static inline __m256i opaque(__m256i x) {
    __asm__("" : "+x"(x));
    return x;
}
#endif
#if M3K_HAVE_AVX512
static inline __m512i opaque(__m512i x) {
    __asm__("" : "+v"(x));
    return x;
}
#endif

// Words of counters q0 .. q0 + nq - 1 into out[4 * (q - q0) + w]. Writes up to the next
// multiple of the variant's group size (out needs kPhiloxSlack spare words).
static inline void philox_fill(const PhiloxKeys& key, uint64_t q0, int64_t nq,
                               uint32_t* __restrict out) {
#if M3K_HAVE_AVX512
    // 64-bit lanes, low halves hold the words (vpmuludq reads only those). Counter order in the
    // lanes (0,4,1,5,2,6,3,7) makes unpacklo/unpackhi emit 4 words per counter in index order.
    constexpr int U = 4;  // independent groups of 8 counters in flight
    const __m512i lane = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
    const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
    for (int64_t g = 0; g < nq; g += 8 * U) {
        __m512i c0[U], c1[U], c2[U], c3[U];
        for (int u = 0; u < U; ++u) {
            __m512i q = _mm512_add_epi64(_mm512_set1_epi64(int64_t(q0 + uint64_t(g) + 8 * u)), lane);
            c0[u] = q;
            c1[u] = _mm512_srli_epi64(q, 32);
            c2[u] = _mm512_setzero_si512();
            c3[u] = _mm512_setzero_si512();
        }
        for (int r = 0; r < 10; ++r) {
            const __m512i ka = _mm512_set1_epi64(key.ka[r]), kb = _mm512_set1_epi64(key.kb[r]);
            for (int u = 0; u < U; ++u) {
                __m512i p0 = opaque(_mm512_mul_epu32(c0[u], m0));
                __m512i p1 = opaque(_mm512_mul_epu32(c2[u], m1));
                c0[u] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[u], ka, 0x96);
                c1[u] = p1;
                c2[u] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[u], kb, 0x96);
                c3[u] = p0;
            }
        }
        for (int u = 0; u < U; ++u) {
            __m512i a = _mm512_mask_blend_epi32(0xAAAA, c0[u], _mm512_slli_epi64(c1[u], 32));
            __m512i b = _mm512_mask_blend_epi32(0xAAAA, c2[u], _mm512_slli_epi64(c3[u], 32));
            uint32_t* o = out + 4 * (g + 8 * u);
            _mm512_storeu_si512(o, _mm512_unpacklo_epi64(a, b));
            _mm512_storeu_si512(o + 16, _mm512_unpackhi_epi64(a, b));
        }
    }
#elif M3K_HAVE_AVX2
    // Same layout with 4 lanes: counter order (0,2,1,3).
    constexpr int U = 4;
    const __m256i lane = _mm256_setr_epi64x(0, 2, 1, 3);
    const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
    for (int64_t g = 0; g < nq; g += 4 * U) {
        __m256i c0[U], c1[U], c2[U], c3[U];
        for (int u = 0; u < U; ++u) {
            __m256i q = _mm256_add_epi64(_mm256_set1_epi64x(int64_t(q0 + uint64_t(g) + 4 * u)), lane);
            c0[u] = q;
            c1[u] = _mm256_srli_epi64(q, 32);
            c2[u] = _mm256_setzero_si256();
            c3[u] = _mm256_setzero_si256();
        }
        for (int r = 0; r < 10; ++r) {
            const __m256i ka = _mm256_set1_epi64x(key.ka[r]), kb = _mm256_set1_epi64x(key.kb[r]);
            for (int u = 0; u < U; ++u) {
                __m256i p0 = opaque(_mm256_mul_epu32(c0[u], m0));
                __m256i p1 = opaque(_mm256_mul_epu32(c2[u], m1));
                c0[u] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[u]), ka);
                c1[u] = p1;
                c2[u] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[u]), kb);
                c3[u] = p0;
            }
        }
        for (int u = 0; u < U; ++u) {
            __m256i a = _mm256_blend_epi32(c0[u], _mm256_slli_epi64(c1[u], 32), 0xAA);
            __m256i b = _mm256_blend_epi32(c2[u], _mm256_slli_epi64(c3[u], 32), 0xAA);
            uint32_t* o = out + 4 * (g + 4 * u);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_unpacklo_epi64(a, b));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_unpackhi_epi64(a, b));
        }
    }
#else
    constexpr int L = 8;
    for (int64_t g = 0; g < nq; g += L) {
        uint32_t c0[L], c1[L], c2[L], c3[L];
        for (int l = 0; l < L; ++l) {
            uint64_t q = q0 + uint64_t(g + l);
            c0[l] = uint32_t(q);
            c1[l] = uint32_t(q >> 32);
            c2[l] = 0;
            c3[l] = 0;
        }
        for (int r = 0; r < 10; ++r) {
            for (int l = 0; l < L; ++l) {
                uint64_t p0 = uint64_t(kPhiloxM0) * c0[l];
                uint64_t p1 = uint64_t(kPhiloxM1) * c2[l];
                c0[l] = uint32_t(p1 >> 32) ^ c1[l] ^ key.ka[r];
                c1[l] = uint32_t(p1);
                c2[l] = uint32_t(p0 >> 32) ^ c3[l] ^ key.kb[r];
                c3[l] = uint32_t(p0);
            }
        }
        for (int l = 0; l < L; ++l) {
            out[4 * (g + l) + 0] = c0[l];
            out[4 * (g + l) + 1] = c1[l];
            out[4 * (g + l) + 2] = c2[l];
            out[4 * (g + l) + 3] = c3[l];
        }
    }
#endif
}

// Words for flat indices [first, first + cnt) (cnt <= kBlock); returns a pointer into buf.
static inline const uint32_t* philox_block(const PhiloxKeys& key, uint64_t first, int64_t cnt,
                                           uint32_t* buf) {
    uint64_t skip = first & 3u;
    int64_t nq = int64_t((skip + uint64_t(cnt) + 3u) >> 2);
    philox_fill(key, first >> 2, nq, buf);
    return buf + skip;
}

// ---------------------------------------------------------------- per-model plan

// What the sparsify step does for one model, decided once per tensor.
struct ModelPlan {
    int dare;            // 0 off, 1 compare u <= dare_le, 2 drop everything
    uint32_t dare_le;    // keep iff u32 <= dare_le (= thr - 1)
    float dare_scale;
    int trim;            // 0 off, 1 compare bits(|d|) >= trim_min, 2 drop everything
    uint32_t trim_min;
    PhiloxKeys key;
};

static inline void make_plan(const TensorArgs& a, int i, ModelPlan& p) {
    p.dare = 0;
    p.dare_le = 0;
    p.dare_scale = a.dare_scale[i];
    if (a.dare[i]) {
        uint64_t thr = a.dare_thr[i];
        if (thr == 0) {
            p.dare = 2;
        } else {
            p.dare = 1;
            p.dare_le = uint32_t((thr > (uint64_t(1) << 32) ? (uint64_t(1) << 32) : thr) - 1u);
        }
    }
    uint64_t tm = a.trim_min ? a.trim_min[i] : 0;
    p.trim = tm == 0 ? 0 : (tm > 0xffffffffull ? 2 : 1);
    p.trim_min = uint32_t(tm);
    p.key = philox_keys(a.key0[i], a.key1[i]);
}

// ---------------------------------------------------------------- per-block scratch

struct Scratch {
    float* x;       // converted model input
    float* b;       // converted base (or zeros)
    float* d;       // [n][kBlock] deltas after sparsify
    float* acc;     // sum/mean: m ; ties: vote
    float* num;     // ties numerator
    float* den;     // ties denominator
    float* y;       // float32 result before the output cast
    uint32_t* u;    // Philox words (kBlock + kPhiloxSlack)
    uint32_t* idx;  // histogram pass 2: matching low halves
    void* mem;
};

static inline bool scratch_alloc(Scratch& s, int n) {
    const size_t fl = size_t(kBlock) * sizeof(float);
    size_t bytes = fl * (6 + size_t(n)) + sizeof(uint32_t) * size_t(2 * kBlock + kPhiloxSlack);
    bytes = (bytes + 63) & ~size_t(63);
    char* m = static_cast<char*>(aligned_alloc(64, bytes));
    s.mem = m;
    if (!m) return false;
    s.x = reinterpret_cast<float*>(m);
    s.b = s.x + kBlock;
    s.acc = s.b + kBlock;
    s.num = s.acc + kBlock;
    s.den = s.num + kBlock;
    s.y = s.den + kBlock;
    s.d = s.y + kBlock;
    s.u = reinterpret_cast<uint32_t*>(s.d + size_t(n) * kBlock);
    s.idx = s.u + kBlock + kPhiloxSlack;
    return true;
}

// ---------------------------------------------------------------- the per-element steps
//
// Row kernels: one loop over the cnt elements of a block. Buffers are passed as __restrict
// parameters (GCC honours restrict reliably on parameters, not on local pointers), so every
// loop vectorizes without run-time alias checks.

static inline void load_base(const TensorArgs& a, int64_t start, int64_t cnt, float* __restrict b) {
    if (a.has_base) {
        load_f32(a.base, a.base_dtype, start, cnt, b);
    } else {
        for (int64_t k = 0; k < cnt; ++k) b[k] = 0.0f;
    }
}

static inline void row_fill(int64_t cnt, float v, float* __restrict y) {
    for (int64_t k = 0; k < cnt; ++k) y[k] = v;
}

// One model of one block: d = f32(x) - b, DARE drop/rescale, trim; acc = acc + c * d.
// STORE_D keeps d for the TIES agreement pass.
template <bool DARE, bool TRIM, bool STORE_D>
static inline void row_model(int64_t cnt, const float* __restrict x, const float* __restrict b,
                             const uint32_t* __restrict u, uint32_t dare_le, float scale,
                             uint32_t trim_min, float c, float* __restrict acc,
                             float* __restrict d) {
    for (int64_t k = 0; k < cnt; ++k) {
        float dk = x[k] - b[k];
        if (DARE) dk = select_f(u[k] <= dare_le, dk * scale, 0.0f);
        if (TRIM) dk = select_f((f32_bits(dk) & 0x7fffffffu) >= trim_min, dk, 0.0f);
        if (STORE_D) d[k] = dk;
        acc[k] = acc[k] + c * dk;
    }
}

// A model whose every element is dropped (DARE density 0 or trim keeping nothing): d = 0.
template <bool STORE_D>
static inline void row_model_zero(int64_t cnt, float c, float* __restrict acc, float* __restrict d) {
    const float zero = 0.0f;
    for (int64_t k = 0; k < cnt; ++k) {
        if (STORE_D) d[k] = zero;
        acc[k] = acc[k] + c * zero;
    }
}

// Delta of model i after the DARE step (trim not applied): the quantity stage A measures.
static inline void row_delta_dare(int64_t cnt, const float* __restrict x, const float* __restrict b,
                                  const uint32_t* __restrict u, uint32_t dare_le, float scale,
                                  float* __restrict d) {
    for (int64_t k = 0; k < cnt; ++k) {
        const float dk = x[k] - b[k];
        d[k] = select_f(u[k] <= dare_le, dk * scale, 0.0f);
    }
}

static inline void row_delta(int64_t cnt, const float* __restrict x, const float* __restrict b,
                             float* __restrict d) {
    for (int64_t k = 0; k < cnt; ++k) d[k] = x[k] - b[k];
}

// TIES: add model i where it agrees with the elected sign (vote >= 0: positive).
static inline void row_agree(int64_t cnt, float c, const float* __restrict vote,
                             const float* __restrict d, float* __restrict num,
                             float* __restrict den) {
    for (int64_t k = 0; k < cnt; ++k) {
        const bool pos = vote[k] >= 0.0f;
        const bool agree = (d[k] != 0.0f) & ((d[k] > 0.0f) == pos);  // &: no branch
        const float nk = num[k] + c * d[k];
        const float dk = den[k] + c;
        num[k] = select_f(agree, nk, num[k]);
        den[k] = select_f(agree, dk, den[k]);
    }
}

// y = b + lam * m with m = num / den (0 where den == 0) or m = num.
static inline void row_finish_ties(int64_t cnt, bool normalize, const float* __restrict num,
                                   const float* __restrict den, const float* __restrict b,
                                   float lam, float* __restrict y) {
    if (normalize) {
        for (int64_t k = 0; k < cnt; ++k) {
            const float q = num[k] / den[k];
            const float m = select_f(den[k] != 0.0f, q, 0.0f);
            y[k] = b[k] + lam * m;
        }
    } else {
        for (int64_t k = 0; k < cnt; ++k) y[k] = b[k] + lam * num[k];
    }
}

// y = b + lam * m with m = acc / mean_den (mean) or m = acc (sum).
static inline void row_finish_linear(int64_t cnt, bool mean, float mean_den,
                                     const float* __restrict acc, const float* __restrict b,
                                     float lam, float* __restrict y) {
    if (mean) {
        for (int64_t k = 0; k < cnt; ++k) y[k] = b[k] + lam * (acc[k] / mean_den);
    } else {
        for (int64_t k = 0; k < cnt; ++k) y[k] = b[k] + lam * acc[k];
    }
}

// Model i of one block through row_model (sparsify + accumulate with weight c).
template <bool STORE_D>
static inline void model_step(const TensorArgs& a, const ModelPlan& p, int i, int64_t start,
                              int64_t cnt, Scratch& s, float c, float* __restrict acc,
                              float* __restrict d) {
    if (p.dare == 2 || p.trim == 2) {
        row_model_zero<STORE_D>(cnt, c, acc, d);
        return;
    }
    load_f32(a.models[i], a.model_dtypes[i], start, cnt, s.x);
    const bool trim = p.trim == 1;
    if (p.dare == 1) {
        const uint32_t* u = philox_block(p.key, uint64_t(a.index_offset + start), cnt, s.u);
        if (trim)
            row_model<true, true, STORE_D>(cnt, s.x, s.b, u, p.dare_le, p.dare_scale, p.trim_min, c, acc, d);
        else
            row_model<true, false, STORE_D>(cnt, s.x, s.b, u, p.dare_le, p.dare_scale, 0, c, acc, d);
    } else {
        if (trim)
            row_model<false, true, STORE_D>(cnt, s.x, s.b, nullptr, 0, 1.0f, p.trim_min, c, acc, d);
        else
            row_model<false, false, STORE_D>(cnt, s.x, s.b, nullptr, 0, 1.0f, 0, c, acc, d);
    }
}

// Delta after the DARE step (no trim) of model i into d: for the histograms.
static inline void delta_dare(const TensorArgs& a, const ModelPlan& p, int i, int64_t start,
                              int64_t cnt, Scratch& s, float* __restrict d) {
    if (p.dare == 2) {
        row_fill(cnt, 0.0f, d);
        return;
    }
    load_f32(a.models[i], a.model_dtypes[i], start, cnt, s.x);
    if (p.dare == 0) {
        row_delta(cnt, s.x, s.b, d);
    } else {
        const uint32_t* u = philox_block(p.key, uint64_t(a.index_offset + start), cnt, s.u);
        row_delta_dare(cnt, s.x, s.b, u, p.dare_le, p.dare_scale, d);
    }
}

// Histogram pass 1: count the high 16 bits of bits(|d|).
static inline void row_hist_high(int64_t cnt, const float* __restrict d, uint32_t* __restrict h) {
    for (int64_t k = 0; k < cnt; ++k) h[(f32_bits(d[k]) & 0x7fffffffu) >> 16]++;
}

// Histogram pass 2: count the low 16 bits of the elements whose high 16 bits equal pre.
// Matching values are first compacted without branches (the match rate is data dependent).
static inline void row_hist_low(int64_t cnt, const float* __restrict d, uint32_t pre,
                                uint32_t* __restrict idx, uint32_t* __restrict h) {
    int64_t m = 0;
    for (int64_t k = 0; k < cnt; ++k) {
        const uint32_t ab = f32_bits(d[k]) & 0x7fffffffu;
        idx[m] = ab & 0xffffu;
        m += (ab >> 16) == pre;
    }
    for (int64_t k = 0; k < m; ++k) h[idx[k]]++;
}

// One block of stage B: out[start .. start + cnt).
static void merge_block(const TensorArgs& a, const ModelPlan* plans, int64_t start, int64_t cnt,
                        Scratch& s, void* out, int out_dtype) {
    const int n = a.n;
    load_base(a, start, cnt, s.b);
    row_fill(cnt, 0.0f, s.acc);
    if (a.combine != kTies) {
        for (int i = 0; i < n; ++i) model_step<false>(a, plans[i], i, start, cnt, s, a.coef[i], s.acc, nullptr);
        row_finish_linear(cnt, a.combine == kMean, a.mean_den, s.acc, s.b, a.lam, s.y);
    } else {
        // the vote (user weights) accumulates in acc; deltas are kept for the agreement pass
        for (int i = 0; i < n; ++i)
            model_step<true>(a, plans[i], i, start, cnt, s, a.vote_w[i], s.acc, s.d + int64_t(i) * kBlock);
        row_fill(cnt, 0.0f, s.num);
        row_fill(cnt, 0.0f, s.den);
        for (int i = 0; i < n; ++i) row_agree(cnt, a.coef[i], s.acc, s.d + int64_t(i) * kBlock, s.num, s.den);
        row_finish_ties(cnt, a.normalize != 0, s.num, s.den, s.b, a.lam, s.y);
    }
    store_out(s.y, cnt, out, out_dtype, start);
}

// ---------------------------------------------------------------- entry points

static void merge(const TensorArgs& a, void* out, int out_dtype) {
    if (a.numel <= 0) return;
    ModelPlan* plans = static_cast<ModelPlan*>(malloc(sizeof(ModelPlan) * size_t(a.n)));
    if (!plans) return;
    for (int i = 0; i < a.n; ++i) make_plan(a, i, plans[i]);
    const int64_t nblocks = (a.numel + kBlock - 1) / kBlock;
#pragma omp parallel if (nblocks > 4)
    {
        Scratch s = {};
        bool ok = scratch_alloc(s, a.n);
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            const int64_t start = bi * kBlock;
            const int64_t cnt = a.numel - start < kBlock ? a.numel - start : kBlock;
            merge_block(a, plans, start, cnt, s, out, out_dtype);
        }
        free(s.mem);
    }
    free(plans);
}

// Histogram of bits(|d'|) (d' = delta after the DARE step) for elements [lo, hi).
static void histogram_range(const TensorArgs& a, const ModelPlan* plans, const uint32_t* prefix,
                            int64_t lo, int64_t hi, int64_t* hist) {
    const int n = a.n;
    const int64_t nblocks = (hi - lo + kBlock - 1) / kBlock;
#pragma omp parallel if (nblocks > 4)
    {
        Scratch s = {};
        bool ok = scratch_alloc(s, 1);
        uint32_t* h = static_cast<uint32_t*>(calloc(size_t(n) * kBins, sizeof(uint32_t)));
        ok = ok && h != nullptr;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            const int64_t start = lo + bi * kBlock;
            const int64_t cnt = hi - start < kBlock ? hi - start : kBlock;
            load_base(a, start, cnt, s.b);
            for (int i = 0; i < n; ++i) {
                delta_dare(a, plans[i], i, start, cnt, s, s.d);
                uint32_t* hm = h + size_t(i) * kBins;
                if (prefix == nullptr)
                    row_hist_high(cnt, s.d, hm);
                else
                    row_hist_low(cnt, s.d, prefix[i], s.idx, hm);
            }
        }
        if (ok) {
#pragma omp critical(m3k_histogram_reduce)
            for (int64_t k = 0; k < int64_t(n) * kBins; ++k) hist[k] += h[k];
        }
        free(h);
        free(s.mem);
    }
}

static void histogram(const TensorArgs& a, const uint32_t* prefix, int64_t* hist) {
    if (a.numel <= 0) return;
    ModelPlan* plans = static_cast<ModelPlan*>(malloc(sizeof(ModelPlan) * size_t(a.n)));
    if (!plans) return;
    for (int i = 0; i < a.n; ++i) make_plan(a, i, plans[i]);
    for (int64_t lo = 0; lo < a.numel; lo += kHistRound) {
        int64_t hi = a.numel - lo < kHistRound ? a.numel : lo + kHistRound;
        histogram_range(a, plans, prefix, lo, hi, hist);
    }
    free(plans);
}

// L1 sums of one block into kL1Lanes float64 accumulators (lane = position mod kL1Lanes).
// MODE 0: no DARE (kept = all), 1: keep iff u <= dare_le, 2: nothing kept.
template <int MODE>
static inline void row_l1(int64_t cnt, const float* __restrict x, const float* __restrict b,
                          const uint32_t* __restrict u, uint32_t dare_le, double* __restrict tot,
                          double* __restrict kept) {
    int64_t k = 0;
    for (; k + kL1Lanes <= cnt; k += kL1Lanes) {
        for (int l = 0; l < kL1Lanes; ++l) {
            const float ad = __builtin_fabsf(x[k + l] - b[k + l]);
            const float kd = MODE == 0 ? ad : (MODE == 1 ? select_f(u[k + l] <= dare_le, ad, 0.0f) : 0.0f);
            tot[l] = tot[l] + double(ad);
            kept[l] = kept[l] + double(kd);
        }
    }
    for (int l = 0; k < cnt; ++k, ++l) {
        const float ad = __builtin_fabsf(x[k] - b[k]);
        const float kd = MODE == 0 ? ad : (MODE == 1 ? select_f(u[k] <= dare_le, ad, 0.0f) : 0.0f);
        tot[l] = tot[l] + double(ad);
        kept[l] = kept[l] + double(kd);
    }
}

// float64 sums of |d| and |d| * keep over one chunk [start, end): blocks in order, lanes
// combined in a fixed order, so the result depends on nothing but the data.
static void l1_chunk(const TensorArgs& a, const ModelPlan* plans, int64_t start, int64_t end,
                     Scratch& s, double* tot_out, double* kept_out) {
    const int n = a.n;
    for (int i = 0; i < n; ++i) {
        double tot[kL1Lanes], kept[kL1Lanes];
        for (int l = 0; l < kL1Lanes; ++l) tot[l] = kept[l] = 0.0;
        const ModelPlan& p = plans[i];
        for (int64_t blk = start; blk < end; blk += kBlock) {
            const int64_t cnt = end - blk < kBlock ? end - blk : kBlock;
            load_base(a, blk, cnt, s.b);
            load_f32(a.models[i], a.model_dtypes[i], blk, cnt, s.x);
            if (p.dare == 1) {
                const uint32_t* u = philox_block(p.key, uint64_t(a.index_offset + blk), cnt, s.u);
                row_l1<1>(cnt, s.x, s.b, u, p.dare_le, tot, kept);
            } else if (p.dare == 2) {
                row_l1<2>(cnt, s.x, s.b, nullptr, 0, tot, kept);
            } else {
                row_l1<0>(cnt, s.x, s.b, nullptr, 0, tot, kept);
            }
        }
        double t = 0.0, q = 0.0;
        for (int l = 0; l < kL1Lanes; ++l) {
            t = t + tot[l];
            q = q + kept[l];
        }
        tot_out[i] = t;
        kept_out[i] = q;
    }
}

static void l1_sums(const TensorArgs& a, double* total, double* kept) {
    const int n = a.n;
    for (int i = 0; i < n; ++i) total[i] = kept[i] = 0.0;
    if (a.numel <= 0) return;
    ModelPlan* plans = static_cast<ModelPlan*>(malloc(sizeof(ModelPlan) * size_t(n)));
    const int64_t nchunks = (a.numel + kL1Chunk - 1) / kL1Chunk;
    double* part = static_cast<double*>(malloc(sizeof(double) * size_t(2 * n) * size_t(nchunks)));
    if (!plans || !part) {
        free(plans);
        free(part);
        return;
    }
    for (int i = 0; i < n; ++i) make_plan(a, i, plans[i]);
#pragma omp parallel if (nchunks > 1)
    {
        Scratch s = {};
        bool ok = scratch_alloc(s, 1);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; ++c) {
            if (!ok) continue;
            const int64_t start = c * kL1Chunk;
            const int64_t end = a.numel - start < kL1Chunk ? a.numel : start + kL1Chunk;
            double* pc = part + size_t(2 * n) * size_t(c);
            l1_chunk(a, plans, start, end, s, pc, pc + n);
        }
        free(s.mem);
    }
    for (int64_t c = 0; c < nchunks; ++c) {
        const double* pc = part + size_t(2 * n) * size_t(c);
        for (int i = 0; i < n; ++i) {
            total[i] = total[i] + pc[i];
            kept[i] = kept[i] + pc[n + i];
        }
    }
    free(part);
    free(plans);
}

static void philox_u32(uint32_t key0, uint32_t key1, int64_t first, int64_t count, uint32_t* out) {
    const PhiloxKeys key = philox_keys(key0, key1);
    uint32_t* buf = static_cast<uint32_t*>(aligned_alloc(64, sizeof(uint32_t) * (kBlock + kPhiloxSlack)));
    if (!buf) return;
    for (int64_t k = 0; k < count; k += kBlock) {
        const int64_t cnt = count - k < kBlock ? count - k : kBlock;
        const uint32_t* u = philox_block(key, uint64_t(first + k), cnt, buf);
        __builtin_memcpy(out + k, u, size_t(cnt) * sizeof(uint32_t));
    }
    free(buf);
}

}  // namespace M3K_VARIANT
}  // namespace m3k
