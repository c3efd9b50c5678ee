// Kernel variant "avx512": AVX-512 F/BW/VL/DQ + F16C (ternary logic Philox, 16-lane conversions).
//
// System headers come first, outside the target region, so nothing from the C/C++ library is
// compiled with this variant's instruction set; the kernels live in namespace m3k::avx512.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,fma,bmi,bmi2,popcnt")
#define M3K_VARIANT avx512
#define M3K_HAVE_AVX2 1
#define M3K_HAVE_F16C 1
#define M3K_HAVE_AVX512 1
#include "variant_impl.h"
#undef M3K_VARIANT
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace m3k {

const KernelTable& table_avx512() {
#ifdef M3K_VARIANT_ENABLED
    static const KernelTable t = {
        "avx512",           avx512::merge,      avx512::histogram,   avx512::l1_sums,
        avx512::philox_u32, avx512::delta_keys, avx512::sample_keys, avx512::bracket_count,
        avx512::gram,       avx512::ram_counts, avx512::tie_counts};
#else
    static const KernelTable t = {nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, nullptr, nullptr, nullptr};  // not x86
#endif
    return t;
}

}  // namespace m3k
