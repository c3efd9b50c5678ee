// Python bindings of the fused CPU kernels (module m3kernels._C).
//
// Tensors arrive as raw addresses (torch's data_ptr()) with dtype codes and an element count:
// the extension never links libtorch. The per-tensor parameters are read from a
// m3kernels.merge.kernel_params.KernelParams object (attribute access, arrays cast to their C types).
// The GIL is released around all kernel work.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dispatch.h"

namespace py = pybind11;

namespace {

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
CArray<T> param_array(py::handle p, const char* name, int n) {
    py::object obj = p.attr(name);
    CArray<T> arr = CArray<T>::ensure(obj);
    if (!arr || arr.ndim() != 1 || arr.shape(0) != n)
        throw py::value_error(std::string("KernelParams.") + name +
                              ": expected a 1-d array of n = " + std::to_string(n) + " values");
    return arr;
}

int check_dtype(int code, const char* what) {
    if (code < 0 || code > 2)
        throw py::value_error(std::string(what) +
                              ": dtype code must be 0 (float32), 1 (bfloat16) "
                              "or 2 (float16), got " +
                              std::to_string(code));
    return code;
}

// Keeps the cast parameter arrays alive while the kernel reads them.
struct Call {
    CArray<float> vote_w, coef, dare_scale;
    CArray<uint8_t> dare;
    CArray<uint32_t> key0, key1;
    CArray<uint64_t> dare_thr, trim_min, trim_max;
    CArray<float> group_coef, unique_scale;
    CArray<int64_t> tie_keep, tie_skip, tie_prefix_min, tie_prefix_max;
    CArray<float> agree_w, mask_scale, dare_den;
    CArray<uint8_t> keep_mask;
    std::vector<const void*> models;
    std::vector<int> dtypes;
    m3k::TensorArgs args{};

    Call(py::handle p, uintptr_t base_ptr, int base_dtype, const std::vector<uintptr_t>& model_ptrs,
         const std::vector<int>& model_dtypes, int64_t numel, int64_t index_offset) {
        const int n = p.attr("n").cast<int>();
        if (n < 1) throw py::value_error("KernelParams.n must be >= 1");
        if (int(model_ptrs.size()) != n || int(model_dtypes.size()) != n)
            throw py::value_error("expected " + std::to_string(n) + " model pointers and dtypes, got " +
                                  std::to_string(model_ptrs.size()) + " and " +
                                  std::to_string(model_dtypes.size()));
        if (numel < 0) throw py::value_error("numel must be >= 0");
        if (index_offset < 0) throw py::value_error("index_offset must be >= 0");
        vote_w = param_array<float>(p, "vote_w", n);
        coef = param_array<float>(p, "coef", n);
        dare_scale = param_array<float>(p, "dare_scale", n);
        dare = param_array<uint8_t>(p, "dare", n);
        key0 = param_array<uint32_t>(p, "key0", n);
        key1 = param_array<uint32_t>(p, "key1", n);
        dare_thr = param_array<uint64_t>(p, "dare_thr", n);
        bool has_trim = !p.attr("trim_min").is_none();
        if (has_trim) trim_min = param_array<uint64_t>(p, "trim_min", n);
        for (int i = 0; i < n; ++i) {
            if (model_ptrs[i] == 0 && numel > 0) throw py::value_error("null model pointer");
            models.push_back(reinterpret_cast<const void*>(model_ptrs[i]));
            dtypes.push_back(check_dtype(model_dtypes[i], "models"));
        }
        args.n = n;
        args.has_base = p.attr("has_base").cast<bool>() ? 1 : 0;
        args.combine = p.attr("combine").cast<int>();
        if (args.combine < 0 || args.combine > 4)
            throw py::value_error(
                "KernelParams.combine must be 0 (sum), 1 (mean), 2 (ties), 3 (nearswap) or 4 (ram)");
        args.normalize = p.attr("normalize").cast<bool>() ? 1 : 0;
        args.lam = p.attr("lam").cast<float>();
        args.mean_den = p.attr("mean_den").cast<float>();
        args.vote_w = vote_w.data();
        args.coef = coef.data();
        args.dare = dare.data();
        args.key0 = key0.data();
        args.key1 = key1.data();
        args.dare_thr = dare_thr.data();
        args.dare_scale = dare_scale.data();
        args.trim_min = has_trim ? trim_min.data() : nullptr;
        if (args.has_base) {
            if (base_ptr == 0 && numel > 0)
                throw py::value_error("KernelParams.has_base but no base pointer");
            args.base = reinterpret_cast<const void*>(base_ptr);
            args.base_dtype = check_dtype(base_dtype, "base");
        } else {
            args.base = nullptr;
            args.base_dtype = 0;
        }
        args.models = models.data();
        args.model_dtypes = dtypes.data();
        args.numel = numel;
        args.index_offset = index_offset;
        read_issue8_fields(p, n);
        read_round2_fields(p, n);
    }

