// pybind11 module m3kernels._cuda: raw device pointers, dtype codes and a stream handle in.
//
// The module never sees a torch::Tensor: Python passes data_ptr() integers, the parameter
// block as a dict and torch.cuda.current_stream().cuda_stream, so it does not link libtorch
// and does not depend on the PyTorch C++ ABI (docs/GPU.md). The GIL is released while the
// kernels are launched (or emulated on the host).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.h"
#include "merge_args.h"

namespace py = pybind11;

namespace {

template <class T>
std::vector<T> get_list(const py::dict& d, const char* key, int n) {
    if (!d.contains(key))
        throw std::invalid_argument(std::string("m3kernels CUDA args: missing '") + key + "'");
    auto v = d[key].cast<std::vector<T>>();
    if (static_cast<int>(v.size()) < n)
        throw std::invalid_argument(std::string("m3kernels CUDA args: '") + key + "' needs " +
                                    std::to_string(n) + " values, got " + std::to_string(v.size()));
    return v;
}

template <class T>
T get(const py::dict& d, const char* key) {
    if (!d.contains(key))
        throw std::invalid_argument(std::string("m3kernels CUDA args: missing '") + key + "'");
    return d[key].cast<T>();
}

// An optional key (dicts of older callers lack the issue-8 fields): its value, or `fallback`.
template <class T>
T get_or(const py::dict& d, const char* key, T fallback) {
    return d.contains(key) ? d[key].cast<T>() : fallback;
}

template <class T>
std::vector<T> get_list_or(const py::dict& d, const char* key, int n, T fallback) {
    if (!d.contains(key)) return std::vector<T>(n, fallback);
    return get_list<T>(d, key, n);
}

int32_t check_dtype(int64_t code, const char* what) {
    if (code < 0 || code > 2)
        throw std::invalid_argument(std::string("m3kernels CUDA args: ") + what +
                                    " dtype code must be 0, 1 or 2");
    return static_cast<int32_t>(code);
}

m3k::MergeArgs parse_args(const py::dict& d, bool need_out) {
    m3k::MergeArgs a{};
    const int64_t n = get<int64_t>(d, "n");
    if (n < 1 || n > m3k::kMaxModels)
        throw std::invalid_argument("m3kernels CUDA: the number of models must be between 1 and " +
                                    std::to_string(m3k::kMaxModels) + ", got " + std::to_string(n));
    a.n = static_cast<int32_t>(n);
    a.numel = get<int64_t>(d, "numel");
    if (a.numel < 0) throw std::invalid_argument("m3kernels CUDA args: numel must be >= 0");
    const auto models = get_list<uintptr_t>(d, "models", a.n);
    const auto model_dtypes = get_list<int64_t>(d, "model_dtypes", a.n);
    const auto vote_w = get_list<double>(d, "vote_w", a.n);
    const auto coef = get_list<double>(d, "coef", a.n);
    const auto dare_scale = get_list<double>(d, "dare_scale", a.n);
    const auto dare = get_list<int64_t>(d, "dare", a.n);
    const auto key0 = get_list<uint32_t>(d, "key0", a.n);
    const auto key1 = get_list<uint32_t>(d, "key1", a.n);
    const auto dare_thr = get_list<uint64_t>(d, "dare_thr", a.n);
    const auto trim_min = get_list<uint64_t>(d, "trim_min", a.n);
    const uintptr_t base = get<uintptr_t>(d, "base");
    const uintptr_t out = get<uintptr_t>(d, "out");
    a.has_base = get<bool>(d, "has_base") ? 1 : 0;
    a.base_dtype = check_dtype(get<int64_t>(d, "base_dtype"), "base");
    a.out_dtype = check_dtype(get<int64_t>(d, "out_dtype"), "out");
    a.combine = static_cast<int32_t>(get<int64_t>(d, "combine"));
    if (a.combine < 0 || a.combine > 4)
        throw std::invalid_argument("m3kernels CUDA args: combine must be 0 .. 4");
    if (a.combine == m3k::kNearswap && a.n != 1)
        throw std::invalid_argument("m3kernels CUDA args: the nearswap combine takes exactly one model");
    if ((a.combine == m3k::kNearswap || a.combine == m3k::kRam) && !a.has_base)
        throw std::invalid_argument("m3kernels CUDA args: the nearswap and ram combines need a base");
    a.clip_t = static_cast<float>(get_or<double>(d, "clip_t", 0.0));
    a.ram_eps = static_cast<float>(get_or<double>(d, "ram_eps", 0.0));
    a.coef_group = static_cast<int32_t>(get_or<int64_t>(d, "coef_group", 0));
    if (a.coef_group < 0 || a.coef_group > 2)
        throw std::invalid_argument("m3kernels CUDA args: coef_group must be 0, 1 or 2");
    a.row_len = get_or<int64_t>(d, "row_len", 1);
    if (a.row_len < 1) throw std::invalid_argument("m3kernels CUDA args: row_len must be >= 1");
    a.index_offset = get_or<int64_t>(d, "index_offset", 0);
    if (a.index_offset < 0) throw std::invalid_argument("m3kernels CUDA args: index_offset must be >= 0");
    const uintptr_t group_coef = get_or<uintptr_t>(d, "group_coef", 0);
    if (need_out && a.coef_group != m3k::kGroupNone && (a.combine == m3k::kSum || a.combine == m3k::kMean) &&
        a.numel > 0 && group_coef == 0)
        throw std::invalid_argument("m3kernels CUDA args: coef_group is set but group_coef is null");
    a.group_coef = reinterpret_cast<const float*>(group_coef);
    a.tie_rule = get_or<bool>(d, "tie_rule", false) ? 1 : 0;
    const auto tie_keep = get_list_or<int64_t>(d, "tie_keep", a.n, -1);
    const auto tie_skip = get_list_or<int64_t>(d, "tie_skip", a.n, 0);
    a.tie_prefix_min = reinterpret_cast<const int64_t*>(get_or<uintptr_t>(d, "tie_prefix_min", 0));
    a.tie_prefix_max = reinterpret_cast<const int64_t*>(get_or<uintptr_t>(d, "tie_prefix_max", 0));
    a.tie_blocks = (a.numel + m3k::kTieBlock - 1) / m3k::kTieBlock;
    if (a.tie_rule && need_out) {  // stage B; tie_counts reads the thresholds only
        if (a.combine > m3k::kTies || (a.coef_group != m3k::kGroupNone && a.combine != m3k::kTies))
            throw std::invalid_argument(
                "m3kernels CUDA args: exact-k ties go with the sum, mean and ties combines only");
        if (a.numel > 0 && (a.tie_prefix_min == nullptr || a.tie_prefix_max == nullptr))
            throw std::invalid_argument(
                "m3kernels CUDA args: exact-k ties need tie_prefix_min and tie_prefix_max");
    }
    // Round 2 (docs/KERNEL.md V1..V7): every key optional, the defaults leave the program unchanged.
    a.fma = get_or<bool>(d, "fma", false) ? 1 : 0;
    a.vote_kind = static_cast<int32_t>(get_or<int64_t>(d, "vote_kind", 0));
    a.ties_div = static_cast<int32_t>(get_or<int64_t>(d, "ties_div", 0));
    if (a.vote_kind < 0 || a.vote_kind > 1 || a.ties_div < 0 || a.ties_div > 1)
        throw std::invalid_argument("m3kernels CUDA args: vote_kind and ties_div must be 0 or 1");
    a.den_floor = static_cast<float>(get_or<double>(d, "den_floor", 0.0));
    a.keep_mask = reinterpret_cast<const uint8_t*>(get_or<uintptr_t>(d, "keep_mask", 0));
    a.mask_stride = get_or<int64_t>(d, "mask_stride", 0);
    if (a.mask_stride < 0) throw std::invalid_argument("m3kernels CUDA args: mask_stride must be >= 0");
    a.dare_div = get_or<bool>(d, "dare_div", false) ? 1 : 0;
    const auto agree_w = get_list_or<double>(d, "agree_w", a.n, 1.0);
    const auto mask_scale = get_list_or<double>(d, "mask_scale", a.n, 1.0);
    const auto dare_den = get_list_or<double>(d, "dare_den", a.n, 1.0);
    const auto trim_max = get_list_or<uint64_t>(d, "trim_max", a.n, 0xffffffffu);
    const auto unique_scale = get_list_or<double>(d, "unique_scale", a.n, 1.0);
    a.normalize = get<bool>(d, "normalize") ? 1 : 0;
    a.lam = static_cast<float>(get<double>(d, "lam"));
    a.mean_den = static_cast<float>(get<double>(d, "mean_den"));
    bool aligned = true;
    for (int i = 0; i < a.n; ++i) {
        if (a.numel > 0 && models[i] == 0)
            throw std::invalid_argument("m3kernels CUDA args: null model pointer");
        a.models[i] = reinterpret_cast<const void*>(models[i]);
        aligned = aligned && models[i] % 16 == 0;
        a.model_dtype[i] = check_dtype(model_dtypes[i], "model");
        a.vote_w[i] = static_cast<float>(vote_w[i]);
        a.coef[i] = static_cast<float>(coef[i]);
        a.dare_scale[i] = static_cast<float>(dare_scale[i]);
        a.dare[i] = dare[i] ? 1u : 0u;
        a.key0[i] = key0[i];
        a.key1[i] = key1[i];
        if (dare_thr[i] > (uint64_t(1) << 32) || trim_min[i] > (uint64_t(1) << 32))
            throw std::invalid_argument("m3kernels CUDA args: dare_thr and trim_min must be <= 2^32");
        a.dare_thr[i] = dare_thr[i];
        a.trim_min[i] = trim_min[i];
        a.trim_max[i] = trim_max[i];
        a.unique_scale[i] = static_cast<float>(unique_scale[i]);
        a.tie_keep[i] = tie_keep[i];
        a.tie_skip[i] = tie_skip[i];
        a.agree_w[i] = static_cast<float>(agree_w[i]);
        a.mask_scale[i] = static_cast<float>(mask_scale[i]);
        a.dare_den[i] = static_cast<float>(dare_den[i]);
        a.ext_delta = a.ext_delta || (a.dare_div && a.dare[i]);
    }
    a.ext_delta = a.ext_delta || a.keep_mask != nullptr;
    const bool ties_variant = a.combine == m3k::kTies &&
                              (a.vote_kind != 0 || a.ties_div != 0 || (a.normalize && a.den_floor > 0.0f));
    const bool fma = a.fma && (a.combine == m3k::kSum || a.combine == m3k::kMean);
    a.ext = a.ext_delta || ties_variant || fma;
    if (a.has_base) {
        if (a.numel > 0 && base == 0)
            throw std::invalid_argument("m3kernels CUDA args: has_base but null base pointer");
        a.base = reinterpret_cast<const void*>(base);
        aligned = aligned && base % 16 == 0;
    }
    if (need_out) {
        if (a.numel > 0 && out == 0) throw std::invalid_argument("m3kernels CUDA args: null out pointer");
        a.out = reinterpret_cast<void*>(out);
        aligned = aligned && out % 16 == 0;
    }
    a.aligned = aligned ? 1 : 0;
    return a;
}

}  // namespace

