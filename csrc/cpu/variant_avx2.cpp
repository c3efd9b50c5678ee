// Kernel variant "avx2": AVX2 + F16C + FMA (FMA only where the `fma` piece asks for it: float32
// stays unfused otherwise, -ffp-contract=off).
//
// System headers come first, outside the target region, so nothing from the C/C++ library is
// compiled with this variant's instruction set; the kernels live in namespace m3k::avx2.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>

#include "kernel_api.h"

#if defined(__x86_64__) || defined(__i386__)
#define M3K_VARIANT_ENABLED 1
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positives in the intrinsic headers
#pragma GCC target("avx2,f16c,fma,bmi,bmi2,popcnt")
#define M3K_VARIANT avx2
#define M3K_HAVE_AVX2 1
#define M3K_HAVE_F16C 1
#include "variant_impl.h"
#undef M3K_VARIANT
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace m3k {

const KernelTable& table_avx2() {
#ifdef M3K_VARIANT_ENABLED
    static const KernelTable t = {"avx2",           avx2::merge,      avx2::histogram,   avx2::l1_sums,
                                  avx2::philox_u32, avx2::delta_keys, avx2::sample_keys, avx2::bracket_count,
                                  avx2::gram,       avx2::ram_counts, avx2::tie_counts};
#else
    static const KernelTable t = {nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, nullptr, nullptr, nullptr};  // not x86
#endif
    return t;
}

}  // namespace m3k