    // The round-2 pieces of docs/KERNEL.md (absent or None: the defaults, the program unchanged).
    void read_round2_fields(py::handle p, int n) {
        args.fma = py::getattr(p, "fma", py::bool_(false)).cast<bool>() ? 1 : 0;
        if (!py::getattr(p, "agree_w", py::none()).is_none()) {
            agree_w = param_array<float>(p, "agree_w", n);
            args.agree_w = agree_w.data();
        }
        args.vote_kind = py::getattr(p, "vote_kind", py::int_(0)).cast<int>();
        if (args.vote_kind < 0 || args.vote_kind > 1)
            throw py::value_error("KernelParams.vote_kind must be 0 (weighted sum) or 1 (count), got " +
                                  std::to_string(args.vote_kind));
        args.ties_div = py::getattr(p, "ties_div", py::int_(0)).cast<int>();
        if (args.ties_div < 0 || args.ties_div > 1)
            throw py::value_error(
                "KernelParams.ties_div must be 0 (agreeing weights) or 1 (agreeing count), got " +
                std::to_string(args.ties_div));
        args.den_floor = py::getattr(p, "den_floor", py::float_(0.0)).cast<float>();
        if (!(args.den_floor >= 0.0f) || args.den_floor == __builtin_inff())
            throw py::value_error("KernelParams.den_floor must be a finite float >= 0, got " +
                                  std::to_string(args.den_floor));
        args.dare_div = py::getattr(p, "dare_div", py::bool_(false)).cast<bool>() ? 1 : 0;
        if (args.dare_div) {
            if (py::getattr(p, "dare_den", py::none()).is_none())
                throw py::value_error("KernelParams.dare_div needs dare_den (float32[n])");
            dare_den = param_array<float>(p, "dare_den", n);
            args.dare_den = dare_den.data();
        }
        py::object km = py::getattr(p, "keep_mask", py::none());
        if (km.is_none()) return;
        keep_mask = CArray<uint8_t>::ensure(km);
        if (!keep_mask) throw py::value_error("KernelParams.keep_mask: expected a uint8 array");
        args.mask_stride = py::getattr(p, "mask_stride", py::int_(0)).cast<int64_t>();
        const int64_t need = (args.index_offset + args.numel + 7) / 8;  // bytes of one model's mask
        if (args.mask_stride < 0 || (args.mask_stride > 0 && args.mask_stride < need))
            throw py::value_error(
                "KernelParams.mask_stride must be 0 (one shared mask) or >= " + std::to_string(need) +
                " bytes (one model's mask), got " + std::to_string(args.mask_stride));
        const int64_t total = need == 0 ? 0 : args.mask_stride * (n - 1) + need;
        if (int64_t(keep_mask.size()) < total)
            throw py::value_error("KernelParams.keep_mask has " + std::to_string(keep_mask.size()) +
                                  " bytes; flat indices up to " +
                                  std::to_string(args.index_offset + args.numel) + " of " +
                                  std::to_string(n) + " model(s) with mask_stride " +
                                  std::to_string(args.mask_stride) + " need " + std::to_string(total));
        args.keep_mask = keep_mask.data();
        if (!py::getattr(p, "mask_scale", py::none()).is_none()) {
            mask_scale = param_array<float>(p, "mask_scale", n);
            args.mask_scale = mask_scale.data();
        }
    }

    // The optional fields of docs/KERNEL.md's issue-8 pieces (absent or None: the defaults).
    void read_issue8_fields(py::handle p, int n) {
        py::object tmax = py::getattr(p, "trim_max", py::none());
        if (!tmax.is_none()) {
            trim_max = param_array<uint64_t>(p, "trim_max", n);
            args.trim_max = trim_max.data();
        }
        args.coef_group = py::getattr(p, "coef_group", py::int_(0)).cast<int>();
        if (args.coef_group < 0 || args.coef_group > 2)
            throw py::value_error("KernelParams.coef_group must be 0 (none), 1 (row) or 2 (column), got " +
                                  std::to_string(args.coef_group));
        args.row_len = py::getattr(p, "row_len", py::int_(1)).cast<int64_t>();
        if (args.row_len < 1)
            throw py::value_error("KernelParams.row_len must be >= 1, got " + std::to_string(args.row_len));
        py::object gc = py::getattr(p, "group_coef", py::none());
        if (!gc.is_none()) {
            group_coef = CArray<float>::ensure(gc);
            if (!group_coef || group_coef.size() % n != 0)
                throw py::value_error("KernelParams.group_coef: expected groups * n = groups * " +
                                      std::to_string(n) + " float32 values");
            args.group_coef = group_coef.data();
            args.groups = int64_t(group_coef.size()) / n;
        }
        args.clip_t = py::getattr(p, "clip_t", py::float_(0.0)).cast<float>();
        args.ram_eps = py::getattr(p, "ram_eps", py::float_(0.0)).cast<float>();
        py::object us = py::getattr(p, "unique_scale", py::none());
        if (!us.is_none()) {
            unique_scale = param_array<float>(p, "unique_scale", n);
            args.unique_scale = unique_scale.data();
        }
    }

