// The fused kernels (stage A statistics, stage B merge) for one instruction-set variant.
//
// Included by variant_generic.cpp, variant_avx2.cpp and variant_avx512.cpp, each after its
// `#pragma GCC target(...)` and with M3K_VARIANT naming a private namespace, so the same source
// compiles three times without ODR clashes. It instantiates no std:: template (those would be
// shared between variants): plain loops, GCC vector extensions, C library calls, and the
// intrinsics the variant enables through M3K_HAVE_AVX2 / M3K_HAVE_F16C / M3K_HAVE_AVX512 (g++
// does not update __AVX2__ etc. after `#pragma GCC target`).
//
// Each element is read once per pass and, in stage B, written once: a block of kBlock elements
// gets its Philox words (one buffer per DARE model), then W-lane vectors run the whole
// per-element pipeline of docs/KERNEL.md in registers (inputs converted on load, the output
// rounded on store). Blocks are independent and the per-lane arithmetic is the same on every
// variant, so any OpenMP thread count and any variant give identical bytes.

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

#include "philox_simd.h"
#include "simd_vec.h"

constexpr int64_t kBlock = 1024;                  // elements per block (multiple of 16)
constexpr int64_t kL1Chunk = 1 << 16;             // L1 sums: fixed chunk (multiple of kBlock)
constexpr int kL1Lanes = 16;                      // L1 sums: float64 accumulators per chunk
constexpr int64_t kHistRound = int64_t(1) << 31;  // per-thread uint32 counts stay exact
constexpr int kBins = 1 << 16;
constexpr int kHistCopies = 4;  // per-thread copies of each histogram: 4 independent
                                // increment chains when many elements share a bin

// ---------------------------------------------------------------- per-model plan

// What the sparsify step does for one model, decided once per tensor.
struct ModelPlan {
    int dare;          // 0 off, 1 keep iff u32 <= dare_le, 2 drop everything (density 0)
    uint32_t dare_le;  // thr - 1 (thr = 2^32 keeps everything)
    float dare_scale;
    int trim;  // 0 off, 1 keep iff bits(|d|) >= trim_min, 2 keep nothing, 3 the window: keep iff
               // trim_min <= bits(|d|) <= trim_max
    uint32_t trim_min;
    uint32_t trim_max;
    int div;  // dare_div: a kept d is d / dare_den rounded to the input dtype
    float dare_den;
    PhiloxKeys key;
};

static void make_plan(const TensorArgs& a, int i, ModelPlan& p) {
    p.dare = 0;
    p.dare_le = 0;
    p.dare_scale = a.dare_scale[i];
    p.div = a.dare_div && a.dare_den && a.dare[i];
    p.dare_den = a.dare_den ? a.dare_den[i] : 1.0f;
    if (a.dare[i]) {
        const uint64_t thr = a.dare_thr[i];
        if (thr == 0) {
            p.dare = 2;
        } else {
            p.dare = 1;
            p.dare_le = uint32_t((thr > (uint64_t(1) << 32) ? (uint64_t(1) << 32) : thr) - 1u);
        }
    }
    const uint64_t tm = a.trim_min ? a.trim_min[i] : 0;
    const uint64_t tx = a.trim_max ? a.trim_max[i] : 0xffffffffull;
    p.trim = tm == 0 ? 0 : (tm > 0xffffffffull ? 2 : 1);
    if (p.trim != 2 && tx < 0x7fffffffull) p.trim = 3;  // bits(|d|) <= 0x7fffffff: a real bound
    p.trim_min = uint32_t(p.trim == 2 ? 0 : tm);
    p.trim_max = uint32_t(tx < 0x7fffffffull ? tx : 0x7fffffffull);
    p.key = philox_keys(a.key0[i], a.key1[i]);
}

static ModelPlan* make_plans(const TensorArgs& a) {
    ModelPlan* plans = static_cast<ModelPlan*>(malloc(sizeof(ModelPlan) * size_t(a.n)));
    if (plans)
        for (int i = 0; i < a.n; ++i) make_plan(a, i, plans[i]);
    return plans;
}

// What stage B needs of one model, copied into a local array of the block loop: the compiler
// then knows the output stores cannot change it and keeps it in registers.
struct ModelIn {
    const void* src;
    int dtype;
    int dare;
    int trim;
    uint32_t dare_le;
    uint32_t trim_min;
    uint32_t trim_max;
    float dare_scale;
    float coef;
    float vote_w;
    float unique_scale;  // ram
    const uint32_t* u;
    // round 2 (read only by the EXT paths): dare_div, the keep mask, ties' agreement weight
    int div;
    float dare_den;
    const uint8_t* mask;  // model i's keep mask (bit J = index_offset + g); nullptr: none
    int64_t mask_off;     // index_offset
    float mask_scale;     // 1 without a mask
    float agree_w;
    // what the EXT loop reads (branch-free): byte (J >> 3) & mask_and of mask_bytes; without a
    // mask, byte 0 of an all-ones row (mask_and 0), so every lane is kept and d * 1.0f == d
    const uint8_t* mask_bytes;
    int64_t mask_and;
};

