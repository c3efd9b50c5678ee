// Stage A: the Gram matrices of the deltas (docs/KERNEL.md, "Gram matrices"), per tensor, row or
// column, in float64 and in the one summation order every backend computes.
//
// Included at the end of variant_impl.h, inside the variant's namespace. v_i = f32(x_i) - b (no
// DARE, no trim); entry (i, k) of group g = the sum over the group's sequence of elements of
// (double)v_i * (double)v_k (exact products). The sequence is cut into chunks of kGramChunk
// positions; position q of a chunk adds into lane q mod kGramLanes; the chunk's value is its lanes
// added in lane order, the group's value its chunks' values added in chunk order. A work item is
// one chunk (of a group, or of a block of a block of columns), computed by one thread alone, and the
// chunk values are combined after the parallel loop: any thread count gives the same bits.

constexpr int64_t kGramChunk = 1 << 16;      // positions per chunk (a multiple of kBlock)
constexpr int kGramLanes = 16;               // float64 accumulators per chunk and pair
constexpr int kGramColsMax = 512;            // column grouping: columns per work item, at most ...
constexpr size_t kGramColBytes = 256 << 10;  // ... so that its accumulators fit in this many bytes

// Columns per work item: wide blocks read whole cache lines and pages of each row (the numerics do
// not depend on it: every column has its own accumulators).
static int gram_cols(int npairs) {
    int w = kGramColsMax;
    while (w > 16 && size_t(npairs) * kGramLanes * size_t(w) * sizeof(double) > kGramColBytes) w /= 2;
    return w;
}

// v_i for the cnt (<= kBlock) contiguous elements from e, into vb[i * kBlock + t].
static void gram_load(const TensorIn& t, const TensorArgs& a, int64_t e, int64_t cnt, float* __restrict vb) {
    int64_t k = 0;
    for (; k + W <= cnt; k += W) {
        const vf b = base_vec<false>(t, e + k, W);
        for (int i = 0; i < a.n; ++i) {
            const vf d = load_vec(a.models[i], a.model_dtypes[i], e + k) - b;
            __builtin_memcpy(vb + size_t(i) * kBlock + k, &d, sizeof(d));
        }
    }
    if (k < cnt) {
        const int rem = int(cnt - k);
        const vf b = base_vec<true>(t, e + k, rem);
        for (int i = 0; i < a.n; ++i) {
            const vf d = load_vec_partial(a.models[i], a.model_dtypes[i], e + k, rem) - b;
            __builtin_memcpy(vb + size_t(i) * kBlock + k, &d, size_t(rem) * sizeof(float));
        }
    }
}

// acc[p * kGramLanes + l] += v_i * v_k over block positions t (lane l = t mod kGramLanes: blocks
// start at multiples of kGramLanes in their chunk); pairs p = (i, k), i <= k, in row order.
static void gram_accumulate(const float* __restrict vb, int n, int64_t cnt, double* __restrict acc) {
    int p = 0;
    for (int i = 0; i < n; ++i) {
        const float* __restrict x = vb + size_t(i) * kBlock;
        for (int k = i; k < n; ++k, ++p) {
            const float* __restrict y = vb + size_t(k) * kBlock;
            double* __restrict A = acc + size_t(p) * kGramLanes;
            double L[kGramLanes];  // in registers for the loop
            for (int l = 0; l < kGramLanes; ++l) L[l] = A[l];
            int64_t t = 0;
            for (; t + kGramLanes <= cnt; t += kGramLanes)
                for (int l = 0; l < kGramLanes; ++l) L[l] = L[l] + double(x[t + l]) * double(y[t + l]);
            for (int l = 0; t < cnt; ++t, ++l) L[l] = L[l] + double(x[t]) * double(y[t]);
            for (int l = 0; l < kGramLanes; ++l) A[l] = L[l];
        }
    }
}

// Chunk of a contiguous sequence: elements [e, e + len), lanes summed into part[npairs].
static void gram_contiguous(const TensorIn& t, const TensorArgs& a, int64_t e, int64_t len, int npairs,
                            float* vb, double* acc, double* part) {
    for (int64_t j = 0; j < int64_t(npairs) * kGramLanes; ++j) acc[j] = 0.0;
    for (int64_t off = 0; off < len; off += kBlock) {
        const int64_t cnt = len - off < kBlock ? len - off : kBlock;
        gram_load(t, a, e + off, cnt, vb);
        gram_accumulate(vb, a.n, cnt, acc);
    }
    for (int p = 0; p < npairs; ++p) {
        double s = 0.0;
        for (int l = 0; l < kGramLanes; ++l) s = s + acc[size_t(p) * kGramLanes + l];
        part[p] = s;
    }
}

