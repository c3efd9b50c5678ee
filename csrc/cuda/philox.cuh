// Philox4x32-10 (Random123 constants) for the DARE keep decision, host and device.
//
// The key words come from Python (m3kernels/merge/philox.py::dare_key); here only the rounds.
// Element j uses counter (j >> 2) and word (j & 3), see docs/RANDOMNESS.md.
#pragma once

#include <cstdint>

#include "m3k_common.cuh"

namespace m3k {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

M3K_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four words of Philox4x32-10 for counter (q_lo, q_hi, 0, 0) and key (k0, k1).
M3K_HD void philox4x32_10(uint64_t q, uint32_t k0, uint32_t k1, uint32_t (&w)[4]) {
    uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = 0, c3 = 0;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += kPhiloxW0;
            k1 += kPhiloxW1;
        }
        const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
        const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    w[0] = c0;
    w[1] = c1;
    w[2] = c2;
    w[3] = c3;
}

}  // namespace m3k