    // Exact-k ties: tie_keep / tie_skip (None: off) and their per-1024-block prefixes.
    void read_tie_fields(py::handle p, int n) {
        bool on_min = false, on_max = false;
        if (!py::getattr(p, "tie_keep", py::none()).is_none()) {
            tie_keep = param_array<int64_t>(p, "tie_keep", n);
            for (int i = 0; i < n; ++i) on_min = on_min || tie_keep.data()[i] >= 0;
            args.tie_keep = tie_keep.data();
        }
        if (!py::getattr(p, "tie_skip", py::none()).is_none()) {
            tie_skip = param_array<int64_t>(p, "tie_skip", n);
            for (int i = 0; i < n; ++i) {
                if (tie_skip.data()[i] < 0) throw py::value_error("KernelParams.tie_skip must be >= 0");
                on_max = on_max || tie_skip.data()[i] > 0;
            }
            args.tie_skip = tie_skip.data();
        }
        if (!on_min && !on_max) {
            args.tie_keep = args.tie_skip = nullptr;  // every tie kept: the plain program
            return;
        }
        const int64_t need = (args.index_offset + args.numel + 1023) / 1024;
        auto prefix = [&](const char* name, CArray<int64_t>& arr) -> const int64_t* {
            py::object obj = py::getattr(p, name, py::none());
            if (obj.is_none())
                throw py::value_error(std::string("KernelParams.") + name + " is needed by the tie rule");
            arr = CArray<int64_t>::ensure(obj);
            if (!arr || arr.size() % n != 0 || arr.size() / n < need)
                throw py::value_error(std::string("KernelParams.") + name +
                                      ": expected n * tie_blocks values, " +
                                      "tie_blocks >= " + std::to_string(need));
            args.tie_blocks = int64_t(arr.size()) / n;
            return arr.data();
        };
        if (on_min) args.tie_prefix_min = prefix("tie_prefix_min", tie_prefix_min);
        if (on_max) args.tie_prefix_max = prefix("tie_prefix_max", tie_prefix_max);
        if (on_min && on_max && tie_prefix_min.size() != tie_prefix_max.size())
            throw py::value_error("KernelParams.tie_prefix_min and tie_prefix_max differ in size");
        if (args.index_offset % 1024 != 0)
            throw py::value_error("the tie rule needs index_offset to be a multiple of 1024, got " +
                                  std::to_string(args.index_offset));
        if (args.combine > 2 || args.coef_group != 0)
            throw py::value_error(
                "the tie rule (tie_keep / tie_skip) needs combine 0, 1 or 2 and coef_group 0");
        if (n > 64)
            throw py::value_error("the tie rule supports at most 64 models, got " + std::to_string(n));
    }

    // The groups of the Gram matrices (coef_group 0: 1, row: numel / row_len, column: row_len).
    int64_t gram_groups() const {
        if (args.coef_group == 0) return 1;
        if (args.numel % args.row_len != 0)
            throw py::value_error("KernelParams.row_len = " + std::to_string(args.row_len) +
                                  " does not divide numel = " + std::to_string(args.numel));
        return args.coef_group == 1 ? args.numel / args.row_len : args.row_len;
    }

    // Stage B checks of the issue-8 fields against this call's elements.
    void check_merge() const {
        const int c = args.combine;
        if (c == 3 && (args.n != 1 || !args.has_base))
            throw py::value_error("combine 3 (nearswap) needs n == 1 and has_base");
        if (c == 4 && !args.has_base) throw py::value_error("combine 4 (ram) needs has_base");
        if (args.coef_group == 0) return;
        if (c != 0 && c != 1)
            throw py::value_error("KernelParams.coef_group != 0 needs combine 0 (sum) or 1 (mean)");
        if (!args.group_coef) throw py::value_error("KernelParams.coef_group != 0 but group_coef is None");
        if (args.numel == 0) return;
        const int64_t last = args.index_offset + args.numel - 1;
        const int64_t need = args.coef_group == 1 ? last / args.row_len + 1 : args.row_len;
        if ((args.coef_group == 2 && args.groups != args.row_len) || args.groups < need)
            throw py::value_error("KernelParams.group_coef has " + std::to_string(args.groups) +
                                  " groups; elements up to flat index " + std::to_string(last) +
                                  " with row_len " + std::to_string(args.row_len) + " need " +
                                  (args.coef_group == 2 ? "exactly " : "at least ") + std::to_string(need));
    }
};

void merge(py::handle p, uintptr_t base_ptr, int base_dtype, const std::vector<uintptr_t>& model_ptrs,
           const std::vector<int>& model_dtypes, int64_t numel, uintptr_t out_ptr, int out_dtype,
           int64_t index_offset) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    check_dtype(out_dtype, "out");
    if (out_ptr == 0 && numel > 0) throw py::value_error("null output pointer");
    call.check_merge();
    call.read_tie_fields(p, call.args.n);  // stage B only: the tie rule
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = t.merge(call.args, reinterpret_cast<void*>(out_ptr), out_dtype);
    }
    if (!ok) throw std::bad_alloc();
}

