// Kernel variant "generic": the portable baseline (x86-64 SSE2 or the build's default ISA): no target pragma.
//
// System headers come first, outside the target region, so nothing from the C/C++ library is
// compiled with this variant's instruction set; the kernels live in namespace m3k::generic.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>

#include "kernel_api.h"

#define M3K_VARIANT generic
#include "variant_impl.h"
#undef M3K_VARIANT

namespace m3k {

const KernelTable& table_generic() {
    static const KernelTable t = {
        "generic",           generic::merge,      generic::histogram,   generic::l1_sums,
        generic::philox_u32, generic::delta_keys, generic::sample_keys, generic::bracket_count,
        generic::gram,       generic::ram_counts, generic::tie_counts};
    return t;
}

}  // namespace m3k
