// Philox4x32-10 (docs/RANDOMNESS.md), vectorised: AVX-512 and AVX2 intrinsics, portable lanes.
//
// Included inside a variant's namespace (see variant_impl.h). The key words come from Python
// (KernelParams.key0/key1); element j uses word j & 3 of the block for counter j >> 2.

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kPhiloxSlack = 256;  // spare words after a fill (group rounding)

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

#if M3K_HAVE_AVX2 && !M3K_HAVE_AVX512
// An empty asm makes the value opaque to the optimizer: without it GCC re-schedules the AVX2
// rounds into a slower sequence (0.79 vs 0.62 ns per word on Zen 4). The AVX-512 rounds are
// faster without it (0.38 vs 0.42 ns).
static inline __m256i opaque(__m256i x) {
    __asm__("" : "+x"(x));
    return x;
}
#endif

// Words of counters q0 .. q0 + nq - 1 into out[4 * (q - q0) + w]. Writes up to the next
// multiple of the variant's group size (out needs kPhiloxSlack spare words).
static inline void philox_fill(const PhiloxKeys& key, uint64_t q0, int64_t nq, uint32_t* __restrict out) {
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
                __m512i p0 = _mm512_mul_epu32(c0[u], m0);
                __m512i p1 = _mm512_mul_epu32(c2[u], m1);
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