py::array_t<int64_t> histogram(py::handle p, uintptr_t base_ptr, int base_dtype,
                               const std::vector<uintptr_t>& model_ptrs, const std::vector<int>& model_dtypes,
                               int64_t numel, py::object prefix, int64_t index_offset) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    const int n = call.args.n;
    CArray<uint32_t> pre;
    const uint32_t* pre_ptr = nullptr;
    if (!prefix.is_none()) {
        pre = CArray<uint32_t>::ensure(prefix);
        if (!pre || pre.ndim() != 1 || pre.shape(0) != n)
            throw py::value_error("prefix: expected a 1-d array of n = " + std::to_string(n) + " values");
        pre_ptr = pre.data();
        for (int i = 0; i < n; ++i)
            if (pre_ptr[i] > 0xffffu) throw py::value_error("prefix values must be < 65536");
    }
    py::array_t<int64_t> hist({py::ssize_t(n), py::ssize_t(1) << 16});
    int64_t* h = hist.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    {
        py::gil_scoped_release nogil;
        std::memset(h, 0, sizeof(int64_t) * size_t(n) * (size_t(1) << 16));
        t.histogram(call.args, pre_ptr, h);
    }
    return hist;
}

// bits(|d'_i|) of every element (uint32[n, numel]): the small-tensor stage A (exact select).
py::array_t<uint32_t> delta_keys(py::handle p, uintptr_t base_ptr, int base_dtype,
                                 const std::vector<uintptr_t>& model_ptrs,
                                 const std::vector<int>& model_dtypes, int64_t numel, int64_t index_offset) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    py::array_t<uint32_t> keys({py::ssize_t(call.args.n), py::ssize_t(numel)});
    uint32_t* k = keys.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = t.delta_keys(call.args, k);
    }
    if (!ok) throw std::bad_alloc();
    return keys;
}

// Single-pass threshold, step 1: bits(|d'_i|) of `runs` runs of 64 elements spread evenly over
// the tensor (uint32[n, runs * 64]; numel >= 64 * runs).
py::array_t<uint32_t> sample_keys(py::handle p, uintptr_t base_ptr, int base_dtype,
                                  const std::vector<uintptr_t>& model_ptrs,
                                  const std::vector<int>& model_dtypes, int64_t numel, int64_t runs,
                                  int64_t index_offset) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    if (runs < 0 || (runs > 0 && numel / runs < 64))
        throw py::value_error("sample_keys: need 0 <= runs <= numel / 64");
    py::array_t<uint32_t> keys({py::ssize_t(call.args.n), py::ssize_t(runs * 64)});
    uint32_t* k = keys.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = t.sample_keys(call.args, runs, k);
    }
    if (!ok) throw std::bad_alloc();
    return keys;
}