// The keep-mask row of a model without a mask (ModelIn.mask_bytes, mask_and 0: only byte 0 .. 7 read).
alignas(8) static const uint8_t kMaskAllOnes[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

// Model i's inputs for one block (u: its Philox words; trim = false in stage A).
static inline ModelIn model_in(const TensorArgs& a, const ModelPlan& p, int i, const uint32_t* u, bool trim) {
    return ModelIn{a.models[i],
                   a.model_dtypes[i],
                   p.dare,
                   trim ? p.trim : 0,
                   p.dare_le,
                   p.trim_min,
                   p.trim_max,
                   p.dare_scale,
                   a.coef[i],
                   a.vote_w[i],
                   a.unique_scale ? a.unique_scale[i] : 1.0f,
                   u,
                   p.div,
                   p.dare_den,
                   a.keep_mask ? a.keep_mask + size_t(i) * size_t(a.mask_stride) : nullptr,
                   a.index_offset,
                   a.keep_mask && a.mask_scale ? a.mask_scale[i] : 1.0f,
                   a.agree_w ? a.agree_w[i] : 1.0f,
                   a.keep_mask ? a.keep_mask + size_t(i) * size_t(a.mask_stride) : kMaskAllOnes,
                   a.keep_mask ? int64_t(-1) : int64_t(0)};
}

// True when model_delta must run its round-2 steps (the keep mask, dare_div) for this model.
static inline bool model_ext(const ModelIn& m) {
    return m.mask != nullptr || m.div;
}

// True when any model of the tensor needs the round-2 steps of model_delta.
static inline bool tensor_ext(const TensorArgs& a) {
    if (a.keep_mask) return true;
    if (!a.dare_div || !a.dare_den) return false;
    for (int i = 0; i < a.n; ++i)
        if (a.dare[i]) return true;
    return false;
}

// ---------------------------------------------------------------- per-thread scratch

struct Scratch {
    uint32_t* u;            // [n][kBlock + kPhiloxSlack] Philox words of the current block
    const uint32_t** uptr;  // [n] start of model i's words for the block (after the skip)
    vf* dv;                 // [n] TIES: the deltas of the current vector
    ModelIn* mi;            // [n] stage B: per-model inputs (models beyond the unrolled counts)
    uint32_t* keys;         // [kBlock] histograms: bits(|d|) of one model
    float* ad;              // [kBlock] L1 sums: |d|
    float* kd;              // [kBlock] L1 sums: |d| where kept
    void* mem;
};

static bool scratch_alloc(Scratch& s, int n) {
    const size_t ubytes = sizeof(uint32_t) * size_t(n) * size_t(kBlock + kPhiloxSlack);
    const size_t vbytes = (sizeof(vf) + sizeof(ModelIn) + 63) / 64 * 64 * size_t(n);
    const size_t ibytes = sizeof(uint32_t) * size_t(3 * kBlock);
    const size_t pbytes = sizeof(const uint32_t*) * size_t(n);
    size_t bytes = vbytes + ubytes + ibytes + pbytes;
    bytes = (bytes + 63) & ~size_t(63);
    char* m = static_cast<char*>(aligned_alloc(64, bytes));
    s.mem = m;
    if (!m) return false;
    s.dv = reinterpret_cast<vf*>(m);
    s.mi = reinterpret_cast<ModelIn*>(m + sizeof(vf) * size_t(n));
    s.u = reinterpret_cast<uint32_t*>(m + vbytes);
    s.keys = reinterpret_cast<uint32_t*>(m + vbytes + ubytes);
    s.ad = reinterpret_cast<float*>(s.keys + kBlock);
    s.kd = s.ad + kBlock;
    s.uptr = reinterpret_cast<const uint32_t**>(m + vbytes + ubytes + ibytes);
    return true;
}

// Philox words of every DARE model for elements [start, start + cnt) of the tensor.
static void block_philox(const TensorArgs& a, const ModelPlan* plans, int64_t start, int64_t cnt,
                         Scratch& s) {
    for (int i = 0; i < a.n; ++i) {
        s.uptr[i] = nullptr;
        if (plans[i].dare == 1)
            s.uptr[i] = philox_block(plans[i].key, uint64_t(a.index_offset + start), cnt,
                                     s.u + size_t(i) * size_t(kBlock + kPhiloxSlack));
    }
}

// ---------------------------------------------------------------- the block grid

// The blocks of a pass over elements [lo, hi). Passes whose result does not depend on where
// blocks begin (stage B's elementwise merge, stage A's integer counts; not the float64 L1 sums,
// the Gram sums or the exact-k tie blocks) start them where the first input (the base, else model
// 0) is on a cache line: block 0 is [lo, lo + head), then kBlock elements each. Safetensors data
// is only 8-byte aligned; an input 16 bytes past a line splits every other 32-byte bf16 load,
// about 10% of such a pass on the machine of bench/RESULTS.md (issue 7). Inputs of one checkpoint
// family share their phase, so one choice aligns them all.
constexpr int64_t kLine = 64;

struct BlockGrid {
    int64_t lo, hi, head, nblocks;
    inline __attribute__((always_inline)) void at(int64_t bi, int64_t& start, int64_t& cnt) const {
        if (head > 0 && bi == 0) {
            start = lo;
            cnt = head;
            return;
        }
        start = lo + head + (head > 0 ? bi - 1 : bi) * kBlock;
        cnt = hi - start < kBlock ? hi - start : kBlock;
    }
};

// kBlock blocks from lo (the fixed grid).
static inline BlockGrid fixed_grid(int64_t lo, int64_t hi) {
    return BlockGrid{lo, hi, 0, (hi - lo + kBlock - 1) / kBlock};
}

static inline BlockGrid line_grid(const TensorArgs& a, int64_t lo, int64_t hi) {
    const void* ref = a.has_base ? a.base : (a.n > 0 ? a.models[0] : nullptr);
    if (ref == nullptr || hi - lo <= 4 * kBlock) return fixed_grid(lo, hi);
    const int64_t size = (a.has_base ? a.base_dtype : a.model_dtypes[0]) == kF32 ? 4 : 2;
    const int64_t mis = int64_t((reinterpret_cast<uintptr_t>(ref) + uintptr_t(lo * size)) % uintptr_t(kLine));
    if (mis == 0 || mis % size != 0) return fixed_grid(lo, hi);
    const int64_t head = (kLine - mis) / size;
    return BlockGrid{lo, hi, head, 1 + (hi - lo - head + kBlock - 1) / kBlock};
}

// ---------------------------------------------------------------- the per-element pipeline

// The model loops of stage B: fully unrolled when the model count is a compile-time constant
// (NM > 0; GCC otherwise keeps some EXT instances rolled, with the per-model state in memory).
#define M3K_UNROLL _Pragma("GCC unroll 4")

// The model's Philox words for block positions [k, k + W) (lanes past rem are 0 when PARTIAL).
template <bool PARTIAL>
M3K_INLINE vu dare_words(const ModelIn& m, int64_t k, int rem) {
    if (!PARTIAL) return load_u32(m.u + k);
    vu uu = vu{};
    for (int l = 0; l < rem; ++l) uu[l] = m.u[k + l];
    return uu;
}

// The keep-mask bits of flat indices J .. J + W - 1 (J = mask_off + g; bits past rem are 0):
// bit J at byte J >> 3, LSB first; only the bytes of the lanes in use are read. Branch-free in
// the mask (a model without one reads its all-ones row); J & 7 is the same for every vector of a
// block on the AVX2 / AVX-512 variants (W a multiple of 8), so its branch is predicted.
template <bool PARTIAL>
M3K_INLINE uint32_t mask_bits(const ModelIn& m, int64_t g, int rem) {
    const int64_t J = m.mask_off + g;
    if (!PARTIAL && W >= 8 && (J & 7) == 0) {  // byte-aligned (index_offset % 8 == 0): W / 8 bytes
        uint16_t w = 0;
        __builtin_memcpy(&w, m.mask_bytes + ((J >> 3) & m.mask_and), W / 8);
        return w;
    }
    const int64_t b0 = J >> 3, b1 = (J + (PARTIAL ? rem : W) - 1) >> 3;
    uint64_t word = 0;
    for (int64_t q = b0; q <= b1; ++q) word |= uint64_t(m.mask_bytes[q & m.mask_and]) << (8 * (q - b0));
    const uint32_t bits = uint32_t(word >> (J & 7));
    return bits & (PARTIAL ? (1u << rem) - 1u : uint32_t((uint64_t(1) << W) - 1u));
}

// bits l set: a, else 0 (per lane; AVX-512: one zero-masking move, no vector mask built).
M3K_INLINE vf vsel_bits_zero(uint32_t bits, vf a) {
#if M3K_HAVE_AVX512
    return (vf)_mm512_maskz_mov_ps(__mmask16(bits), (__m512)a);
#else
    return vsel(lanes_of(bits), a, vf{});
#endif
}

// What stage B knows at compile time (merge_block's PL; pick_plan picks it per tensor). The model
// plan (PL & 3): kPlRun nothing (ModelIn.dare / .trim read per vector), kPlTrim dare 0 and trim
// 1 for every model, kPlNoTrim dare 0 and trim 0 (sums; the keep-mask methods). Flags: kPlTies,
// TIES with a base, normalised, den_pow2 2 (mergekit's TIES, della); kPlCvt, bf16 output through
// AVX512_BF16's conversion (store_bf16_cvt; the AVX-512 variant on CPUs that have it). The
// run-time tests are predicted branches, but a dozen of them per vector, and they made GCC lay
// the trim and the division out of line, rematerialising constants there.
enum PlanKind : int { kPlRun = 0, kPlTrim = 1, kPlNoTrim = 2, kPlCvt = 4, kPlTies = 8 };

constexpr int plan_of(int pl) {
    return pl & 3;
}

// d_i = f32(x_i) - b, the DARE drop and rescale, and the magnitude trim (m.trim = 0 in stage A)
// for elements [g, g + W) of the tensor; k is g's position in the block (Philox words). EXT
// adds dare_div (a kept d divided by dare_den, rounded to the input dtype; a per-model branch
// inside the DARE one), MASK the keep mask (right after the DARE step, before the trim; no
// branch: without a mask the model reads an all-ones row with mask_scale 1, and d * 1.0f == d);
// without them these steps are absent. A per-vector branch on the mask made GCC spill the
// unrolled loop's state: the masked TIES pass ran at half speed.
template <bool PARTIAL, int DT = -1, bool EXT = false, bool MASK = EXT, int PL = kPlRun>
M3K_INLINE vf model_delta(const ModelIn& m, int64_t g, int64_t k, int rem, vf b) {
    constexpr int P = plan_of(PL);
    if (P == kPlRun && (m.dare == 2 || m.trim == 2)) return vf{};
    const int dtype = DT >= 0 ? DT : m.dtype;
    const vf x = PARTIAL ? load_vec_partial(m.src, dtype, g, rem) : load_vec(m.src, dtype, g);
    vf d = x - b;
    if (P == kPlRun && m.dare == 1) {
        const vi keep = dare_words<PARTIAL>(m, k, rem) <= m.dare_le;
        if (EXT && m.div)
            d = vsel(keep, round_to(dtype, d / vsplat(m.dare_den)), vf{});
        else
            d = vsel(keep, d * vsplat(m.dare_scale), vf{});
    }
    if (MASK) d = vsel_bits_zero(mask_bits<PARTIAL>(m, g, rem), d * vsplat(m.mask_scale));
    if (P == kPlTrim || (P == kPlRun && m.trim == 1)) d = vsel(((vu)d & 0x7fffffffu) >= m.trim_min, d, vf{});
    if (P == kPlRun && m.trim == 3) {
        const vu ab = (vu)d & 0x7fffffffu;
        d = vsel((ab >= m.trim_min) & (ab <= m.trim_max), d, vf{});
    }
    return d;
}

// True when the TIES combine needs one of the round-2 variants (agree_w, vote_kind, ties_div,
// den_floor): ties_combine_ext instead of ties_combine.
static inline bool ties_ext(const TensorArgs& a) {
    if (a.combine != kTies) return false;
    if (a.vote_kind != 0 || a.ties_div != 0 || (a.normalize && a.den_floor > 0.0f)) return true;
    for (int i = 0; a.agree_w && i < a.n; ++i)
        if (a.agree_w[i] != 1.0f) return true;
    return false;
}

// The per-tensor scalars, copied like ModelIn.
struct TensorIn {
    const void* base;
    int base_dtype;
    int has_base;
    int combine;
    int normalize;
    float lam;
    float mean_den;
    // issue 8: coefficient groups (gct = group_coef transposed to [n][groups]), nearswap, ram
    int coef_group;
    int64_t row_len;
    int64_t groups;
    const float* gct;
    int64_t index_offset;
    float clip_t;
    float ram_eps;
    // round 2: the TIES variants (ties_combine_ext)
    int vote_kind;
    int ties_div;
    float den_floor;
    int ties_ext;  // ties_ext(a): the TIES variants are in use
    int fma;       // sum / mean: fused multiply-add
    // divisions that are multiplications: num / x == num * (1 / x) bit for bit when x is a power
    // of two whose reciprocal is a normal float (both are the correctly rounded num * 2^-e), and a
    // vector division costs ~10 cycles (TIES bf16 stage B, N = 2, weights 1: a third of the pass)
    float mean_rcp;  // 1 / mean_den when mean_den is such a power of two, else 0 (divide)
    int den_pow2;    // every nonzero TIES divisor (Σ coef over a subset of the models) is one (2: none is 0)
};

// x a positive power of two 2^e with -126 <= e <= 126 (x and 1 / x both normal floats).
static inline bool pow2_with_rcp(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, sizeof(u));
    const uint32_t e = u >> 23;  // the sign bit above the biased exponent: negative x fails
    return (u & 0x7fffffu) == 0 && e >= 1 && e <= 253;
}