// Chunk of columns [g0, g0 + w) (w <= cols, the block width), rows [r0, r1): the elements of a row
// are contiguous (loaded together), row r adds into lane (r - r0) mod kGramLanes of its column.
// acc[(p * kGramLanes + l) * cols + c]; part[c * npairs + p].
static void gram_columns(const TensorIn& t, const TensorArgs& a, int64_t g0, int w, int cols, int64_t r0,
                         int64_t r1, int npairs, float* vb, double* acc, double* part) {
    const int64_t C = a.row_len;
    for (int64_t j = 0; j < int64_t(npairs) * kGramLanes * cols; ++j) acc[j] = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
        gram_load(t, a, r * C + g0, w, vb);
        const int l = int((r - r0) % kGramLanes);
        int p = 0;
        for (int i = 0; i < a.n; ++i) {
            const float* __restrict x = vb + size_t(i) * kBlock;
            for (int k = i; k < a.n; ++k, ++p) {
                const float* __restrict y = vb + size_t(k) * kBlock;
                double* __restrict A = acc + (size_t(p) * kGramLanes + l) * size_t(cols);
                for (int c = 0; c < w; ++c) A[c] = A[c] + double(x[c]) * double(y[c]);
            }
        }
    }
    for (int c = 0; c < w; ++c)
        for (int p = 0; p < npairs; ++p) {
            double s = 0.0;
            for (int l = 0; l < kGramLanes; ++l) s = s + acc[(size_t(p) * kGramLanes + l) * size_t(cols) + c];
            part[size_t(c) * npairs + p] = s;
        }
}

// out[g][i][k] (symmetric) for groups g < groups: 1 (coef_group 0), numel / C rows (1), C columns (2).
static bool gram(const TensorArgs& a, int64_t groups, double* out) {
    const int n = a.n;
    const int npairs = n * (n + 1) / 2;
    for (int64_t j = 0; j < groups * n * n; ++j) out[j] = 0.0;
    if (a.numel <= 0 || groups <= 0) return true;
    const int kind = a.coef_group;
    const int cols = gram_cols(npairs);
    const int64_t C = kind == kGroupNone ? a.numel : a.row_len;
    const int64_t R = a.numel / C;
    // the sequences: tensor: one of numel; row: R of C; column: C of R (in blocks of kGramCols)
    const int64_t seq_len = kind == kGroupNone ? a.numel : (kind == kGroupRow ? C : R);
    const int64_t cps = (seq_len + kGramChunk - 1) / kGramChunk;  // chunks per sequence
    const int64_t units = kind == kGroupColumn ? (C + cols - 1) / cols : groups;
    const int64_t items = units * cps;
    const int64_t per_item = kind == kGroupColumn ? int64_t(cols) * npairs : npairs;
    double* part = static_cast<double*>(malloc(sizeof(double) * size_t(items) * size_t(per_item)));
    if (!part) return false;
    const TensorIn t = tensor_in(a);
    bool failed = false;
#pragma omp parallel if (items > 1 && a.numel > kBlock) reduction(|| : failed)
    {
        const size_t acc_n = size_t(npairs) * kGramLanes * size_t(kind == kGroupColumn ? cols : 1);
        float* vb = static_cast<float*>(malloc(sizeof(float) * size_t(n) * kBlock));
        double* acc = static_cast<double*>(malloc(sizeof(double) * acc_n));
        const bool ok = vb && acc;
        failed = !ok;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            if (!ok) continue;
            const int64_t u = it / cps, c = it % cps;
            const int64_t q0 = c * kGramChunk;
            const int64_t q1 = seq_len - q0 < kGramChunk ? seq_len : q0 + kGramChunk;
            double* pi = part + size_t(it) * size_t(per_item);
            if (kind == kGroupColumn) {
                const int64_t g0 = u * cols;
                const int w = int(C - g0 < cols ? C - g0 : cols);
                gram_columns(t, a, g0, w, cols, q0, q1, npairs, vb, acc, pi);
            } else {
                gram_contiguous(t, a, u * C * (kind == kGroupRow) + q0, q1 - q0, npairs, vb, acc, pi);
            }
        }
        free(acc);
        free(vb);
    }
    if (!failed) {
        for (int64_t g = 0; g < groups; ++g) {
            double* o = out + size_t(g) * size_t(n) * size_t(n);
            // item and offset of group g's chunk c
            const int64_t u = kind == kGroupColumn ? g / cols : g;
            const int64_t off = kind == kGroupColumn ? (g % cols) * npairs : 0;
            int p = 0;
            for (int i = 0; i < n; ++i)
                for (int k = i; k < n; ++k, ++p) {
                    double s = 0.0;
                    for (int64_t c = 0; c < cps; ++c)
                        s = s + part[size_t(u * cps + c) * size_t(per_item) + size_t(off + p)];
                    o[size_t(i) * n + k] = s;
                    o[size_t(k) * n + i] = s;
                }
        }
    }
    free(part);
    return !failed;
}