// Single-pass threshold, step 2: one pass over every element. For model i with span[i] > 0:
// above[i] = #elements with bits(|d'_i|) >= (lo[i] + span[i]) << 16, range[i] = int64[span[i]]
// high-16 counts of buckets lo[i] .. lo[i] + span[i] - 1, fine[i] = int64[4, 65536] low-16 counts
// of the buckets fine_buckets[i] (up to 4, each inside the range). Returns (above, range, fine).
py::tuple bracket_count(py::handle p, uintptr_t base_ptr, int base_dtype,
                        const std::vector<uintptr_t>& model_ptrs, const std::vector<int>& model_dtypes,
                        int64_t numel, const std::vector<uint32_t>& lo, const std::vector<uint32_t>& span,
                        const std::vector<std::vector<uint32_t>>& fine_buckets, int64_t index_offset) {
    constexpr int kFine = 4;
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    const int n = call.args.n;
    if (int(lo.size()) != n || int(span.size()) != n || int(fine_buckets.size()) != n)
        throw py::value_error("bracket_count: expected n = " + std::to_string(n) +
                              " lo, span and fine_buckets");
    size_t total = 0;
    std::vector<uint32_t> fb(size_t(n) * kFine, 0xffffffffu);
    for (int i = 0; i < n; ++i) {
        if (lo[i] > 0xffffu || span[i] > 0x10000u - lo[i])
            throw py::value_error("bracket_count: need lo < 65536 and lo + span <= 65536");
        if (fine_buckets[i].size() > size_t(kFine))
            throw py::value_error("bracket_count: at most 4 fine buckets per model");
        for (size_t f = 0; f < fine_buckets[i].size(); ++f) {
            const uint32_t b = fine_buckets[i][f];
            if (b < lo[i] || b - lo[i] >= span[i])
                throw py::value_error("bracket_count: each fine bucket must lie in lo .. lo + span - 1");
            for (size_t g = 0; g < f; ++g)
                if (fine_buckets[i][g] == b) throw py::value_error("bracket_count: fine buckets must differ");
            fb[size_t(i) * kFine + f] = b;
        }
        total += span[i];
    }
    py::array_t<int64_t> up(n);
    py::array_t<int64_t> range(static_cast<py::ssize_t>(total));
    py::array_t<int64_t> fine({py::ssize_t(n), py::ssize_t(kFine), py::ssize_t(1) << 16});
    int64_t* upp = up.mutable_data();
    int64_t* rp = range.mutable_data();
    int64_t* fp = fine.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        std::memset(upp, 0, sizeof(int64_t) * size_t(n));
        std::memset(rp, 0, sizeof(int64_t) * total);
        std::memset(fp, 0, sizeof(int64_t) * size_t(n) * kFine * (size_t(1) << 16));
        ok = t.bracket_count(call.args, lo.data(), span.data(), fb.data(), upp, rp, fp);
    }
    if (!ok) throw std::bad_alloc();
    py::list rows;
    size_t off = 0;
    for (int i = 0; i < n; ++i) {
        rows.append(range[py::slice(py::ssize_t(off), py::ssize_t(off + span[i]), 1)]);
        off += span[i];
    }
    return py::make_tuple(up, rows, fine);
}