// 1 when every nonzero Σ coef[i] over a subset of the models, summed in model order as the TIES
// combines do, is pow2_with_rcp, 2 when moreover no nonempty subset sums to 0 (N <= 5; else 0:
// divide).
static inline int ties_den_pow2(const TensorArgs& a) {
    if (a.n <= 0 || a.n > 5) return 0;
    int zero = 0;
    for (uint32_t set = 1; set < (1u << a.n); ++set) {
        float den = 0.0f;
        for (int i = 0; i < a.n; ++i)
            if ((set >> i) & 1u) den = den + a.coef[i];
        if (den == 0.0f) zero = 1;
        if (den != 0.0f && !pow2_with_rcp(den)) return 0;
    }
    return zero ? 1 : 2;
}

static inline TensorIn tensor_in(const TensorArgs& a, const float* gct = nullptr) {
    const int tied = a.combine == kTies && a.normalize;
    return TensorIn{a.base,
                    a.base_dtype,
                    a.has_base,
                    a.combine,
                    a.normalize,
                    a.lam,
                    a.mean_den,
                    a.coef_group,
                    a.row_len,
                    a.groups,
                    gct,
                    a.index_offset,
                    a.clip_t,
                    a.ram_eps,
                    a.vote_kind,
                    a.ties_div,
                    a.den_floor,
                    ties_ext(a) ? 1 : 0,
                    a.fma ? 1 : 0,
                    pow2_with_rcp(a.mean_den) ? 1.0f / a.mean_den : 0.0f,
                    tied ? ties_den_pow2(a) : 0};
}

// 1 / x for lanes holding a pow2_with_rcp x (an integer subtraction: the exponent negated).
M3K_INLINE vf vrcp_pow2(vf x) {
    return (vf)(0x7f000000u - (vu)x);
}

// acc / mean_den (the mean's division; a multiplication when that is the same).
M3K_INLINE vf mean_of(const TensorIn& t, vf acc) {
    return t.mean_rcp != 0.0f ? acc * vsplat(t.mean_rcp) : acc / vsplat(t.mean_den);
}

// Base of elements [g, g + W) (zeros without a base; rem lanes when PARTIAL).
template <bool PARTIAL, int DT = -1, bool HAS_BASE = false>  // HAS_BASE: known to have one
M3K_INLINE vf base_vec(const TensorIn& t, int64_t g, int rem) {
    if (!HAS_BASE && !t.has_base) return vf{};
    const int dtype = DT >= 0 ? DT : t.base_dtype;
    return PARTIAL ? load_vec_partial(t.base, dtype, g, rem) : load_vec(t.base, dtype, g);
}

// Row and column of the vector's lane 0 (flat index J = index_offset + g: row J / C, column J % C),
// advanced vector by vector (no division per vector).
struct GroupPos {
    int64_t row;
    int64_t col;
};

M3K_INLINE GroupPos group_pos(const TensorIn& t, int64_t J) {
    if (t.coef_group == kGroupNone) return GroupPos{0, 0};
    return GroupPos{J / t.row_len, J % t.row_len};
}

M3K_INLINE void group_advance(const TensorIn& t, GroupPos& gp, int step) {
    const int64_t C = t.row_len;
    gp.col += step;
    if (gp.col < C) return;
    if (C >= step) {
        gp.col -= C;
        ++gp.row;
    } else {
        gp.row += gp.col / C;
        gp.col %= C;
    }
}

// Model i's coefficients of the vector's lanes: group_coef through the transposed table (row:
// group = row, column: group = column).
template <bool PARTIAL>
M3K_INLINE vf group_coef_vec(const TensorIn& t, const GroupPos& gp, int i, int rem) {
    const float* tab = t.gct + size_t(i) * size_t(t.groups);
    const int64_t C = t.row_len;
    const bool by_row = t.coef_group == kGroupRow;
    vf c = vf{};
    if (gp.col + rem <= C) {  // all lanes in one row
        if (by_row) return vsplat(tab[gp.row]);
        if (!PARTIAL) {
            __builtin_memcpy(&c, tab + gp.col, sizeof(c));
        } else {
            for (int l = 0; l < rem; ++l) c[l] = tab[gp.col + l];
        }
        return c;
    }
    int64_t r = gp.row, q = gp.col;
    for (int l = 0; l < rem; ++l) {
        c[l] = tab[by_row ? r : q];
        if (++q == C) {
            q = 0;
            ++r;
        }
    }
    return c;
}

// TIES on the deltas dv[0..n): the sign of Σ vote_w·d elected (>= 0: +; the user weights only),
// then Σ coef·d over the models whose nonzero d has it, divided by Σ coef over them when
// normalising (0 where none agrees). Shared by merge_vec and merge_vec_ties.
//
// The same bits as docs/KERNEL.md's program, in fewer operations (a third of the TIES pass was
// the agreement test):
// - the vote starts from the first term, not from 0 + it: the sums differ at most in the sign
//   of a zero, and -0 >= 0 like +0;
// - d agrees iff !(d ^ flip <= 0), flip the sign bit when the elected sign is -: d ^ flip is d
//   or -d exactly, so this is "d nonzero with the elected sign", or d NaN. A NaN d makes the vote
//   NaN (vote_w·NaN is NaN), hence the sign -, where the program's test (d != 0) & ((d > 0) ==
//   pos) also lets a NaN d agree;
// - den_pow2 2 (no subset of the coefs sums to 0): den == 0 only where none agrees, and there
//   num is +0, and +0 · vrcp_pow2(+0) = +0 · 2^127 = +0, the program's 0: no select.
template <bool P2 = false>  // P2: normalise with den_pow2 2 (kPlTies), known at compile time
M3K_INLINE vf ties_combine(const TensorIn& t, const ModelIn* mi, const vf* dv, int n) {
    if (n <= 0) return vf{};
    vf vote = vsplat(mi[0].vote_w) * dv[0];
    M3K_UNROLL
    for (int i = 1; i < n; ++i) vote = vote + vsplat(mi[i].vote_w) * dv[i];
    const vu flip = (vu)vsel(vote >= vf{}, vf{}, vsplat(-0.0f));
    vf num = vf{}, den = vf{};
    M3K_UNROLL
    for (int i = 0; i < n; ++i) {
        const vf d = dv[i];
        const vf c = vsplat(mi[i].coef);
        const vi agree = ~((vf)((vu)d ^ flip) <= vf{});
        num = vsel(agree, num + c * d, num);
        den = vsel(agree, den + c, den);
    }
    if (P2) return num * vrcp_pow2(den);
    if (!t.normalize) return num;
    if (t.den_pow2 == 2) return num * vrcp_pow2(den);
    return vsel(den != vf{}, t.den_pow2 ? num * vrcp_pow2(den) : num / den, vf{});
}

// sgn(x): 1, -1 or 0 (NaN: 0), as float32.
M3K_INLINE vf vsgn(vf x) {
    return vsel(x > vf{}, vsplat(1.0f), vsel(x < vf{}, vsplat(-1.0f), vf{}));
}

// TIES with the round-2 variants (docs/KERNEL.md combine 2): the vote by weighted sum (vote_kind
// 0) or by count (1: Σ sgn(vote_w·d)); agreement by the sign of agree_w·d; the disjoint sum divided
// by Σ agreeing coef (ties_div 0; den_floor > 0: by max(den, den_floor)) or by the agreeing count
// (ties_div 1: non-agreeing terms multiplied by 0, so an inf / NaN one still poisons num).
M3K_INLINE vf ties_combine_ext(const TensorIn& t, const ModelIn* mi, const vf* dv, int n) {
    vf vote = vf{};
    if (t.vote_kind == 0) {
        M3K_UNROLL
        for (int i = 0; i < n; ++i) vote = vote + vsplat(mi[i].vote_w) * dv[i];
    } else {
        M3K_UNROLL
        for (int i = 0; i < n; ++i) vote = vote + vsgn(vsplat(mi[i].vote_w) * dv[i]);
    }
    const vi pos = vote >= vf{};
    vf num = vf{};
    if (t.ties_div == 1) {
        const vf want = vsel(pos, vsplat(1.0f), vsplat(-1.0f));
        vf cnt = vf{};
        M3K_UNROLL
        for (int i = 0; i < n; ++i) {
            const vf d = dv[i];
            const vi agree = vsgn(vsplat(mi[i].agree_w) * d) == want;
            const vf one = vsel(agree, vsplat(1.0f), vf{});
            num = num + (vsplat(mi[i].coef) * d) * one;
            cnt = cnt + one;
        }
        const vf c1 = vsplat(1.0f);
        return num / vsel(cnt < c1, c1, cnt);
    }
    vf den = vf{};
    M3K_UNROLL
    for (int i = 0; i < n; ++i) {
        const vf d = dv[i];
        const vf e = vsplat(mi[i].agree_w) * d;
        const vf c = vsplat(mi[i].coef);
        const vi agree = (e != vf{}) & ((e > vf{}) == pos);
        num = vsel(agree, num + c * d, num);
        den = vsel(agree, den + c, den);
    }
    if (!t.normalize) return num;
    if (t.den_floor > 0.0f) {
        const vf fl = vsplat(t.den_floor);
        return num / vsel(den < fl, fl, den);
    }
    return vsel(den != vf{}, t.den_pow2 ? num * vrcp_pow2(den) : num / den, vf{});
}

