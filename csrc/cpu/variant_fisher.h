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

// Elements [k, k + W) (PARTIAL: the first cnt of them) of out.
template <int FM, bool PARTIAL>
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
    else
        store_vec(out, a.out_dtype, k, y);
}

template <int FM>
static void fisher_block(const FisherArgs& a, int64_t start, int64_t cnt) {
    const int64_t full = cnt / W * W;
    for (int64_t k = 0; k < full; k += W) fisher_vec<FM, false>(a, start + k, W, a.out);
    if (full < cnt) fisher_vec<FM, true>(a, start + full, int(cnt - full), a.out);
}

static void fisher_merge(const FisherArgs& a) {
    if (a.numel <= 0) return;
    const int64_t nblocks = (a.numel + kFisherBlock - 1) / kFisherBlock;
    void (*block)(const FisherArgs&, int64_t, int64_t) =
        a.floor_mode == 0 ? fisher_block<0> : fisher_block<1>;
#pragma omp parallel for schedule(static) if (nblocks > 4)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t start = bi * kFisherBlock;
        block(a, start, a.numel - start < kFisherBlock ? a.numel - start : kFisherBlock);
    }
}