// Stage A and B for many small tensors in one call (the streaming merge of checkpoints with
// thousands of them). Tensor t: base base_ptrs[t] (when p.has_base), models model_ptrs[t * n + i],
// numels[t] elements, output out_ptrs[t]; every tensor uses p except: DARE keys key0/key1[t * n + i]
// when given, and, when ks is given, trim thresholds = the exact ks[t * n + i]-th largest
// bits(|d'|) of that tensor's model i (k < 0: no trim, k = 0: keep nothing, k >= numel: the
// smallest), as m3kernels.merge.select.select_from_keys picks them; else p.trim_min. Returns the
// thresholds used, uint64[T, n].
py::array_t<uint64_t> merge_batch(py::handle p, const std::vector<uintptr_t>& base_ptrs, int base_dtype,
                                  const std::vector<uintptr_t>& model_ptrs,
                                  const std::vector<int>& model_dtypes, const std::vector<int64_t>& numels,
                                  const std::vector<uintptr_t>& out_ptrs, int out_dtype, py::object ks,
                                  py::object key0, py::object key1) {
    const size_t count = numels.size();
    const int n = p.attr("n").cast<int>();
    const bool has_base = p.attr("has_base").cast<bool>();
    if (n < 1) throw py::value_error("KernelParams.n must be >= 1");
    if (out_ptrs.size() != count || model_ptrs.size() != count * size_t(n) ||
        (has_base && base_ptrs.size() != count))
        throw py::value_error(
            "merge_batch: expected one output, n model pointers and (with a base) one base "
            "pointer per tensor");
    for (size_t t = 0; t < count; ++t) {
        if (numels[t] < 0) throw py::value_error("numel must be >= 0");
        if (numels[t] == 0) continue;
        if (out_ptrs[t] == 0 || (has_base && base_ptrs[t] == 0)) throw py::value_error("null pointer");
        for (int i = 0; i < n; ++i)
            if (model_ptrs[t * size_t(n) + i] == 0) throw py::value_error("null model pointer");
    }
    check_dtype(out_dtype, "out");
    py::array_t<uint64_t> used({py::ssize_t(count), py::ssize_t(n)});
    if (count == 0) return used;
    const std::vector<uintptr_t> first(model_ptrs.begin(), model_ptrs.begin() + n);
    Call call(p, has_base ? base_ptrs[0] : 0, base_dtype, first, model_dtypes, numels[0], 0);
    // per-tensor group coefficients, tie prefixes and trim windows cannot be shared by a batch
    call.read_tie_fields(p, n);
    if (call.args.tie_keep || call.args.tie_skip)
        throw py::value_error("merge_batch: the exact-k tie rule (tie_keep / tie_skip) is not supported");
    if (call.args.coef_group != 0)
        throw py::value_error(
            "merge_batch: KernelParams.coef_group != 0 (per-tensor group_coef) is not supported");
    if (call.args.keep_mask)
        throw py::value_error("merge_batch: KernelParams.keep_mask (a per-tensor mask) is not supported");
    call.check_merge();
    bool window = false;
    for (int i = 0; call.args.trim_max && i < n; ++i) window = window || call.args.trim_max[i] < 0x7fffffffu;
    if (window && !ks.is_none())
        throw py::value_error(
            "merge_batch: per-tensor trim thresholds (ks) with a trim_max window are not supported");
    const size_t flat = count * size_t(n);
    CArray<int64_t> k_arr;
    CArray<uint32_t> k0_arr, k1_arr;
    if (!ks.is_none()) {
        k_arr = CArray<int64_t>::ensure(ks);
        if (!k_arr || size_t(k_arr.size()) != flat) throw py::value_error("ks: expected T * n values");
    }
    if (!key0.is_none() || !key1.is_none()) {  // both or neither
        k0_arr = CArray<uint32_t>::ensure(key0);
        k1_arr = CArray<uint32_t>::ensure(key1);
        if (!k0_arr || !k1_arr || size_t(k0_arr.size()) != flat || size_t(k1_arr.size()) != flat)
            throw py::value_error("key0, key1: expected T * n values each");
    }
    // (a default-constructed array_t is an empty array, not a null handle: test the arguments)
    const int64_t* kp = ks.is_none() ? nullptr : k_arr.data();
    const bool keys_given = !key0.is_none() || !key1.is_none();
    const uint32_t* k0p = keys_given ? k0_arr.data() : nullptr;
    const uint32_t* k1p = keys_given ? k1_arr.data() : nullptr;
    uint64_t* u = used.mutable_data();
    m3k::TensorArgs& a = call.args;
    const uint64_t* fixed = a.trim_min;  // p.trim_min (nullptr: none)
    std::vector<uint64_t> trim(size_t(n), 0);
    std::vector<uint32_t> keys;
    const m3k::KernelTable& table = m3k::active_table();
    bool ok = true;
    {
        py::gil_scoped_release nogil;
        for (size_t t = 0; t < count && ok; ++t) {
            const int64_t numel = numels[t];
            a.numel = numel;
            for (int i = 0; i < n; ++i) call.models[i] = reinterpret_cast<const void*>(model_ptrs[t * n + i]);
            if (has_base) a.base = reinterpret_cast<const void*>(base_ptrs[t]);
            if (k0p) {
                a.key0 = k0p + t * n;
                a.key1 = k1p + t * n;
            }
            if (kp) {
                bool any = false;
                for (int i = 0; i < n; ++i) any = any || kp[t * n + i] > 0;
                if (any && numel > 0) {
                    keys.resize(size_t(n) * size_t(numel));
                    ok = table.delta_keys(a, keys.data());
                }
                for (int i = 0; i < n && ok; ++i) {
                    const int64_t k = kp[t * n + i];
                    if (k < 0) {
                        trim[i] = 0;  // no trim: keep all
                    } else if (k == 0 || numel == 0) {
                        trim[i] = uint64_t(1) << 32;  // keep nothing
                    } else {
                        const int64_t kk = k < numel ? k : numel;
                        uint32_t* row = keys.data() + size_t(i) * size_t(numel);
                        std::nth_element(row, row + (numel - kk), row + numel);
                        trim[i] = row[numel - kk];
                    }
                }
            } else {
                for (int i = 0; i < n; ++i) trim[i] = fixed ? fixed[i] : 0;
            }
            a.trim_min = trim.data();
            for (int i = 0; i < n; ++i) u[t * n + i] = trim[i];
            if (ok) ok = table.merge(a, reinterpret_cast<void*>(out_ptrs[t]), out_dtype);
        }
    }
    if (!ok) throw std::bad_alloc();
    return used;
}

py::tuple l1_sums(py::handle p, uintptr_t base_ptr, int base_dtype, const std::vector<uintptr_t>& model_ptrs,
                  const std::vector<int>& model_dtypes, int64_t numel, int64_t index_offset, bool keep_mask) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    const int n = call.args.n;
    py::array_t<double> total(n), kept(n);
    double* tp = total.mutable_data();
    double* kp = kept.mutable_data();
    const int64_t stride = numel > 0 ? (numel + 7) / 8 : 0;
    py::array_t<uint8_t> mask(keep_mask ? std::vector<py::ssize_t>{n, stride}
                                        : std::vector<py::ssize_t>{0, 0});
    uint8_t* mp = keep_mask ? mask.mutable_data() : nullptr;
    if (mp) std::memset(mp, 0, size_t(n) * size_t(stride));
    const m3k::KernelTable& t = m3k::active_table();
    {
        py::gil_scoped_release nogil;
        t.l1_sums(call.args, tp, kp, mp);
    }
    if (keep_mask) return py::make_tuple(total, kept, mask);
    return py::make_tuple(total, kept);
}