namespace m3k {  // fisher_kernel.cu (docs/DATA_AWARE.md, "Fisher in the fused kernel")
void launch_fisher(int n, const uintptr_t* models, const int* model_dtypes, const uintptr_t* stats,
                   const int* stat_dtypes, const float* coef, float coef_sum, float floor, int floor_mode,
                   int64_t numel, uintptr_t out, int out_dtype, int device, uintptr_t stream);
void emulate_fisher(int n, const uintptr_t* models, const int* model_dtypes, const uintptr_t* stats,
                    const int* stat_dtypes, const float* coef, float coef_sum, float floor, int floor_mode,
                    int64_t numel, uintptr_t out, int out_dtype);
}  // namespace m3k

namespace {

// Fisher stage B: the same arguments for the launch and the host emulation (device < 0).
void fisher_call(const std::vector<uintptr_t>& models, const std::vector<int>& model_dtypes,
                 const std::vector<uintptr_t>& stats, const std::vector<int>& stat_dtypes,
                 const std::vector<float>& coef, float coef_sum, float floor, int floor_mode, int64_t numel,
                 uintptr_t out, int out_dtype, int device, uintptr_t stream) {
    const size_t n = models.size();
    if (model_dtypes.size() != n || stats.size() != n || stat_dtypes.size() != n || coef.size() != n)
        throw std::invalid_argument("m3kernels CUDA fisher: expected " + std::to_string(n) +
                                    " model dtypes, statistic pointers, statistic dtypes and coefficients");
    py::gil_scoped_release release;
    if (device < 0)
        m3k::emulate_fisher(int(n), models.data(), model_dtypes.data(), stats.data(), stat_dtypes.data(),
                            coef.data(), coef_sum, floor, floor_mode, numel, out, out_dtype);
    else
        m3k::launch_fisher(int(n), models.data(), model_dtypes.data(), stats.data(), stat_dtypes.data(),
                           coef.data(), coef_sum, floor, floor_mode, numel, out, out_dtype, device, stream);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "m3kernels CUDA kernels (stage A statistics, stage B fused merge) on raw device pointers";
    m.attr("MAX_MODELS") = m3k::kMaxModels;
    m.attr("HIST_BINS") = 1 << 16;

    m.def(
        "runtime_info",
        []() {
            const m3k::RuntimeInfo info = m3k::runtime_info();
            py::dict d;
            d["runtime_version"] = info.runtime_version;
            d["driver_version"] = info.driver_version;
            d["device_count"] = info.device_count;
            d["error"] = info.error ? std::string(info.error) : std::string();
            return d;
        },
        "CUDA runtime / driver versions and device count as seen by this extension's runtime.");

    m.def(
        "merge",
        [](const py::dict& args, int device, uintptr_t stream) {
            const m3k::MergeArgs a = parse_args(args, true);
            py::gil_scoped_release release;
            m3k::launch_merge(a, device, stream);
        },
        py::arg("args"), py::arg("device"), py::arg("stream"),
        "Stage B on the stream: args['out'] = merge of base and models (device pointers).");
    m.def(
        "histogram",
        [](const py::dict& args, int model, int64_t prefix, uintptr_t hist, int device, uintptr_t stream) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::launch_histogram(a, model, prefix, reinterpret_cast<uint64_t*>(hist), device, stream);
        },
        py::arg("args"), py::arg("model"), py::arg("prefix"), py::arg("hist"), py::arg("device"),
        py::arg("stream"),
        "Add model's stage A histogram (prefix < 0: high 16 bits; else low 16 bits within the prefix) "
        "to 65536 int64 counters at hist.");
    m.def("l1_num_blocks", &m3k::l1_num_blocks, py::arg("numel"),
          "Number of fixed element blocks (and partial sums per statistic) of the L1 kernel.");
    m.def(
        "l1_partials",
        [](const py::dict& args, int model, uintptr_t partials, int device, uintptr_t stream) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::launch_l1_partials(a, model, reinterpret_cast<double*>(partials), device, stream);
        },
        py::arg("args"), py::arg("model"), py::arg("partials"), py::arg("device"), py::arg("stream"),
        "Write 2 x l1_num_blocks float64 partials (Σ|d|, Σ|d|·keep) of model at partials.");

    m.def(
        "gram_num_units", [](const py::dict& args) { return m3k::gram_num_units(parse_args(args, false)); },
        py::arg("args"), "Number of (group, chunk) work units of the gram kernel (partials: units * n * n).");
    m.def(
        "gram_partials",
        [](const py::dict& args, uintptr_t partials, int device, uintptr_t stream) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::launch_gram_partials(a, reinterpret_cast<double*>(partials), device, stream);
        },
        py::arg("args"), py::arg("partials"), py::arg("device"), py::arg("stream"),
        "Write the float64 chunk values of the gram sums (k >= i) at partials[unit * n * n + i * n + k].");
    m.def(
        "ram_counts",
        [](const py::dict& args, uintptr_t counts, int device, uintptr_t stream) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::launch_ram_counts(a, reinterpret_cast<uint64_t*>(counts), device, stream);
        },
        py::arg("args"), py::arg("counts"), py::arg("device"), py::arg("stream"),
        "Add the RAM counts (shared_i at counts[i], unique_i at counts[n + i]) to 2n int64 counters.");

    m.def(
        "tie_counts",
        [](const py::dict& args, uintptr_t cmin, uintptr_t cmax, int device, uintptr_t stream) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::launch_tie_counts(a, reinterpret_cast<int64_t*>(cmin), reinterpret_cast<int64_t*>(cmax),
                                   device, stream);
        },
        py::arg("args"), py::arg("cmin"), py::arg("cmax"), py::arg("device"), py::arg("stream"),
        "Exact-k ties, stage A: per model and tie block the keys equal to trim_min (cmin) and trim_max "
        "(cmax), "
        "int64[n][tie blocks] each, written.");
    m.def(
        "emulate_tie_counts",
        [](const py::dict& args, uintptr_t cmin, uintptr_t cmax) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::emulate_tie_counts(a, reinterpret_cast<int64_t*>(cmin), reinterpret_cast<int64_t*>(cmax));
        },
        py::arg("args"), py::arg("cmin"), py::arg("cmax"), "Host emulation of tie_counts on host pointers.");

    m.def("fisher_merge", &fisher_call, py::arg("models"), py::arg("model_dtypes"), py::arg("stats"),
          py::arg("stat_dtypes"), py::arg("coef"), py::arg("coef_sum"), py::arg("floor"),
          py::arg("floor_mode"), py::arg("numel"), py::arg("out"), py::arg("out_dtype"), py::arg("device"),
          py::arg("stream"),
          "Fisher stage B (docs/DATA_AWARE.md) on the stream; device < 0: the host emulation on host "
          "pointers.");
    m.def(
        "emulate_merge",
        [](const py::dict& args) {
            const m3k::MergeArgs a = parse_args(args, true);
            py::gil_scoped_release release;
            m3k::emulate_merge(a);
        },
        py::arg("args"), "Host emulation of merge on host pointers (the same chunk code, for tests).");
    m.def(
        "emulate_histogram",
        [](const py::dict& args, int model, int64_t prefix, uintptr_t hist) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::emulate_histogram(a, model, prefix, reinterpret_cast<uint64_t*>(hist));
        },
        py::arg("args"), py::arg("model"), py::arg("prefix"), py::arg("hist"),
        "Host emulation of histogram on host pointers.");
    m.def(
        "emulate_l1_partials",
        [](const py::dict& args, int model, uintptr_t partials) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::emulate_l1_partials(a, model, reinterpret_cast<double*>(partials));
        },
        py::arg("args"), py::arg("model"), py::arg("partials"),
        "Host emulation of l1_partials on host pointers.");
    m.def(
        "emulate_gram_partials",
        [](const py::dict& args, uintptr_t partials) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::emulate_gram_partials(a, reinterpret_cast<double*>(partials));
        },
        py::arg("args"), py::arg("partials"), "Host emulation of gram_partials on host pointers.");
    m.def(
        "emulate_ram_counts",
        [](const py::dict& args, uintptr_t counts) {
            const m3k::MergeArgs a = parse_args(args, false);
            py::gil_scoped_release release;
            m3k::emulate_ram_counts(a, reinterpret_cast<uint64_t*>(counts));
        },
        py::arg("args"), py::arg("counts"), "Host emulation of ram_counts on host pointers.");
}
