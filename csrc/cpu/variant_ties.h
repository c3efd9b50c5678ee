// Exact-k ties (docs/KERNEL.md, "Exact-k ties"): the trim keeps exactly the ranks of its window.
//
// Included by variant_impl.h inside the variant's namespace, after merge_block. An element whose
// key bits(|d'|) equals a model's trim_min (trim_max) is decided by its tie index t, the number of
// earlier elements (flat order) of that model with the same key: kept iff t < tie_keep (t >=
// tie_skip). t = the Python-side prefix of the tie block (TIE_BLOCK = kBlock = 1024 flat indices,
// aligned at 0) + a running count over the block's vectors in order, so each block is computed on
// its own: any thread count, variant or part split (index_offset a multiple of kBlock) gives the
// same elements. One generic loop (any N, any dtypes): the exact rule is an option, not the
// bandwidth path (specialised by dtype only).

constexpr int64_t kTieBlock = kBlock;
constexpr int kMaxTieModels = 64;  // models of one merge with the tie rule

// One model's tie state in the current block.
struct TieState {
    int on_min, on_max;  // the rules in force
    int64_t keep, skip;  // tie_keep, tie_skip
    int64_t cmin, cmax;  // equal keys before this vector (tie indices of its first equal lane)
};

// The lowest k set bits of bits (k <= 0: none).
M3K_INLINE uint32_t lowest_bits(uint32_t bits, int64_t k) {
    if (k <= 0) return 0;
    if (k >= __builtin_popcount(bits)) return bits;
    uint32_t r = 0;
    for (; k > 0; --k) {
        r |= bits & (~bits + 1u);
        bits &= bits - 1u;
    }
    return r;
}

// d_i of docs/KERNEL.md with the exact-k tie rule at its thresholds (lanes past rem ignored).
template <bool PARTIAL, int DT>
M3K_INLINE vf model_delta_ties(const ModelIn& m, const ModelPlan& p, TieState& ts, int64_t g, int64_t k,
                               int rem, vf b) {
    ModelIn m0 = m;
    m0.trim = 0;
    const vf dz = model_delta<PARTIAL, DT, true>(m0, g, k, rem, b);  // d' (DARE, keep mask; no trim)
    if (p.trim == 2) return vf{};
    const uint32_t lanes = PARTIAL ? (1u << rem) - 1u : uint32_t((uint64_t(1) << W) - 1u);
    const vu key = (vu)dz & 0x7fffffffu;
    const vu tmin = vu{} + p.trim_min, tmax = vu{} + p.trim_max;
    uint32_t keep = lane_bits(key > tmin) & lanes;
    const uint32_t eqmin = lane_bits(key == tmin) & lanes;
    keep |= ts.on_min ? lowest_bits(eqmin, ts.keep - ts.cmin) : eqmin;
    ts.cmin += __builtin_popcount(eqmin);
    uint32_t below = lane_bits(key < tmax) & lanes;
    const uint32_t eqmax = lane_bits(key == tmax) & lanes;
    below |= ts.on_max ? eqmax & ~lowest_bits(eqmax, ts.skip - ts.cmax) : eqmax;
    ts.cmax += __builtin_popcount(eqmax);
    return vsel(lanes_of(keep & below), dz, vf{});
}

// Stage B of one block with the tie rule: sum / mean / ties as merge_vec (any N, any dtypes).
template <bool PARTIAL, int DT>
M3K_INLINE void merge_vec_ties(const TensorIn& t, const ModelIn* mi, const ModelPlan* plans, TieState* ts,
                               int n, vf* dv, int64_t g, int64_t k, int rem, void* out, int out_dtype) {
    if (DT >= 0) out_dtype = DT;
    const vf b = base_vec<PARTIAL, DT>(t, g, rem);
    for (int i = 0; i < n; ++i) dv[i] = model_delta_ties<PARTIAL, DT>(mi[i], plans[i], ts[i], g, k, rem, b);
    vf m;
    if (t.combine != kTies) {
        vf acc = vf{};
        if (t.fma) {
            for (int i = 0; i < n; ++i) acc = vfma(vsplat(mi[i].coef), dv[i], acc);
        } else {
            for (int i = 0; i < n; ++i) acc = acc + vsplat(mi[i].coef) * dv[i];
        }
        m = t.combine == kMean ? mean_of(t, acc) : acc;
    } else {
        m = t.ties_ext ? ties_combine_ext(t, mi, dv, n) : ties_combine(t, mi, dv, n);
    }
    const vf y0 = b + vsplat(t.lam) * m;
    if (PARTIAL)  // one canonical NaN (KERNEL.md)
        store_vec_partial_canon(out, out_dtype, g, rem, y0);
    else
        store_vec_canon(out, out_dtype, g, y0);
}