// Combine classes of merge_vec (compile time): 0 sum / mean / ties (p.combine at run time), 1 sum /
// mean with group coefficients, 2 nearswap, 3 ram; round 2: 4 and 5 are 0 and 1 with the fused
// multiply-add (sum / mean only), 6 ties with its variants (ties_combine_ext).
enum CombineClass : int {
    kCbPlain = 0,
    kCbGroup = 1,
    kCbNearswap = 2,
    kCbRam = 3,
    kCbPlainFma = 4,
    kCbGroupFma = 5,
    kCbTiesExt = 6
};

// Stage B for elements [g, g + W): combine, scale, add, round, store. NM > 0 fixes the number
// of models at compile time (loops unrolled, deltas in registers); NM = 0 reads it from n.
// DT >= 0: base, every model and the output have that dtype (no per-vector dtype branches).
// EXT, MASK: model_delta's round-2 steps (dare_div; the keep mask).
template <int NM, int DT, bool PARTIAL, int CB = kCbPlain, bool EXT = false, bool MASK = EXT, int PL = kPlRun>
M3K_INLINE vf merge_y(const TensorIn& t, const ModelIn* mi, int n, vf* dv, int64_t g, int64_t k, int rem,
                      const GroupPos& gp) {
    if (NM > 0) n = NM;
    const vf b = base_vec<PARTIAL, DT, (PL & kPlTies) != 0>(t, g, rem);
    vf m;
    vf y0;
    if (PL & kPlTies) {
        M3K_UNROLL
        for (int i = 0; i < n; ++i) dv[i] = model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b);
        m = ties_combine<true>(t, mi, dv, n);
    } else if (CB == kCbNearswap) {  // model 0 itself, no DARE / trim (docs/KERNEL.md, combine 3)
        const int dtype = DT >= 0 ? DT : mi[0].dtype;
        const vf x = PARTIAL ? load_vec_partial(mi[0].src, dtype, g, rem) : load_vec(mi[0].src, dtype, g);
        vf dist = vabs(b - x);
        const vf eps = vsplat(1e-6f);
        dist = vsel(dist < eps, eps, dist);               // max(dist, 1e-6f); NaN stays NaN
        vf w = (vsplat(1.0f) / dist) * vsplat(t.clip_t);  // torch's t / dist: f32(1 / dist) * t
        w = vsel(w < vf{}, vf{}, w);                      // max(w, 0)
        const vf one = vsplat(1.0f);
        w = vsel(w > one, one, w);  // min(w, 1)
        y0 = w * x + (one - w) * b;
    } else if (CB == kCbRam) {
        const vf eps = vsplat(t.ram_eps);
        vf c = vf{};
        M3K_UNROLL
        for (int i = 0; i < n; ++i) {
            dv[i] = model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b);
            c = c + vsel(vabs(dv[i]) > eps, vsplat(1.0f), vf{});
        }
        const vi unique = c == vsplat(1.0f);
        vf acc = vf{};
        M3K_UNROLL
        for (int i = 0; i < n; ++i) {
            const vf d = dv[i];
            const vf term = vsel(unique, d * vsplat(mi[i].unique_scale), d / c);
            acc = vsel(vabs(d) > eps, acc + term, acc);
        }
        y0 = b + vsplat(t.lam) * acc;
    } else if (CB == kCbGroup || CB == kCbGroupFma) {
        vf acc = vf{};
        M3K_UNROLL
        for (int i = 0; i < n; ++i) {
            const vf c = group_coef_vec<PARTIAL>(t, gp, i, rem);
            const vf d = model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b);
            acc = CB == kCbGroupFma ? vfma(c, d, acc) : acc + c * d;
        }
        m = t.combine == kMean ? mean_of(t, acc) : acc;
        y0 = b + vsplat(t.lam) * m;
    } else if (CB == kCbTiesExt) {
        M3K_UNROLL
        for (int i = 0; i < n; ++i) dv[i] = model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b);
        m = ties_combine_ext(t, mi, dv, n);
    } else if (CB == kCbPlainFma) {
        vf acc = vf{};
        M3K_UNROLL
        for (int i = 0; i < n; ++i)
            acc = vfma(vsplat(mi[i].coef), model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b), acc);
        m = t.combine == kMean ? mean_of(t, acc) : acc;
    } else if (t.combine != kTies) {
        vf acc = vf{};
        M3K_UNROLL
        for (int i = 0; i < n; ++i)
            acc = acc + vsplat(mi[i].coef) * model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b);
        m = t.combine == kMean ? mean_of(t, acc) : acc;
    } else {
        M3K_UNROLL
        for (int i = 0; i < n; ++i) dv[i] = model_delta<PARTIAL, DT, EXT, MASK, PL>(mi[i], g, k, rem, b);
        m = ties_combine(t, mi, dv, n);
    }
    if (CB == kCbPlain || CB == kCbPlainFma || CB == kCbTiesExt) y0 = b + vsplat(t.lam) * m;
    return y0;
}

// merge_y stored (rounded to the output dtype, one canonical NaN: KERNEL.md).
template <int NM, int DT, bool PARTIAL, int CB = kCbPlain, bool EXT = false, bool MASK = EXT, int PL = kPlRun>
M3K_INLINE void merge_vec(const TensorIn& t, const ModelIn* mi, int n, vf* dv, int64_t g, int64_t k, int rem,
                          void* out, int out_dtype, const GroupPos& gp) {
    if (DT >= 0) out_dtype = DT;
    const vf y0 = merge_y<NM, DT, PARTIAL, CB, EXT, MASK, PL>(t, mi, n, dv, g, k, rem, gp);
    if (PARTIAL) store_vec_partial_canon(out, out_dtype, g, rem, y0);
#if M3K_HAVE_AVX512
    else if (PL & kPlCvt)
        store_bf16_cvt(out, g, y0);
#endif
    else
        store_vec_canon(out, out_dtype, g, y0);
}

// One block of stage B: elements [start, start + cnt) (merge_block below picks MASK).
template <int NM, int DT, int CB, bool EXT, bool MASK, int PL = kPlRun>
M3K_INLINE void merge_block_run(const TensorArgs& a, const ModelPlan* plans, const float* gct, int64_t start,
                                int64_t cnt, Scratch& s, void* out, int out_dtype) {
    block_philox(a, plans, start, cnt, s);
    const int n = NM > 0 ? NM : a.n;
    ModelIn local[NM > 0 ? NM : 1];
    ModelIn* mi = NM > 0 ? local : s.mi;
    for (int i = 0; i < n; ++i) mi[i] = model_in(a, plans[i], i, s.uptr[i], true);
    const TensorIn t = tensor_in(a, gct);
    vf dv_local[NM > 0 ? NM : 1];
    vf* dv = NM > 0 ? dv_local : s.dv;
    const int64_t full = cnt / W * W;
    if ((CB == kCbGroup || CB == kCbGroupFma) && t.coef_group == kGroupRow) {
        constexpr int CP = CB == kCbGroupFma ? kCbPlainFma : kCbPlain;
        // a block inside one row (the usual case): its coefficients are constants, the plain loop
        const int64_t J = a.index_offset + start;
        const int64_t row = J / t.row_len;
        if ((J + cnt - 1) / t.row_len == row) {
            for (int i = 0; i < n; ++i) mi[i].coef = gct[size_t(i) * size_t(t.groups) + size_t(row)];
            const GroupPos none{0, 0};
            for (int64_t k = 0; k < full; k += W)
                merge_vec<NM, DT, false, CP, EXT, MASK, PL>(t, mi, n, dv, start + k, k, W, out, out_dtype,
                                                            none);
            if (full < cnt)
                merge_vec<NM, DT, true, CP, EXT, MASK, PL>(t, mi, n, dv, start + full, full, int(cnt - full),
                                                           out, out_dtype, none);
            return;
        }
    }
    constexpr bool grouped = CB == kCbGroup || CB == kCbGroupFma;
    GroupPos gp = grouped ? group_pos(t, a.index_offset + start) : GroupPos{0, 0};
    for (int64_t k = 0; k < full; k += W) {
        merge_vec<NM, DT, false, CB, EXT, MASK, PL>(t, mi, n, dv, start + k, k, W, out, out_dtype, gp);
        if (grouped) group_advance(t, gp, W);
    }
    if (full < cnt)
        merge_vec<NM, DT, true, CB, EXT, MASK, PL>(t, mi, n, dv, start + full, full, int(cnt - full), out,
                                                   out_dtype, gp);
}

