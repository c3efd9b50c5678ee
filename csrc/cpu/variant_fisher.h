// Fisher stage B for one instruction-set variant (docs/DATA_AWARE.md, "Fisher in the fused kernel").
//
// Included by fisher_kernel.cpp three times (generic, AVX2, AVX-512), each inside its own namespace
// right after simd_vec.h, so `vf`, W and the load / store helpers are the variant's. Per element j,
// in float32, every operation separately rounded (-ffp-contract=off), in this order:
//
//     num = 0; den = 0; avg = 0
//     for i: f = f32(F_i[j]); f = floor_mode == 0 ? (f < floor ? floor : f) : f + floor
//            cf = coef[i] * f; num = num + cf * f32(x_i[j]); den = den + cf
//            avg = avg + coef[i] * f32(x_i[j])
//     y = den != 0 ? num / den : avg / coef_sum
//
// then every NaN becomes the canonical quiet NaN and y is rounded to the output dtype (RNE). The
// lanes of a vector are independent elements and blocks are independent: any variant, any thread
// count gives the same bytes.

constexpr int64_t kFisherBlock = 4096;  // elements per OpenMP work item (a multiple of every W)
// Outputs of at least this many bytes (far beyond the caches) are written with non-temporal
// stores: no read-for-ownership of the output lines, one stream less of memory traffic. The bits
// are those of store_vec.
constexpr int64_t kFisherStreamBytes = int64_t(1) << 23;

// store_vec with a non-temporal store (dst + k aligned to the vector's bytes; AVX2 / AVX-512 only).
M3K_INLINE void store_vec_nt(void* dst, int dtype, int64_t k, vf y) {
#if M3K_HAVE_AVX512
    if (dtype == kF32) return _mm512_stream_ps(static_cast<float*>(dst) + k, (__m512)y);
    __m256i h;
    if (dtype == kBF16) {
        const vh b = to_bf16(y);
        __builtin_memcpy(&h, &b, sizeof(h));
    } else {
        h = _mm512_cvtps_ph((__m512)y, _MM_FROUND_TO_NEAREST_INT);
    }
    _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + k), h);
#elif M3K_HAVE_AVX2
    if (dtype == kF32) return _mm256_stream_ps(static_cast<float*>(dst) + k, (__m256)y);
    __m128i h;
    if (dtype == kBF16) {
        const vh b = to_bf16(y);
        __builtin_memcpy(&h, &b, sizeof(h));
    } else {
        h = _mm256_cvtps_ph((__m256)y, _MM_FROUND_TO_NEAREST_INT);
    }
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + k), h);
#else
    store_vec(dst, dtype, k, y);
#endif
}

// Elements [k, k + W) (PARTIAL: the first cnt of them) of out.
template <int FM, bool PARTIAL, bool NT>
M3K_INLINE void fisher_vec(const FisherArgs& a, int64_t k, int cnt, void* out) {
    const vf fl = vsplat(a.floor);
    vf num = vf{}, den = vf{}, avg = vf{};
    for (int i = 0; i < a.n; ++i) {
        vf f, x;
        if (PARTIAL) {
            f = load_vec_partial(a.stats[i], a.stat_dtypes[i], k, cnt);
            x = load_vec_partial(a.models[i], a.model_dtypes[i], k, cnt);
        } else {
            f = load_vec(a.stats[i], a.stat_dtypes[i], k);
            x = load_vec(a.models[i], a.model_dtypes[i], k);
        }
        f = FM == 0 ? vsel(f < fl, fl, f) : f + fl;  // max: a NaN f fails the test and stays NaN
        const vf c = vsplat(a.coef[i]);
        const vf cf = c * f;
        num = num + cf * x;
        den = den + cf;
        avg = avg + c * x;
    }
    const vf y0 = vsel(den != 0.0f, num / den, avg / vsplat(a.coef_sum));
    const vf y = vsel(y0 != y0, vsplat(__builtin_nanf("")), y0);  // one canonical NaN (KERNEL.md)
    if (PARTIAL)
        store_vec_partial(out, a.out_dtype, k, cnt, y);
    else if (NT)
        store_vec_nt(out, a.out_dtype, k, y);
    else
        store_vec(out, a.out_dtype, k, y);
}

template <int FM, bool NT>
static void fisher_block(const FisherArgs& a, int64_t start, int64_t cnt) {
    const int64_t full = cnt / W * W;
    for (int64_t k = 0; k < full; k += W) fisher_vec<FM, false, NT>(a, start + k, W, a.out);
    if (full < cnt) fisher_vec<FM, true, false>(a, start + full, int(cnt - full), a.out);
}

static void fisher_merge(const FisherArgs& a) {
    if (a.numel <= 0) return;
    const int64_t nblocks = (a.numel + kFisherBlock - 1) / kFisherBlock;
    const bool nt = (M3K_HAVE_AVX2 || M3K_HAVE_AVX512) && reinterpret_cast<uintptr_t>(a.out) % 64 == 0 &&
                    a.numel * (a.out_dtype == kF32 ? 4 : 2) >= kFisherStreamBytes;
    void (*block)(const FisherArgs&, int64_t, int64_t) =
        a.floor_mode == 0 ? (nt ? fisher_block<0, true> : fisher_block<0, false>)
                          : (nt ? fisher_block<1, true> : fisher_block<1, false>);
#pragma omp parallel if (nblocks > 4)
    {
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            const int64_t start = bi * kFisherBlock;
            block(a, start, a.numel - start < kFisherBlock ? a.numel - start : kFisherBlock);
        }
#if M3K_HAVE_AVX2
        if (nt) _mm_sfence();  // the non-temporal stores visible before the call returns
#endif
    }
}