template <int DT>
static void merge_block_ties(const TensorArgs& a, const ModelPlan* plans, const float*, int64_t start,
                             int64_t cnt, Scratch& s, void* out, int out_dtype) {
    block_philox(a, plans, start, cnt, s);
    const int n = a.n;
    const int64_t tb = (a.index_offset + start) / kTieBlock;
    TieState ts[kMaxTieModels];  // n <= kMaxTieModels (checked by the bindings)
    for (int i = 0; i < n; ++i) {
        s.mi[i] = model_in(a, plans[i], i, s.uptr[i], true);
        ts[i].on_min = a.tie_keep && a.tie_keep[i] >= 0;
        ts[i].on_max = a.tie_skip && a.tie_skip[i] > 0;
        ts[i].keep = a.tie_keep ? a.tie_keep[i] : -1;
        ts[i].skip = a.tie_skip ? a.tie_skip[i] : 0;
        ts[i].cmin = a.tie_prefix_min ? a.tie_prefix_min[size_t(i) * size_t(a.tie_blocks) + size_t(tb)] : 0;
        ts[i].cmax = a.tie_prefix_max ? a.tie_prefix_max[size_t(i) * size_t(a.tie_blocks) + size_t(tb)] : 0;
    }
    const TensorIn t = tensor_in(a);
    const int64_t full = cnt / W * W;
    for (int64_t k = 0; k < full; k += W)
        merge_vec_ties<false, DT>(t, s.mi, plans, ts, n, s.dv, start + k, k, W, out, out_dtype);
    if (full < cnt)
        merge_vec_ties<true, DT>(t, s.mi, plans, ts, n, s.dv, start + full, full, int(cnt - full), out,
                                 out_dtype);
}

// Stage A: per model and tie block b, how many keys bits(|d'|) equal trim_min[i] (cmin) and
// trim_max[i] (cmax): int64[n][nblocks] each, blocks of kTieBlock flat indices from 0. Integers.
static bool tie_counts(const TensorArgs& a, int64_t* cmin, int64_t* cmax) {
    const int n = a.n;
    const int64_t nblocks = (a.numel + kTieBlock - 1) / kTieBlock;
    for (int64_t j = 0; j < int64_t(n) * nblocks; ++j) cmin[j] = cmax[j] = 0;
    if (a.numel <= 0) return true;
    ModelPlan* plans = make_plans(a);
    if (!plans) return false;
    const TensorIn t = tensor_in(a);
    bool failed = false;
#pragma omp parallel if (nblocks > 4) reduction(|| : failed)
    {
        Scratch s = {};
        const bool ok = scratch_alloc(s, n);
        failed = !ok;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            const int64_t start = bi * kTieBlock;
            const int64_t cnt = a.numel - start < kTieBlock ? a.numel - start : kTieBlock;
            block_philox(a, plans, start, cnt, s);
            for (int i = 0; i < n; ++i) {
                const ModelIn m = model_in(a, plans[i], i, s.uptr[i], false);
                block_keys(t, m, start, cnt, s.keys);
                const uint64_t lo = a.trim_min ? a.trim_min[i] : 0;
                const uint64_t hi = a.trim_max ? a.trim_max[i] : 0xffffffffull;
                int64_t e0 = 0, e1 = 0;
                for (int64_t j = 0; j < cnt; ++j) {
                    e0 += uint64_t(s.keys[j]) == lo;
                    e1 += uint64_t(s.keys[j]) == hi;
                }
                cmin[size_t(i) * size_t(nblocks) + size_t(bi)] = e0;
                cmax[size_t(i) * size_t(nblocks) + size_t(bi)] = e1;
            }
        }
        free(s.mem);
    }
    free(plans);
    return !failed;
}