// One block of stage B. EXT: the round-2 steps of model_delta, the keep mask branch-free (a model
// without one reads an all-ones row). dare_div without a mask (PEFT's DARE: sum and ties, few
// models) skips the mask step through one branch per block, a second copy of the loop for those
// instances only (build time; not in the generic variant); the other classes read the all-ones row.
// PL: a compile-time plan (kPl*, picked by pick_plan; with EXT the keep mask, as no model has DARE).
template <int NM, int DT, int CB, bool EXT, int PL = kPlRun>
static void merge_block(const TensorArgs& a, const ModelPlan* plans, const float* gct, int64_t start,
                        int64_t cnt, Scratch& s, void* out, int out_dtype) {
    constexpr bool div_copy = M3K_HAVE_AVX2 && EXT && NM > 0 && (CB == kCbPlain || CB == kCbTiesExt);
    if (PL != kPlRun)
        merge_block_run<NM, DT, CB, EXT, EXT, PL>(a, plans, gct, start, cnt, s, out, out_dtype);
    else if (div_copy && !a.keep_mask)
        merge_block_run<NM, DT, CB, EXT, false>(a, plans, gct, start, cnt, s, out, out_dtype);
    else
        merge_block_run<NM, DT, CB, EXT, EXT>(a, plans, gct, start, cnt, s, out, out_dtype);
}

// ---------------------------------------------------------------- stage B

// Stage B of one block with the exact-k tie rule (variant_ties.h, included at the end).
template <int DT>
static void merge_block_ties(const TensorArgs& a, const ModelPlan* plans, const float*, int64_t start,
                             int64_t cnt, Scratch& s, void* out, int out_dtype);

typedef void (*MergeBlockFn)(const TensorArgs&, const ModelPlan*, const float*, int64_t, int64_t, Scratch&,
                             void*, int);

template <int DT, int CB, bool EXT, int PL = kPlRun>
static MergeBlockFn pick_merge_block_nc(int n) {
    switch (n) {
        case 1:
            return merge_block<1, DT, CB, EXT, PL>;
        case 2:
            return merge_block<2, DT, CB, EXT, PL>;
        case 3:
            return merge_block<3, DT, CB, EXT, PL>;
        case 4:
            return merge_block<4, DT, CB, EXT, PL>;
        default:
            return merge_block<0, DT, CB, EXT>;  // no compile-time plan for the any-N loop
    }
}

// The compile-time plan (kPl*, without kPlCvt) of a tensor of combine class CB: N <= 4 models, all
// with dare 0 and one trim mode, 1 or 0 (stage B's plans), on the AVX2 / AVX-512 variants. The
// instances compiled: kCbPlain without EXT kPlTrim (+ kPlTies) and kPlNoTrim; kCbPlain with EXT
// (the keep mask) kPlNoTrim (+ kPlTies); kCbTiesExt kPlNoTrim. Else kPlRun.
static int pick_plan(const TensorArgs& a, const ModelPlan* plans, int cb, bool ext) {
    if (!M3K_HAVE_AVX2 || a.n < 1 || a.n > 4) return kPlRun;
    const int trim = plans[0].trim;
    for (int i = 0; i < a.n; ++i)
        if (plans[i].dare != 0 || plans[i].trim != trim) return kPlRun;
    if (trim != 0 && trim != 1) return kPlRun;
    const int model = trim == 1 ? kPlTrim : kPlNoTrim;
    if (cb == kCbTiesExt) return model == kPlNoTrim ? kPlNoTrim : kPlRun;
    if (cb != kCbPlain || (ext && model == kPlTrim)) return kPlRun;
    const bool ties = a.combine == kTies && a.normalize && a.has_base && ties_den_pow2(a) == 2;
    if (ties && (ext || model == kPlTrim)) return model | kPlTies;
    return ties ? kPlRun : model;  // ties without EXT and without a trim: the run-time plan
}

// The stage B instance of a compile-time plan (CVT: kPlCvt or 0), one of pick_plan's.
template <int DT, int CB, bool EXT, int CVT>
static MergeBlockFn pick_planned_nc(int n, int pl) {
    if constexpr (CB == kCbTiesExt) {
        return pick_merge_block_nc<DT, CB, EXT, kPlNoTrim | CVT>(n);
    } else if constexpr (EXT) {
        if (pl & kPlTies) return pick_merge_block_nc<DT, CB, EXT, kPlNoTrim | kPlTies | CVT>(n);
        return pick_merge_block_nc<DT, CB, EXT, kPlNoTrim | CVT>(n);
    } else {
        if (pl == kPlNoTrim) return pick_merge_block_nc<DT, CB, EXT, kPlNoTrim | CVT>(n);
        if (pl & kPlTies) return pick_merge_block_nc<DT, CB, EXT, kPlTrim | kPlTies | CVT>(n);
        return pick_merge_block_nc<DT, CB, EXT, kPlTrim | CVT>(n);
    }
}

// A compile-time plan's instance for a uniform dtype (DT >= 0), or nullptr: the run-time plan.
// bf16 on the AVX-512 variant: only with the AVX512_BF16 conversion (kPlCvt); on AVX-512 CPUs
// without it, bf16 runs the run-time plan (fewer instances to compile).
template <int DT, int CB, bool EXT>
static MergeBlockFn pick_planned(const TensorArgs& a, const ModelPlan* plans) {
    if constexpr (DT < 0 || !M3K_HAVE_AVX2) {
        return nullptr;
    } else {
        const int pl = pick_plan(a, plans, CB, EXT);
        if (pl == kPlRun) return nullptr;
        if constexpr (DT == kBF16 && M3K_HAVE_AVX512) {
            return cpu_has_bf16_cvt() ? pick_planned_nc<DT, CB, EXT, kPlCvt>(a.n, pl) : nullptr;
        } else {
            return pick_planned_nc<DT, CB, EXT, 0>(a.n, pl);
        }
    }
}

// The combine class (kCb*) of a tensor.
static int combine_class(const TensorArgs& a) {
    const bool fma = a.fma && (a.combine == kSum || a.combine == kMean);
    if (a.combine == kRam) return kCbRam;
    if (a.coef_group != kGroupNone) return fma ? kCbGroupFma : kCbGroup;
    if (ties_ext(a)) return kCbTiesExt;
    return fma ? kCbPlainFma : kCbPlain;
}

// With EXT (keep mask, dare_div) only the sum / mean / ties classes get the unrolled model counts
// (the masked methods' bandwidth path); ram and group coefficients with a mask, and group
// coefficients with the fused multiply-add, run the any-N loop (fewer instances to compile).
template <int DT, bool EXT>
static MergeBlockFn pick_merge_block_cb(const TensorArgs& a, const ModelPlan* plans) {
    switch (combine_class(a)) {
        case kCbRam:
            return EXT ? merge_block<0, DT, kCbRam, EXT> : pick_merge_block_nc<DT, kCbRam, EXT>(a.n);
        case kCbGroup:
            return EXT ? merge_block<0, DT, kCbGroup, EXT> : pick_merge_block_nc<DT, kCbGroup, EXT>(a.n);
        case kCbGroupFma:  // no method asks for it on the bandwidth path: the any-N loop
            return merge_block<0, DT, kCbGroupFma, EXT>;
        case kCbTiesExt:
            if (const MergeBlockFn f = pick_planned<DT, kCbTiesExt, EXT>(a, plans)) return f;
            return pick_merge_block_nc<DT, kCbTiesExt, EXT>(a.n);
        case kCbPlainFma:
            return pick_merge_block_nc<DT, kCbPlainFma, EXT>(a.n);
        default:
            if (const MergeBlockFn f = pick_planned<DT, kCbPlain, EXT>(a, plans)) return f;
            return pick_merge_block_nc<DT, kCbPlain, EXT>(a.n);
    }
}

template <int DT>
static MergeBlockFn pick_merge_block_n(const TensorArgs& a, const ModelPlan* plans) {
    if (a.tie_keep || a.tie_skip) return merge_block_ties<DT>;  // exact-k ties (sum / mean / ties only)
    if (a.combine == kNearswap)
        return merge_block<1, DT, kCbNearswap, false>;  // n == 1 (checked by the caller); no DARE, trim, mask
    return tensor_ext(a) ? pick_merge_block_cb<DT, true>(a, plans) : pick_merge_block_cb<DT, false>(a, plans);
}

// Models unrolled at compile time for N <= 4 (the common merges; any N through NM = 0), and
// a dtype-specialised loop when base, models and output share one dtype.
static MergeBlockFn pick_merge_block(const TensorArgs& a, const ModelPlan* plans, int out_dtype) {
    bool uniform = !a.has_base || a.base_dtype == out_dtype;
    for (int i = 0; i < a.n; ++i) uniform = uniform && a.model_dtypes[i] == out_dtype;
    if (!uniform) return pick_merge_block_n<-1>(a, plans);
    if (out_dtype == kBF16) return pick_merge_block_n<kBF16>(a, plans);
    if (out_dtype == kF16) return pick_merge_block_n<kF16>(a, plans);
    return pick_merge_block_n<kF32>(a, plans);
}

// group_coef transposed to [n][groups] (coefficients of consecutive columns side by side).
static float* transpose_group_coef(const TensorArgs& a) {
    float* gct = static_cast<float*>(malloc(sizeof(float) * size_t(a.n) * size_t(a.groups) + 1));
    if (gct)
        for (int64_t g = 0; g < a.groups; ++g)
            for (int i = 0; i < a.n; ++i)
                gct[size_t(i) * size_t(a.groups) + size_t(g)] = a.group_coef[g * a.n + i];
    return gct;
}

