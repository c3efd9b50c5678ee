// The fused Fisher stage B on the host (docs/DATA_AWARE.md, "Fisher in the fused kernel"):
// y = Σ c_i F̃_i x_i / Σ c_i F̃_i per element, 2N + 1 streams, OpenMP over blocks.
//
// The kernel body (variant_fisher.h) is compiled here three times, generic / AVX2 / AVX-512, each in
// its own namespace after its `#pragma GCC target`, and the variant in use (m3k::active_level(),
// M3KERNELS_SIMD / set_simd_level) picks one: every variant gives the same bits. Bound as
// m3kernels._C.fisher_merge (raw pointers and dtype codes, like the other entry points).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dispatch.h"
#include "kernel_api.h"

namespace m3k {

// One call's arguments: n model tensors x_i and n statistics F_i, numel elements each.
struct FisherArgs {
    int n;
    const void* const* models;
    const int* model_dtypes;
    const void* const* stats;
    const int* stat_dtypes;
    const float* coef;  // [n] f32(w_i r_i s_i)
    float coef_sum;     // f32(Σ c_i): the divisor where Σ c_i F̃_i == 0
    float floor;
    int floor_mode;  // 0: max(F, floor); 1: F + floor
    int64_t numel;
    void* out;
    int out_dtype;
};

namespace fisher_generic {
#define M3K_HAVE_AVX2 0
#define M3K_HAVE_F16C 0
#define M3K_HAVE_AVX512 0
#include "simd_vec.h"
#include "variant_fisher.h"
#undef M3K_HAVE_AVX2
#undef M3K_HAVE_F16C
#undef M3K_HAVE_AVX512
}  // namespace fisher_generic

#if defined(__x86_64__) || defined(__i386__)
#define M3K_FISHER_X86 1
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positives in the intrinsic headers
#pragma GCC target("avx2,f16c,fma,bmi,bmi2,popcnt")
namespace fisher_avx2 {
#define M3K_HAVE_AVX2 1
#define M3K_HAVE_F16C 1
#define M3K_HAVE_AVX512 0
#include "simd_vec.h"
#include "variant_fisher.h"
#undef M3K_HAVE_AVX2
#undef M3K_HAVE_F16C
#undef M3K_HAVE_AVX512
}  // namespace fisher_avx2
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,fma,bmi,bmi2,popcnt")
namespace fisher_avx512 {
#define M3K_HAVE_AVX2 1
#define M3K_HAVE_F16C 1
#define M3K_HAVE_AVX512 1
#include "simd_vec.h"
#include "variant_fisher.h"
#undef M3K_HAVE_AVX2
#undef M3K_HAVE_F16C
#undef M3K_HAVE_AVX512
}  // namespace fisher_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

}  // namespace m3k

namespace py = pybind11;

namespace {

int dtype_code(int code, const char* what) {
    if (code < 0 || code > 2)
        throw py::value_error(std::string(what) +
                              ": dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                              std::to_string(code));
    return code;
}

void fisher_merge(const std::vector<uintptr_t>& model_ptrs, const std::vector<int>& model_dtypes,
                  const std::vector<uintptr_t>& stat_ptrs, const std::vector<int>& stat_dtypes,
                  py::array_t<float, py::array::c_style | py::array::forcecast> coef, float coef_sum,
                  float floor, int floor_mode, int64_t numel, uintptr_t out_ptr, int out_dtype) {
    const size_t n = model_ptrs.size();
    if (n < 1) throw py::value_error("fisher_merge: at least one model");
    if (model_dtypes.size() != n || stat_ptrs.size() != n || stat_dtypes.size() != n || coef.ndim() != 1 ||
        size_t(coef.shape(0)) != n)
        throw py::value_error("fisher_merge: expected " + std::to_string(n) +
                              " model dtypes, statistic pointers, statistic dtypes and coefficients");
    if (floor_mode != 0 && floor_mode != 1)
        throw py::value_error("fisher_merge: floor_mode must be 0 (max) or 1 (add), got " +
                              std::to_string(floor_mode));
    if (numel < 0) throw py::value_error("fisher_merge: numel must be >= 0");
    std::vector<const void*> models(n), stats(n);
    for (size_t i = 0; i < n; ++i) {
        dtype_code(model_dtypes[i], "fisher_merge models");
        dtype_code(stat_dtypes[i], "fisher_merge statistics");
        if (numel > 0 && (model_ptrs[i] == 0 || stat_ptrs[i] == 0))
            throw py::value_error("fisher_merge: null pointer");
        models[i] = reinterpret_cast<const void*>(model_ptrs[i]);
        stats[i] = reinterpret_cast<const void*>(stat_ptrs[i]);
    }
    dtype_code(out_dtype, "fisher_merge out");
    if (numel > 0 && out_ptr == 0) throw py::value_error("fisher_merge: null out pointer");
    const m3k::FisherArgs a{int(n),
                            models.data(),
                            model_dtypes.data(),
                            stats.data(),
                            stat_dtypes.data(),
                            coef.data(),
                            coef_sum,
                            floor,
                            floor_mode,
                            numel,
                            reinterpret_cast<void*>(out_ptr),
                            out_dtype};
    const char* level = m3k::active_level();
    py::gil_scoped_release nogil;
#ifdef M3K_FISHER_X86
    if (std::strcmp(level, "avx512") == 0) return m3k::fisher_avx512::fisher_merge(a);
    if (std::strcmp(level, "avx2") == 0) return m3k::fisher_avx2::fisher_merge(a);
#endif
    m3k::fisher_generic::fisher_merge(a);
}

}  // namespace

void register_fisher_kernel(py::module_& m) {
    m.def("fisher_merge", &fisher_merge, py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("stat_ptrs"),
          py::arg("stat_dtypes"), py::arg("coef"), py::arg("coef_sum"), py::arg("floor"),
          py::arg("floor_mode"), py::arg("numel"), py::arg("out_ptr"), py::arg("out_dtype"),
          "Fisher stage B (docs/DATA_AWARE.md): out = Σ c_i F̃_i x_i / Σ c_i F̃_i per element "
          "(F̃ = max(F, floor) or F + floor; Σ c_i F̃_i == 0: Σ c_i x_i / coef_sum), in the variant in use.");
}
