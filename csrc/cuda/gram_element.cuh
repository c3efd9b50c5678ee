// Stage A gram matrices (host + device): Σ v_i * v_k per group in float64, in the fixed order of
// docs/KERNEL.md.
//
// v_i = f32(x_i) - b (float32; b = 0 without a base), the delta before DARE and trim. A group is the
// whole tensor, one row (row_len consecutive elements) or one column (elements g, g + C, g + 2C, ...);
// its positions are cut into chunks of kGramChunk; position q adds into lane q % kGramLanes, each lane
// summed in position order; a chunk's value is its lanes added in lane order; the host adds the chunk
// values of a group in chunk order. One work unit is one (group, chunk); thread (i, lane) of a unit
// owns the lane sums of row i of the upper triangle, so every sum has one fixed sequence of float64
// additions whatever the grid (and the host emulation runs the same functions).
#pragma once

#include <cstdint>

#include "chunk_io.cuh"
#include "m3k_common.cuh"
#include "merge_args.h"

namespace m3k {

constexpr int kGramLanes = 16;
constexpr int64_t kGramChunk = 65536;

struct GramShape {
    int64_t groups;    // 1 (tensor), numel / row_len (rows) or row_len (columns)
    int64_t len;       // positions per group
    int64_t g_stride;  // element of (g, q) = g * g_stride + q * q_stride
    int64_t q_stride;
    int64_t chunks;  // chunks per group
    M3K_HD int64_t units() const { return groups * chunks; }
};

inline GramShape gram_shape(const MergeArgs& a) {
    GramShape s{};
    const int64_t C = a.row_len;
    if (a.coef_group == kGroupRow) {
        s = GramShape{a.numel / C, C, C, 1, 0};
    } else if (a.coef_group == kGroupColumn) {
        s = GramShape{C, a.numel / C, 1, C, 0};
    } else {
        s = GramShape{1, a.numel, 0, 1, 0};
    }
    s.chunks = (s.len + kGramChunk - 1) / kGramChunk;
    return s;
}

// Thread (i, lane) of work unit `unit`: acc[k] = lane sum of v_i * v_k for k = i .. n-1.
template <int NMAX>
M3K_HD void gram_lane(const MergeArgs& a, const GramShape& s, int64_t unit, int i, int lane,
                      double (&acc)[NMAX]) {
#pragma unroll
    for (int k = 0; k < NMAX; ++k) acc[k] = 0.0;
    const int64_t g = unit / s.chunks, c = unit - g * s.chunks;
    const int64_t q_end = (c + 1) * kGramChunk < s.len ? (c + 1) * kGramChunk : s.len;
    // Unrolled so that several iterations' loads are in flight (a chunk is 4096 dependent additions
    // per lane, so the loop is load-latency bound); the additions keep their order.
#pragma unroll(NMAX <= 4 ? 8 : 2)
    for (int64_t q = c * kGramChunk + lane; q < q_end; q += kGramLanes) {
        const int64_t e = g * s.g_stride + q * s.q_stride;
        const float b = a.has_base ? load_one(a.base, a.base_dtype, e) : 0.0f;
        const double vi = fsub(load_one(a.models[i], a.model_dtype[i], e), b);
#pragma unroll
        for (int k = 0; k < NMAX; ++k) {
            if (k >= i && k < a.n) {
                const double vk = k == i ? vi : fsub(load_one(a.models[k], a.model_dtype[k], e), b);
                acc[k] = dadd(acc[k], dmul(vi, vk));
            }
        }
    }
}

// lanes[(i * n + k) * kGramLanes + lane] holds the lane sums of a unit; entry t = i * n + k (k >= i)
// of the unit's value is its lanes added in lane order.
M3K_HD double gram_lanes_sum(const double* lanes, int t) {
    double v = 0.0;
    for (int l = 0; l < kGramLanes; ++l) v = dadd(v, lanes[t * kGramLanes + l]);
    return v;
}

}  // namespace m3k