static bool merge(const TensorArgs& a, void* out, int out_dtype) {
    if (a.numel <= 0) return true;
    const bool grouped = a.coef_group != kGroupNone && (a.combine == kSum || a.combine == kMean);
    float* gct = grouped ? transpose_group_coef(a) : nullptr;
    ModelPlan* plans = make_plans(a);
    if (!plans || (grouped && !gct)) {
        free(plans);
        free(gct);
        return false;
    }
    const MergeBlockFn block = pick_merge_block(a, plans, out_dtype);
    // the exact-k tie rule counts in fixed blocks; row coefficients run fastest in blocks inside a row
    const BlockGrid grid = a.tie_keep || a.tie_skip || a.coef_group != kGroupNone ? fixed_grid(0, a.numel)
                                                                                  : line_grid(a, 0, a.numel);
    const int64_t nblocks = grid.nblocks;
#pragma omp parallel if (nblocks > 4)
    {
        Scratch s = {};
        const bool ok = scratch_alloc(s, a.n);
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            int64_t start, cnt;
            grid.at(bi, start, cnt);
            block(a, plans, gct, start, cnt, s, out, out_dtype);
        }
        free(s.mem);
    }
    free(plans);
    free(gct);
    return true;
}

// ---------------------------------------------------------------- stage A: ram counts

// Per model, the elements with |d_i| > ram_eps shared by c > 1 models (shared) or by none other
// (unique); d after DARE and trim, c as in combine 4 (docs/KERNEL.md). Integers: any split.
static bool ram_counts(const TensorArgs& a, int64_t* shared, int64_t* unique) {
    const int n = a.n;
    for (int i = 0; i < n; ++i) shared[i] = unique[i] = 0;
    if (a.numel <= 0) return true;
    ModelPlan* plans = make_plans(a);
    if (!plans) return false;
    const int64_t nblocks = (a.numel + kBlock - 1) / kBlock;
    const TensorIn t = tensor_in(a);
    bool failed = false;
#pragma omp parallel if (nblocks > 4) reduction(|| : failed)
    {
        Scratch s = {};
        bool ok = scratch_alloc(s, n);
        int64_t* cnt_s = static_cast<int64_t*>(calloc(size_t(2 * n), sizeof(int64_t)));
        ok = ok && cnt_s;
        failed = !ok;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            const int64_t start = bi * kBlock;
            const int64_t cnt = a.numel - start < kBlock ? a.numel - start : kBlock;
            block_philox(a, plans, start, cnt, s);
            for (int i = 0; i < n; ++i) s.mi[i] = model_in(a, plans[i], i, s.uptr[i], true);
            const vf eps = vsplat(a.ram_eps);
            for (int64_t k = 0; k < cnt; k += W) {
                const int rem = cnt - k < W ? int(cnt - k) : W;
                const uint32_t lanes = rem == W ? (W == 32 ? 0xffffffffu : (1u << W) - 1u) : (1u << rem) - 1u;
                const vf b = rem == W ? base_vec<false>(t, start + k, W) : base_vec<true>(t, start + k, rem);
                vf c = vf{};
                for (int i = 0; i < n; ++i) {
                    s.dv[i] = rem == W ? model_delta<false, -1, true>(s.mi[i], start + k, k, W, b)
                                       : model_delta<true, -1, true>(s.mi[i], start + k, k, rem, b);
                    c = c + vsel(vabs(s.dv[i]) > eps, vsplat(1.0f), vf{});
                }
                const uint32_t one = lane_bits(c == vsplat(1.0f));
                for (int i = 0; i < n; ++i) {
                    const uint32_t in = lane_bits(vabs(s.dv[i]) > eps) & lanes;
                    cnt_s[i] += __builtin_popcount(in & ~one);
                    cnt_s[n + i] += __builtin_popcount(in & one);
                }
            }
        }
        if (ok) {
#pragma omp critical(m3k_ram_reduce)
            for (int i = 0; i < n; ++i) {
                shared[i] += cnt_s[i];
                unique[i] += cnt_s[n + i];
            }
        }
        free(cnt_s);
        free(s.mem);
    }
    free(plans);
    return !failed;
}

// ---------------------------------------------------------------- stage A: histograms

// bits(|d'|) of one model for the block's elements (d' = delta after the DARE step, no trim).
// (d' includes the round-2 steps of the DARE step, the keep mask and dare_div: EXT, chosen per
// block and model, so the plain loop stays as it was.)
template <bool EXT>
static void block_keys_t(const TensorIn& t, const ModelIn& m, int64_t start, int64_t cnt,
                         uint32_t* __restrict keys) {
    int64_t k = 0;
    for (; k + W <= cnt; k += W) {
        const vf b = base_vec<false>(t, start + k, W);
        const vu ab = (vu)model_delta<false, -1, EXT>(m, start + k, k, W, b) & 0x7fffffffu;
        __builtin_memcpy(keys + k, &ab, sizeof(ab));
    }
    if (k < cnt) {
        const int rem = int(cnt - k);
        const vf b = base_vec<true>(t, start + k, rem);
        const vu ab = (vu)model_delta<true, -1, EXT>(m, start + k, k, rem, b) & 0x7fffffffu;
        for (int l = 0; l < rem; ++l) keys[k + l] = ab[l];
    }
}

static void block_keys(const TensorIn& t, const ModelIn& m, int64_t start, int64_t cnt,
                       uint32_t* __restrict keys) {
    if (model_ext(m))
        block_keys_t<true>(t, m, start, cnt, keys);
    else
        block_keys_t<false>(t, m, start, cnt, keys);
}

// Pass 1: count the high 16 bits of bits(|d'|) into the kHistCopies copies of h (round robin).
static void count_high(const uint32_t* __restrict keys, int64_t cnt, uint32_t* __restrict h) {
    uint32_t* __restrict h0 = h;
    uint32_t* __restrict h1 = h + kBins;
    uint32_t* __restrict h2 = h + 2 * kBins;
    uint32_t* __restrict h3 = h + 3 * kBins;
    int64_t t = 0;
    for (; t + 4 <= cnt; t += 4) {
        h0[keys[t] >> 16]++;
        h1[keys[t + 1] >> 16]++;
        h2[keys[t + 2] >> 16]++;
        h3[keys[t + 3] >> 16]++;
    }
    for (; t < cnt; ++t) h0[keys[t] >> 16]++;
}

// Pass 2: count the low 16 bits of the elements whose high 16 bits equal pre. The match test
// is vectorised; only matching lanes (found through a lane bit mask) touch the histogram.
template <bool PARTIAL>
M3K_INLINE void count_low_vec(vf d, int rem, uint32_t pre, uint32_t* __restrict h) {
    const vu ab = (vu)d & 0x7fffffffu;
    uint32_t bits = lane_bits((ab >> 16) == pre);
    if (PARTIAL) bits &= (1u << rem) - 1u;
    while (bits) {
        const int l = __builtin_ctz(bits);
        bits &= bits - 1u;
        h[size_t(l & (kHistCopies - 1)) * kBins + (ab[l] & 0xffffu)]++;
    }
}

template <bool EXT>
static void block_count_low_t(const TensorIn& t, const ModelIn& m, int64_t start, int64_t cnt, uint32_t pre,
                              uint32_t* __restrict h) {
    int64_t k = 0;
    for (; k + W <= cnt; k += W) {
        const vf b = base_vec<false>(t, start + k, W);
        count_low_vec<false>(model_delta<false, -1, EXT>(m, start + k, k, W, b), W, pre, h);
    }
    if (k < cnt) {
        const int rem = int(cnt - k);
        const vf b = base_vec<true>(t, start + k, rem);
        count_low_vec<true>(model_delta<true, -1, EXT>(m, start + k, k, rem, b), rem, pre, h);
    }
}

static void block_count_low(const TensorIn& t, const ModelIn& m, int64_t start, int64_t cnt, uint32_t pre,
                            uint32_t* __restrict h) {
    if (model_ext(m))
        block_count_low_t<true>(t, m, start, cnt, pre, h);
    else
        block_count_low_t<false>(t, m, start, cnt, pre, h);
}

template <bool PASS2>
static void histogram_range(const TensorArgs& a, const ModelPlan* plans, const uint32_t* prefix, int64_t lo,
                            int64_t hi, int64_t* hist) {
    const int n = a.n;
    const BlockGrid grid = line_grid(a, lo, hi);  // integer counts: any grid
    const int64_t nblocks = grid.nblocks;
    const size_t per_model = size_t(kHistCopies) * kBins;
    const TensorIn t = tensor_in(a);
#pragma omp parallel if (nblocks > 4)
    {
        Scratch s = {};
        bool ok = scratch_alloc(s, n);
        uint32_t* h = static_cast<uint32_t*>(calloc(size_t(n) * per_model, sizeof(uint32_t)));
        ok = ok && h != nullptr;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            int64_t start, cnt;
            grid.at(bi, start, cnt);
            block_philox(a, plans, start, cnt, s);
            for (int i = 0; i < n; ++i) {
                uint32_t* hm = h + size_t(i) * per_model;
                const ModelIn m = model_in(a, plans[i], i, s.uptr[i], false);
                if (PASS2) {
                    block_count_low(t, m, start, cnt, prefix[i], hm);
                } else {
                    block_keys(t, m, start, cnt, s.keys);
                    count_high(s.keys, cnt, hm);
                }
            }
        }
        if (ok) {
#pragma omp critical(m3k_histogram_reduce)
            for (int i = 0; i < n; ++i) {
                int64_t* out = hist + size_t(i) * kBins;
                const uint32_t* hm = h + size_t(i) * per_model;
                for (int c = 0; c < kHistCopies; ++c)
                    for (int t = 0; t < kBins; ++t) out[t] += hm[size_t(c) * kBins + t];
            }
        }
        free(h);
        free(s.mem);
    }
}