// Stage A: float64[groups, n, n] Gram matrices of v_i = f32(x_i) - b (docs/KERNEL.md).
py::array_t<double> gram(py::handle p, uintptr_t base_ptr, int base_dtype,
                         const std::vector<uintptr_t>& model_ptrs, const std::vector<int>& model_dtypes,
                         int64_t numel) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, 0);
    const int n = call.args.n;
    const int64_t groups = call.gram_groups();
    py::array_t<double> out({py::ssize_t(groups), py::ssize_t(n), py::ssize_t(n)});
    double* o = out.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = t.gram(call.args, groups, o);
    }
    if (!ok) throw std::bad_alloc();
    return out;
}

// Stage A: (shared, unique) int64[n] counts of combine 4 (docs/KERNEL.md).
py::tuple ram_counts(py::handle p, uintptr_t base_ptr, int base_dtype,
                     const std::vector<uintptr_t>& model_ptrs, const std::vector<int>& model_dtypes,
                     int64_t numel, int64_t index_offset) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, index_offset);
    if (!call.args.has_base) throw py::value_error("ram_counts needs has_base");
    const int n = call.args.n;
    py::array_t<int64_t> shared(n), unique(n);
    int64_t* sp = shared.mutable_data();
    int64_t* up = unique.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = t.ram_counts(call.args, sp, up);
    }
    if (!ok) throw std::bad_alloc();
    return py::make_tuple(shared, unique);
}

// Stage A, exact-k ties: (cmin, cmax) int64[n, ceil(numel / 1024)], keys equal to trim_min / trim_max
// per model and tie block.
py::tuple tie_counts(py::handle p, uintptr_t base_ptr, int base_dtype,
                     const std::vector<uintptr_t>& model_ptrs, const std::vector<int>& model_dtypes,
                     int64_t numel) {
    Call call(p, base_ptr, base_dtype, model_ptrs, model_dtypes, numel, 0);
    const int n = call.args.n;
    const int64_t nb = (numel + 1023) / 1024;
    py::array_t<int64_t> cmin({py::ssize_t(n), py::ssize_t(nb)}), cmax({py::ssize_t(n), py::ssize_t(nb)});
    int64_t* a0 = cmin.mutable_data();
    int64_t* a1 = cmax.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    bool ok;
    {
        py::gil_scoped_release nogil;
        ok = t.tie_counts(call.args, a0, a1);
    }
    if (!ok) throw std::bad_alloc();
    return py::make_tuple(cmin, cmax);
}

py::array_t<uint32_t> philox_u32(uint32_t key0, uint32_t key1, int64_t first, int64_t count) {
    if (first < 0 || count < 0) throw py::value_error("first and count must be >= 0");
    py::array_t<uint32_t> out(count);
    uint32_t* o = out.mutable_data();
    const m3k::KernelTable& t = m3k::active_table();
    {
        py::gil_scoped_release nogil;
        t.philox_u32(key0, key1, first, count, o);
    }
    return out;
}

// Multi-threaded memcpy: the reference point ("copy bandwidth") of the benchmarks. Each thread
// copies one contiguous share; chunk > 0 copies it in memcpy calls of at most `chunk` bytes
// (glibc switches to non-temporal stores for large calls, which are slow on some machines).
void copy_bytes(uintptr_t dst, uintptr_t src, int64_t nbytes, int64_t chunk) {
    if (nbytes <= 0) return;
    char* d = reinterpret_cast<char*>(dst);
    const char* s = reinterpret_cast<const char*>(src);
    py::gil_scoped_release nogil;
#pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = ((nbytes / nt) + 4095) & ~int64_t(4095);
        const int64_t lo = per * t < nbytes ? per * t : nbytes;
        const int64_t hi = per * (t + 1) < nbytes ? per * (t + 1) : nbytes;
        const int64_t step = chunk > 0 ? chunk : (hi - lo);
        for (int64_t off = lo; off < hi; off += step) {
            const int64_t len = hi - off < step ? hi - off : step;
            std::memcpy(d + off, s + off, size_t(len));
        }
    }
}

// Multi-threaded read of nbytes (XOR of the 64-bit words, returned so the loop is kept): the
// read-only memory rate, for comparison with the copy rate in the benchmarks.
uint64_t read_bytes(uintptr_t src, int64_t nbytes) {
    const uint64_t* s = reinterpret_cast<const uint64_t*>(src);
    const int64_t nwords = nbytes / 8;
    uint64_t all = 0;
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) reduction(^ : all)
    for (int64_t k = 0; k < nwords; ++k) all ^= s[k];
    return all;
}

std::vector<std::string> simd_levels() {
    const char* names[8];
    int k = m3k::supported_levels(names, 8);
    return std::vector<std::string>(names, names + k);
}

void set_simd_level(const std::string& name) {
    if (!m3k::set_level(name.c_str()))
        throw py::value_error("SIMD level '" + name +
                              "' is unknown or not supported by this CPU; supported: auto, " + [] {
                                  std::string s;
                                  for (auto& x : simd_levels()) s += (s.empty() ? "" : ", ") + x;
                                  return s;
                              }());
}

}  // namespace

