// della's stage A on the host (docs/MERGEKIT_METHODS.md E1, docs/RANDOMNESS.md "della"): for a
// chunk of whole dim-0 slabs of one model's float32 delta, laid out [slabs, C, inner], rank |δ|
// along C in each line (ascending (bits(|δ|), index): an LSD radix sort of the 31-bit keys, stable),
// keep the element of rank r iff its Philox word < thr[r], OR the keep bits into the model's packed
// little-bit-order mask, and return each slab's float64 Σ|δ| and Σ|δ|·keep over the finite deltas,
// summed in flat order within the slab (Python adds the slabs in order: no dependence on threads).
// The NumPy path in m3kernels/merge/methods/della.py is the oracle; the bits are the same.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "dispatch.h"

namespace py = pybind11;

namespace {

// Digits of the LSD radix sort of the 31-bit keys (bits 32 .. 62 of a packed value): 11, 11, 9.
constexpr int kShift[3] = {32, 43, 54};
constexpr uint32_t kMask[3] = {0x7FF, 0x7FF, 0x1FF};

// One LSD pass on digit `pass` (counts in cp, zeroed here): src into dst, stably. False: every
// key has the same digit (nothing moved, cp zeroed).
bool radix_pass(const uint64_t* src, uint64_t* dst, int64_t n, int pass, uint32_t* cp) {
    const int sh = kShift[pass];
    const uint32_t mk = kMask[pass];
    if (cp[(src[0] >> sh) & mk] == uint32_t(n)) {  // one bucket: the pass is a no-op
        std::memset(cp, 0, sizeof(uint32_t) * (mk + 1));
        return false;
    }
    uint32_t sum = 0;
    for (uint32_t b = 0; b <= mk; ++b) {
        const uint32_t c = cp[b];
        cp[b] = sum;
        sum += c;
    }
    for (int64_t i = 0; i < n; ++i) dst[cp[(src[i] >> sh) & mk]++] = src[i];
    std::memset(cp, 0, sizeof(uint32_t) * (mk + 1));
    return true;
}

// Sorts v[0..n) (key << 32 | index, keys < 2^31, indices ascending) by key, stably: the order of
// the packed values, which are distinct. tmp has n slots; cnt[1], cnt[2] hold the counts of the
// high digits (counted while v was filled), cnt[0] is zero; nz is the number of keys whose low
// digit is not 0 (nz). Zeroes cnt. Few such keys (bf16 / fp16 deltas: their low mantissa
// bits are 0): the two high passes, then insertion on the packed value, which moves only those
// few within their runs of equal high digits (past a budget of moves: std::sort of the packed
// values, the same order). Otherwise the three passes.
void sort_line(uint64_t* v, uint64_t* tmp, int64_t n, uint32_t (*cnt)[2048], int64_t nz) {
    const bool low_pass = nz * 32 > n;
    if (low_pass)
        for (int64_t i = 0; i < n; ++i) ++cnt[0][v[i] >> 32 & 0x7FF];
    uint64_t *src = v, *dst = tmp;
    for (int pass = low_pass ? 0 : 1; pass < 3; ++pass)
        if (radix_pass(src, dst, n, pass, cnt[pass])) std::swap(src, dst);
    if (src != v) std::memcpy(v, src, sizeof(uint64_t) * size_t(n));
    if (low_pass || nz == 0) return;
    int64_t moves = 0;
    for (int64_t i = 1; i < n; ++i) {
        const uint64_t x = v[i];
        if (v[i - 1] <= x) continue;
        int64_t j = i;
        do {
            v[j] = v[j - 1];
            --j;
        } while (j > 0 && v[j - 1] > x);
        v[j] = x;
        moves += i - j;
        if (moves > 8 * n) {
            std::sort(v, v + n);
            return;
        }
    }
}

py::tuple della_stage_a(py::array_t<float, py::array::c_style> delta, int64_t slabs, int64_t c, int64_t inner,
                        int64_t first, uint32_t key0, uint32_t key1,
                        py::array_t<uint64_t, py::array::c_style> thr, py::array mask) {
    if (slabs < 0 || c < 1 || inner < 1 || first < 0) throw py::value_error("della_stage_a: bad layout");
    if (c >= (int64_t(1) << 32)) throw py::value_error("della_stage_a: C must be below 2**32");
    const int64_t slab = c * inner, n = slabs * slab;
    if (delta.size() != n) throw py::value_error("della_stage_a: delta must have slabs * C * inner elements");
    if (thr.size() != c) throw py::value_error("della_stage_a: thr must have C elements");
    if (n == 0) return py::make_tuple(py::array_t<double>(0), py::array_t<double>(0), int64_t(0));
    // The mask is written in place: no converted copy (the caller's array must be the real one).
    if (!mask.dtype().is(py::dtype::of<uint8_t>()) || !(mask.flags() & py::array::c_style) ||
        !mask.writeable())
        throw py::value_error("della_stage_a: mask must be a writeable C-contiguous uint8 array");
    if (mask.size() < (first + n + 7) / 8) throw py::value_error("della_stage_a: mask too short");
    const float* d = delta.data();
    const uint64_t* th = thr.data();
    uint8_t* mk = static_cast<uint8_t*>(mask.mutable_data());
    py::array_t<double> tot(slabs), kep(slabs);
    double* tp = tot.mutable_data();
    double* kp = kep.mutable_data();
    std::vector<uint8_t> keep(static_cast<size_t>(n));
    uint8_t* kb = keep.data();
    const m3k::KernelTable& t = m3k::active_table();
    int64_t bad = 0;
    {
        py::gil_scoped_release nogil;
#pragma omp parallel reduction(+ : bad)
        {
            std::vector<uint32_t> u(static_cast<size_t>(slab) + 256);
            std::vector<uint64_t> v(static_cast<size_t>(c)), tmp(static_cast<size_t>(c));
            uint32_t cnt[3][2048] = {};
#pragma omp for schedule(dynamic, 1)
            for (int64_t s = 0; s < slabs; ++s) {
                const int64_t off = s * slab;
                const float* ds = d + off;
                uint8_t* ks = kb + off;
                t.philox_u32(key0, key1, first + off, slab, u.data());
                for (int64_t q = 0; q < inner; ++q) {
                    if (c < 64) {  // short line: the values are distinct, so any sort is the stable order
                        for (int64_t j = 0; j < c; ++j) {
                            uint32_t bits;
                            std::memcpy(&bits, ds + j * inner + q, sizeof(bits));
                            v[size_t(j)] = (uint64_t(bits & 0x7FFFFFFFu) << 32) | uint64_t(j);
                        }
                        std::sort(v.begin(), v.end());
                    } else {
                        int64_t nz = 0;  // keys with a nonzero low digit (counted without a chain)
                        for (int64_t j = 0; j < c; ++j) {
                            uint32_t bits;
                            std::memcpy(&bits, ds + j * inner + q, sizeof(bits));
                            bits &= 0x7FFFFFFFu;
                            v[size_t(j)] = (uint64_t(bits) << 32) | uint64_t(j);
                            nz += (bits & 0x7FF) != 0;
                            ++cnt[1][(bits >> 11) & 0x7FF];
                            ++cnt[2][bits >> 22];
                        }
                        sort_line(v.data(), tmp.data(), c, cnt, nz);
                    }
                    for (int64_t r = 0; r < c; ++r) {
                        const int64_t e = int64_t(uint32_t(v[size_t(r)])) * inner + q;
                        ks[e] = uint64_t(u[size_t(e)]) < th[r];
                    }
                }
                // Branch-free (the keep bits are random: a branch on them mispredicts half the time):
                // a dropped or non-finite term adds +0.0, which leaves the non-negative sums as they are
                // (they start at +0.0), as the NumPy oracle's np.where(keep, a, 0.0) does.
                double at = 0.0, ak = 0.0;
                int64_t nb = 0;
                for (int64_t j = 0; j < slab; ++j) {
                    const double a = std::fabs(double(ds[j]));
                    const bool fin = std::isfinite(a);
                    const double af = fin ? a : 0.0;
                    at += af;
                    ak += af * double(ks[j]);  // ks[j] is 0 or 1: af or +0.0
                    nb += !fin;
                }
                tp[s] = at;
                kp[s] = ak;
                bad += nb;
            }
            // Pack: byte b of the mask holds elements 8b .. 8b + 7 (first is the chunk's flat start).
            const int64_t b0 = first >> 3, b1 = (first + n - 1) >> 3;
#pragma omp for schedule(dynamic, 8192)
            for (int64_t b = b0; b <= b1; ++b) {
                uint32_t byte = 0;
                for (int bit = 0; bit < 8; ++bit) {
                    const int64_t e = 8 * b + bit - first;
                    if (e >= 0 && e < n) byte |= uint32_t(kb[e]) << bit;
                }
                mk[b] = uint8_t(mk[b] | byte);
            }
        }
    }
    return py::make_tuple(tot, kep, bad);
}

}  // namespace

void register_della_stage_a(py::module_& m) {
    m.def("della_stage_a", &della_stage_a, py::arg("delta"), py::arg("slabs"), py::arg("c"), py::arg("inner"),
          py::arg("first"), py::arg("key0"), py::arg("key1"), py::arg("thr"), py::arg("mask"),
          "della stage A on a chunk of whole dim-0 slabs of one model's float32 delta ([slabs, C, inner]): "
          "ORs the keep bits into mask (packed, little bit order, from flat index first; zero it first) "
          "and returns (per-slab float64 sums of |delta|, of |delta| kept, over the finite deltas in flat "
          "order; the non-finite count).");
}