static void histogram(const TensorArgs& a, const uint32_t* prefix, int64_t* hist) {
    if (a.numel <= 0) return;
    ModelPlan* plans = make_plans(a);
    if (!plans) return;
    for (int64_t lo = 0; lo < a.numel; lo += kHistRound) {
        const int64_t hi = a.numel - lo < kHistRound ? a.numel : lo + kHistRound;
        if (prefix)
            histogram_range<true>(a, plans, prefix, lo, hi, hist);
        else
            histogram_range<false>(a, plans, prefix, lo, hi, hist);
    }
    free(plans);
}

// Stage A for small tensors: keys[i * numel + j] = bits(|d'_i[j]|), exactly the values pass 1
// counts (block_keys, d' = delta after the DARE step), so the caller can select the k-th
// largest directly. One thread: meant for tensors far smaller than one OpenMP split is worth.
static bool delta_keys(const TensorArgs& a, uint32_t* keys) {
    if (a.numel <= 0) return true;
    ModelPlan* plans = make_plans(a);
    if (!plans) return false;
    Scratch s = {};
    const bool ok = scratch_alloc(s, a.n);
    if (ok) {
        const TensorIn t = tensor_in(a);
        for (int64_t start = 0; start < a.numel; start += kBlock) {
            const int64_t cnt = a.numel - start < kBlock ? a.numel - start : kBlock;
            block_philox(a, plans, start, cnt, s);
            for (int i = 0; i < a.n; ++i) {
                const ModelIn m = model_in(a, plans[i], i, s.uptr[i], false);
                block_keys(t, m, start, cnt, keys + size_t(i) * size_t(a.numel) + size_t(start));
            }
        }
    }
    free(s.mem);
    free(plans);
    return ok;
}

// ---------------------------------------------------------------- stage A: single-pass threshold
//
// The exact k-th largest bits(|d'|) in one full pass (docs/KERNEL.md, "Stage A"): a strided
// sample (sample_keys) brackets the high-16 buckets that hold it, then bracket_count reads every
// element once and counts, per model, the elements above the bracket and the low-16 histogram of
// each bracketed bucket. The caller (m3kernels.merge.select) locates the k-th largest in those
// counts, or, when it lies outside the bracket, falls back to the two histogram passes.

constexpr int64_t kSampleRun = 64;  // elements per sample run (4 AVX-512 vectors, 128 bytes of bf16: few
                                    // pages touched, the sample costs little more than its page faults)

// keys[i * runs * kSampleRun + j * kSampleRun + l] = bits(|d'_i|) of element j * stride + l,
// stride = numel / runs (>= kSampleRun: the caller checks). Same values as block_keys.
static bool sample_keys(const TensorArgs& a, int64_t runs, uint32_t* keys) {
    if (a.numel <= 0 || runs <= 0) return true;
    const int64_t stride = a.numel / runs;
    if (stride < kSampleRun) return false;
    ModelPlan* plans = make_plans(a);
    if (!plans) return false;
    const TensorIn t = tensor_in(a);
    const size_t per_model = size_t(runs) * size_t(kSampleRun);
    bool failed = false;
#pragma omp parallel if (runs >= 1024) reduction(|| : failed)
    {
        Scratch s = {};
        const bool ok = scratch_alloc(s, a.n);
        failed = !ok;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < runs; ++j) {
            if (!ok) continue;
            const int64_t start = j * stride;
            block_philox(a, plans, start, kSampleRun, s);
            for (int i = 0; i < a.n; ++i) {
                const ModelIn m = model_in(a, plans[i], i, s.uptr[i], false);
                block_keys(t, m, start, kSampleRun, keys + size_t(i) * per_model + size_t(j) * kSampleRun);
            }
        }
        free(s.mem);
    }
    free(plans);
    return !failed;
}

// What bracket_count counts for one model: the keys >= (lo + span) << 16 (above), the high-16
// counts of the buckets lo .. lo + span - 1 (range), and the low-16 counts of up to kMaxFine of
// those buckets (fine). The vector loop only counts the keys above the range and packs the keys
// inside it (a few percent) into a buffer; a branch-free scalar loop then counts those, the range
// into kHistCopies copies (round robin: keys repeat a lot), the fine counts through a per-bucket
// row index (non-fine buckets go to a discarded row kMaxFine).
constexpr int kMaxFine = 4;

struct BracketIn {
    uint32_t lo_key;      // lo << 16
    uint32_t span_key;    // span << 16 (0xffffffff for all 65536 buckets)
    uint32_t span;        // buckets in the range
    const uint8_t* fidx;  // [span] fine row of each range bucket (kMaxFine: none)
};

// The lanes of one vector of deltas: count those above the range, pack those in it into buf.
template <bool PARTIAL>
M3K_INLINE int bracket_vec(vf d, int rem, const BracketIn& br, uint32_t& above, uint32_t* __restrict buf) {
    const vu ab = (vu)d & 0x7fffffffu;
    const vu rel = ab - br.lo_key;  // wraps below lo_key: outside
    uint32_t in = lane_bits(rel < br.span_key);
    uint32_t up = lane_bits(ab >= br.lo_key) & ~in;
    if (PARTIAL) {
        up &= (1u << rem) - 1u;
        in &= (1u << rem) - 1u;
    }
    above += uint32_t(__builtin_popcount(up));
#if M3K_HAVE_AVX512
    // compress in a register, store all 16 lanes (a compressing store to memory is slow on some
    // cores): buf needs W lanes of room past the packed keys (s.keys is followed by s.ad).
    _mm512_storeu_si512(buf, _mm512_maskz_compress_epi32(__mmask16(in), (__m512i)rel));
    return __builtin_popcount(in);
#else
    int c = 0;
    for (int l = 0; l < W; ++l) {
        buf[c] = rel[l];
        c += int((in >> l) & 1u);
    }
    return c;
#endif
}

template <bool EXT>
static void block_bracket(const TensorIn& t, const ModelIn& m, int64_t start, int64_t cnt,
                          const BracketIn& br, uint32_t& above, uint32_t* __restrict buf,
                          uint32_t* __restrict range, uint32_t* __restrict fine) {
    int64_t k = 0;
    int c = 0;
    for (; k + W <= cnt; k += W) {
        const vf b = base_vec<false>(t, start + k, W);
        c += bracket_vec<false>(model_delta<false, -1, EXT>(m, start + k, k, W, b), W, br, above, buf + c);
    }
    if (k < cnt) {
        const int rem = int(cnt - k);
        const vf b = base_vec<true>(t, start + k, rem);
        c += bracket_vec<true>(model_delta<true, -1, EXT>(m, start + k, k, rem, b), rem, br, above, buf + c);
    }
    const size_t span = br.span;
    for (int j = 0; j < c; ++j) {
        const uint32_t rel = buf[j];
        const uint32_t rb = rel >> 16;
        range[size_t(j & (kHistCopies - 1)) * span + rb]++;
        fine[size_t(br.fidx[rb]) * kBins + (rel & 0xffffu)]++;
    }
}

// Elements [lo, hi) (hi - lo <= 2^31: per-thread uint32 counts stay exact). Per thread: the
// kHistCopies range copies of every model (roff: model i's first copy, span[i] each), then
// kMaxFine + 1 fine rows per model.
static void bracket_range(const TensorArgs& a, const ModelPlan* plans, const BracketIn* br,
                          const size_t* roff, size_t range_total, int64_t lo, int64_t hi, int64_t* above,
                          int64_t* range, int64_t* fine, bool& failed) {
    const int n = a.n;
    const BlockGrid grid = line_grid(a, lo, hi);  // integer counts: any grid
    const int64_t nblocks = grid.nblocks;
    const size_t rows = size_t(kMaxFine + 1) * kBins;
    const size_t fine_total = size_t(n) * rows;
    const size_t copies_total = range_total * kHistCopies;
    const TensorIn t = tensor_in(a);
#pragma omp parallel if (nblocks > 4)
    {
        Scratch s = {};
        bool ok = scratch_alloc(s, n);
        uint32_t* h = static_cast<uint32_t*>(calloc(copies_total + fine_total, sizeof(uint32_t)));
        int64_t* up = static_cast<int64_t*>(calloc(size_t(n), sizeof(int64_t)));
        ok = ok && h != nullptr && up != nullptr;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < nblocks; ++bi) {
            if (!ok) continue;
            int64_t start, cnt;
            grid.at(bi, start, cnt);
            block_philox(a, plans, start, cnt, s);
            for (int i = 0; i < n; ++i) {
                if (br[i].span == 0) continue;
                const ModelIn m = model_in(a, plans[i], i, s.uptr[i], false);
                uint32_t cnt_up = 0;
                if (model_ext(m))
                    block_bracket<true>(t, m, start, cnt, br[i], cnt_up, s.keys, h + roff[i] * kHistCopies,
                                        h + copies_total + size_t(i) * rows);
                else
                    block_bracket<false>(t, m, start, cnt, br[i], cnt_up, s.keys, h + roff[i] * kHistCopies,
                                         h + copies_total + size_t(i) * rows);
                up[i] += cnt_up;
            }
        }
#pragma omp critical(m3k_bracket_reduce)
        {
            if (ok) {
                for (int i = 0; i < n; ++i) {
                    above[i] += up[i];
                    const size_t sp = br[i].span;
                    const uint32_t* hr = h + roff[i] * kHistCopies;
                    for (int c = 0; c < kHistCopies; ++c)
                        for (size_t j = 0; j < sp; ++j) range[roff[i] + j] += hr[size_t(c) * sp + j];
                    const uint32_t* hf = h + copies_total + size_t(i) * rows;
                    for (size_t j = 0; j < size_t(kMaxFine) * kBins; ++j)
                        fine[size_t(i) * kMaxFine * kBins + j] += hf[j];
                }
            } else {
                failed = true;
            }
        }
        free(up);
        free(h);
        free(s.mem);
    }
}