void register_della_stage_a(py::module_& m);  // della_stage_a.cpp
void register_fisher_kernel(py::module_& m);  // fisher_kernel.cpp

PYBIND11_MODULE(_C, m) {
    m.doc() = "m3kernels fused CPU kernels (stage A statistics, stage B merge); see docs/KERNEL.md";
    if (const char* err = m3k::init_level_from_env()) throw py::import_error(err);

    m.def("merge", &merge, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("model_ptrs"),
          py::arg("model_dtypes"), py::arg("numel"), py::arg("out_ptr"), py::arg("out_dtype"),
          py::arg("index_offset") = 0,
          "Stage B: the fused merge of docs/KERNEL.md into out (numel elements).");
    m.def("histogram", &histogram, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"), py::arg("prefix") = py::none(),
          py::arg("index_offset") = 0,
          "Stage A: int64[n, 65536] histogram of bits(|delta after DARE|), high 16 bits or (prefix) low 16.");
    m.def("delta_keys", &delta_keys, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"), py::arg("index_offset") = 0,
          "Stage A, small tensors: uint32[n, numel] bits(|delta after DARE|), the values the histograms "
          "count.");
    m.def("sample_keys", &sample_keys, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"), py::arg("runs"),
          py::arg("index_offset") = 0,
          "Stage A, single pass: uint32[n, runs * 64] bits(|delta after DARE|) of runs of 64 elements "
          "at a stride of numel // runs.");
    m.def("bracket_count", &bracket_count, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"), py::arg("lo"), py::arg("span"),
          py::arg("fine_buckets"), py::arg("index_offset") = 0,
          "Stage A, single pass: (above int64[n], [int64[span[i]]] high-16 counts of each model's bucket "
          "range, "
          "int64[n, 4, 65536] low-16 counts of its fine buckets).");
    m.def("merge_batch", &merge_batch, py::arg("p"), py::arg("base_ptrs"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numels"), py::arg("out_ptrs"),
          py::arg("out_dtype"), py::arg("ks") = py::none(), py::arg("key0") = py::none(),
          py::arg("key1") = py::none(),
          "Stage A (exact select) and B for many small tensors in one call; returns the thresholds used.");
    m.def("l1_sums", &l1_sums, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"), py::arg("index_offset") = 0,
          py::arg("keep_mask") = false,
          "Stage A: (total, kept) float64[n] sums of |delta| for rescale: l1; with keep_mask, also "
          "uint8[n, (numel + 7) // 8] the DARE keep bits (LSB first, bit g = element g of the call).");
    m.def("gram", &gram, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("model_ptrs"),
          py::arg("model_dtypes"), py::arg("numel"),
          "Stage A: float64[groups, n, n] Gram matrices of f32(x_i) - b per tensor, row or column "
          "(p.coef_group), in the fixed summation order of docs/KERNEL.md.");
    m.def("ram_counts", &ram_counts, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
          py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"), py::arg("index_offset") = 0,
          "Stage A: (shared, unique) int64[n]: elements with |d_i| > ram_eps that other models share / "
          "do not share (combine 4).");
    m.def(
        "tie_counts", &tie_counts, py::arg("p"), py::arg("base_ptr"), py::arg("base_dtype"),
        py::arg("model_ptrs"), py::arg("model_dtypes"), py::arg("numel"),
        "Stage A, exact-k ties: (cmin, cmax) int64[n, ceil(numel / 1024)] keys equal to trim_min / trim_max "
        "per model and 1024-element block.");
    m.def("philox_u32", &philox_u32, py::arg("key0"), py::arg("key1"), py::arg("first"), py::arg("count"),
          "DARE stream words u32 for flat indices first .. first + count - 1.");
    m.def("copy", &copy_bytes, py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("nbytes"),
          py::arg("chunk") = 0, "Multi-threaded memcpy (benchmark reference); chunk: bytes per call.");
    m.def("read", &read_bytes, py::arg("src_ptr"), py::arg("nbytes"),
          "Multi-threaded read of nbytes (benchmark reference); returns the XOR of the words.");
    m.def("simd_level", [] { return std::string(m3k::active_level()); }, "The kernel variant in use.");
    m.def("simd_levels", &simd_levels, "The kernel variants this CPU supports (most portable first).");
    m.def("set_simd_level", &set_simd_level, py::arg("name"),
          "Use another supported variant ('generic', 'avx2', 'avx512' or 'auto').");
    m.def(
        "set_num_threads",
        [](int n) {
            if (n < 1) throw py::value_error("num_threads must be >= 1");
            omp_set_num_threads(n);
        },
        py::arg("n"), "OpenMP threads of later calls made from this thread.");
    m.def("get_num_threads", [] { return omp_get_max_threads(); });
    register_della_stage_a(m);
    register_fisher_kernel(m);
}
