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

// The per-block inputs, copied out of FisherArgs so that the unrolled instances keep them in
// registers (the output stores could otherwise alias them).
template <int NM>
struct FisherIn {
    const void* x[NM > 0 ? NM : 1];
    const void* f[NM > 0 ? NM : 1];
    float c[NM > 0 ? NM : 1];
};

// Elements [k, k + W) (PARTIAL: the first cnt of them) of out. NM > 0: that many models (unrolled),
// all of dtype MD, all statistics of dtype SD; NM == 0: a.n models, every dtype read at run time.
template <int NM, int MD, int SD, bool PARTIAL>
M3K_INLINE void fisher_vec(const FisherArgs& a, const FisherIn<NM>& in, int fm, vf fl, vf csum, bool nt,
                           int64_t k, int cnt) {
    const int n = NM > 0 ? NM : a.n;
    vf num = vf{}, den = vf{}, avg = vf{};
#pragma GCC unroll 4
    for (int i = 0; i < n; ++i) {
        const void* xp = NM > 0 ? in.x[i] : a.models[i];
        const void* fp = NM > 0 ? in.f[i] : a.stats[i];
        const int md = NM > 0 ? MD : a.model_dtypes[i];
        const int sd = NM > 0 ? SD : a.stat_dtypes[i];
        vf f = PARTIAL ? load_vec_partial(fp, sd, k, cnt) : load_vec(fp, sd, k);
        const vf x = PARTIAL ? load_vec_partial(xp, md, k, cnt) : load_vec(xp, md, k);
        f = fm == 0 ? vsel(f < fl, fl, f) : f + fl;  // max: a NaN f fails the test and stays NaN
        const vf c = vsplat(NM > 0 ? in.c[i] : a.coef[i]);
        const vf cf = c * f;
        num = num + cf * x;
        den = den + cf;
        avg = avg + c * x;
    }
    // The second division only where a lane needs it (den == 0 is rare; a vector division is the
    // costliest operation here): the same lanes, the same bits as dividing both.
    const vi zero = den == 0.0f;
    vf y0 = num / den;
    if (lane_bits(zero)) y0 = vsel(zero, avg / csum, y0);
    const vf y = vsel(y0 != y0, vsplat(__builtin_nanf("")), y0);  // one canonical NaN (KERNEL.md)
    if (PARTIAL)
        store_vec_partial(a.out, a.out_dtype, k, cnt, y);
    else if (nt)
        store_vec_nt(a.out, a.out_dtype, k, y);
    else
        store_vec(a.out, a.out_dtype, k, y);
}

template <int NM, int MD, int SD>
static void fisher_block(const FisherArgs& a, bool nt, int64_t start, int64_t cnt) {
    FisherIn<NM> in;
    for (int i = 0; i < NM; ++i) {
        in.x[i] = a.models[i];
        in.f[i] = a.stats[i];
        in.c[i] = a.coef[i];
    }
    const int fm = a.floor_mode;
    const vf fl = vsplat(a.floor), csum = vsplat(a.coef_sum);
    const int64_t full = cnt / W * W;
    for (int64_t k = 0; k < full; k += W)
        fisher_vec<NM, MD, SD, false>(a, in, fm, fl, csum, nt, start + k, W);
    if (full < cnt) fisher_vec<NM, MD, SD, true>(a, in, fm, fl, csum, false, start + full, int(cnt - full));
}

typedef void (*FisherBlockFn)(const FisherArgs&, bool, int64_t, int64_t);

template <int MD>
static FisherBlockFn pick_fisher_block_n(int n) {
    switch (n) {
        case 1:
            return fisher_block<1, MD, kF32>;
        case 2:
            return fisher_block<2, MD, kF32>;
        case 3:
            return fisher_block<3, MD, kF32>;
        default:
            return fisher_block<4, MD, kF32>;
    }
}

// Unrolled instances for the usual case: N <= 4 models of one dtype, float32 statistics (the
// default of `m3kernels stats`); anything else runs the any-N, any-dtype loop.
static FisherBlockFn pick_fisher_block(const FisherArgs& a) {
    bool uniform = a.n <= 4;
    for (int i = 0; i < a.n && uniform; ++i)
        uniform = a.model_dtypes[i] == a.model_dtypes[0] && a.stat_dtypes[i] == kF32;
    if (!uniform) return fisher_block<0, -1, -1>;
    if (a.model_dtypes[0] == kBF16) return pick_fisher_block_n<kBF16>(a.n);
    if (a.model_dtypes[0] == kF16) return pick_fisher_block_n<kF16>(a.n);
    return pick_fisher_block_n<kF32>(a.n);
}

static void fisher_merge(const FisherArgs& a) {
    if (a.numel <= 0) return;
    const int64_t nblocks = (a.numel + kFisherBlock - 1) / kFisherBlock;
    const bool nt = (M3K_HAVE_AVX2 || M3K_HAVE_AVX512) && reinterpret_cast<uintptr_t>(a.out) % 64 == 0 &&
                    a.numel * (a.out_dtype == kF32 ? 4 : 2) >= kFisherStreamBytes;
    const FisherBlockFn block = pick_fisher_block(a);
#pragma omp parallel if (nblocks > 4)
    {
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            const int64_t start = bi * kFisherBlock;
            block(a, nt, start, a.numel - start < kFisherBlock ? a.numel - start : kFisherBlock);
        }
#if M3K_HAVE_AVX2
        if (nt) _mm_sfence();  // the non-temporal stores visible before the call returns
#endif
    }
}