// Model i (span[i] > 0; 0 skips it): above[i] += #elements with bits(|d'_i|) >=
// (lo[i] + span[i]) << 16; range (int64, the models' rows back to back, span[i] each) += the
// high-16 counts of buckets lo[i] .. lo[i] + span[i] - 1; fine (int64[n][kMaxFine][65536]) += the
// low-16 counts of the buckets fine_buckets[i * kMaxFine + f] (inside the range; 0xffffffff:
// none). False: no memory.
static bool bracket_count(const TensorArgs& a, const uint32_t* lo, const uint32_t* span,
                          const uint32_t* fine_buckets, int64_t* above, int64_t* range, int64_t* fine) {
    if (a.numel <= 0) return true;
    size_t* roff = static_cast<size_t*>(malloc(sizeof(size_t) * size_t(a.n)));
    BracketIn* br = static_cast<BracketIn*>(malloc(sizeof(BracketIn) * size_t(a.n)));
    size_t total = 0;
    for (int i = 0; i < a.n; ++i) total += span[i];
    uint8_t* fidx = static_cast<uint8_t*>(malloc(total ? total : 1));
    ModelPlan* plans = make_plans(a);
    bool failed = !roff || !br || !plans || !fidx;
    size_t off = 0;
    for (int i = 0; !failed && i < a.n; ++i) {
        roff[i] = off;
        br[i].lo_key = lo[i] << 16;
        br[i].span = span[i];
        br[i].span_key = span[i] >= 0x10000u ? 0xffffffffu : span[i] << 16;  // 0xffffffff never occurs
        br[i].fidx = fidx + off;
        for (uint32_t j = 0; j < span[i]; ++j) fidx[off + j] = uint8_t(kMaxFine);
        for (int f = 0; f < kMaxFine; ++f) {
            const uint32_t b = fine_buckets[size_t(i) * kMaxFine + f];
            if (b >= lo[i] && b - lo[i] < span[i]) fidx[off + (b - lo[i])] = uint8_t(f);
        }
        off += span[i];
    }
    for (int64_t lo_el = 0; !failed && lo_el < a.numel; lo_el += kHistRound) {
        const int64_t hi_el = a.numel - lo_el < kHistRound ? a.numel : lo_el + kHistRound;
        bracket_range(a, plans, br, roff, total, lo_el, hi_el, above, range, fine, failed);
    }
    free(plans);
    free(fidx);
    free(br);
    free(roff);
    return !failed;
}

// ---------------------------------------------------------------- stage A: L1 sums

// Add |d| (ad) and |d| * keep (kd) of cnt elements into kL1Lanes float64 lanes; lane = position
// mod kL1Lanes in the chunk (blocks start at multiples of kL1Lanes).
static inline void l1_accumulate(const float* __restrict ad, const float* __restrict kd, int64_t cnt,
                                 double* __restrict tot, double* __restrict kept) {
    int64_t t = 0;
    for (; t + kL1Lanes <= cnt; t += kL1Lanes) {
        for (int l = 0; l < kL1Lanes; ++l) {
            tot[l] = tot[l] + double(ad[t + l]);
            kept[l] = kept[l] + double(kd[t + l]);
        }
    }
    for (int l = 0; t < cnt; ++t, ++l) {
        tot[l] = tot[l] + double(ad[t]);
        kept[l] = kept[l] + double(kd[t]);
    }
}

// OR the low cnt bits of bits into row at bit position g (LSB first; row zeroed before). Bytes
// are shared only by consecutive vectors of one block (W = 4) or not at all (W >= 8).
M3K_INLINE void put_bits(uint8_t* __restrict row, int64_t g, uint32_t bits, int cnt) {
    const int sh = int(g & 7);
    const uint64_t w = uint64_t(bits) << sh;
    const int64_t b0 = g >> 3;
    const int nb = (sh + cnt + 7) >> 3;
    for (int q = 0; q < nb; ++q) row[b0 + q] |= uint8_t(w >> (8 * q));
}

// |d| and |d| * keep of one model for elements [g, g + W) into s.ad / s.kd (k: block position);
// with a mask row, the keep bits of those elements into it (bit g).
template <bool PARTIAL>
M3K_INLINE void l1_vec(const TensorIn& t, const ModelIn& m, int64_t g, int64_t k, int rem, Scratch& s,
                       uint8_t* __restrict mrow) {
    const vf b = base_vec<PARTIAL>(t, g, rem);
    const vf x = PARTIAL ? load_vec_partial(m.src, m.dtype, g, rem) : load_vec(m.src, m.dtype, g);
    const vf ad = vabs(x - b);
    vf kd = ad;
    uint32_t bits = 0xffffffffu;
    if (m.dare == 1) {
        const vi keep = dare_words<PARTIAL>(m, k, rem) <= m.dare_le;
        kd = vsel(keep, ad, vf{});
        bits = lane_bits(keep);
    } else if (m.dare == 2) {
        kd = vf{};
        bits = 0;
    }
    __builtin_memcpy(s.ad + k, &ad, sizeof(ad));
    __builtin_memcpy(s.kd + k, &kd, sizeof(kd));
    if (mrow) {
        const int cnt = PARTIAL ? rem : W;
        put_bits(mrow, g, bits & uint32_t((uint64_t(1) << cnt) - 1u), cnt);
    }
}

// float64 sums of |d| and |d| * keep over one chunk [start, end): blocks in order, lanes added
// in a fixed order at the end, so the result depends on the data only.
static void l1_chunk(const TensorArgs& a, const ModelPlan* plans, int64_t start, int64_t end, Scratch& s,
                     double* tot_out, double* kept_out, uint8_t* mask, int64_t mask_stride) {
    const TensorIn t = tensor_in(a);
    for (int i = 0; i < a.n; ++i) {
        const ModelPlan& p = plans[i];
        uint8_t* mrow = mask ? mask + size_t(i) * size_t(mask_stride) : nullptr;
        double tot[kL1Lanes], kept[kL1Lanes];
        for (int l = 0; l < kL1Lanes; ++l) tot[l] = kept[l] = 0.0;
        for (int64_t blk = start; blk < end; blk += kBlock) {
            const int64_t cnt = end - blk < kBlock ? end - blk : kBlock;
            const uint32_t* u = nullptr;
            if (p.dare == 1) u = philox_block(p.key, uint64_t(a.index_offset + blk), cnt, s.u);
            const ModelIn m = model_in(a, p, i, u, false);
            int64_t k = 0;
            for (; k + W <= cnt; k += W) l1_vec<false>(t, m, blk + k, k, W, s, mrow);
            if (k < cnt) l1_vec<true>(t, m, blk + k, k, int(cnt - k), s, mrow);
            l1_accumulate(s.ad, s.kd, cnt, tot, kept);
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

// keep_mask (nullable, zeroed, [n][(numel + 7) / 8] bytes): model i's DARE keep bits, bit g of
// its row for element g of this call (all ones without DARE, all zeros at density 0). A later
// stage B may read them as its keep mask instead of drawing the Philox words again.
static void l1_sums(const TensorArgs& a, double* total, double* kept, uint8_t* keep_mask) {
    const int n = a.n;
    for (int i = 0; i < n; ++i) total[i] = kept[i] = 0.0;
    if (a.numel <= 0) return;
    const int64_t mask_stride = (a.numel + 7) / 8;
    const int64_t nchunks = (a.numel + kL1Chunk - 1) / kL1Chunk;
    ModelPlan* plans = make_plans(a);
    double* part = static_cast<double*>(malloc(sizeof(double) * size_t(2 * n) * size_t(nchunks)));
    if (!plans || !part) {
        free(plans);
        free(part);
        return;
    }
#pragma omp parallel if (nchunks > 1)
    {
        Scratch s = {};
        const bool ok = scratch_alloc(s, 1);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; ++c) {
            if (!ok) continue;
            const int64_t start = c * kL1Chunk;
            const int64_t end = a.numel - start < kL1Chunk ? a.numel : start + kL1Chunk;
            double* pc = part + size_t(2 * n) * size_t(c);
            l1_chunk(a, plans, start, end, s, pc, pc + n, keep_mask, mask_stride);
        }
        free(s.mem);
    }
    for (int64_t c = 0; c < nchunks; ++c) {  // chunk order: thread-count independent
        const double* pc = part + size_t(2 * n) * size_t(c);
        for (int i = 0; i < n; ++i) {
            total[i] = total[i] + pc[i];
            kept[i] = kept[i] + pc[n + i];
        }
    }
    free(part);
    free(plans);
}

// ---------------------------------------------------------------- Philox words (tests, tools)

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

#include "variant_gram.h"
#include "variant_ties.h"

}  // namespace M3K_VARIANT
}  // namespace m3k
