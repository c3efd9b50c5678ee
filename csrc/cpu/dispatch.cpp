// Run-time choice of the kernel variant (generic / avx2 / avx512).
//
// The best variant the CPU and OS support is used unless M3KERNELS_SIMD names another one
// ("generic", "avx2", "avx512" or "auto"); set_level() switches at run time (tests use it to
// check that every variant gives the same bytes). Never compiled with -march=native.
#include <cstdlib>
#include <cstring>

#include "dispatch.h"

namespace m3k {

namespace {

struct Level {
    const char* name;
    const KernelTable& (*table)();
    bool (*supported)();
};

bool has_generic() {
    return true;
}

bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

bool has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

// Ordered from the most portable to the fastest.
const Level kLevels[] = {
    {"generic", table_generic, has_generic},
    {"avx2", table_avx2, has_avx2},
    {"avx512", table_avx512, has_avx512},
};
constexpr int kNumLevels = sizeof(kLevels) / sizeof(kLevels[0]);

int g_active = -1;

int best_level() {
    int best = 0;
    for (int i = 0; i < kNumLevels; ++i)
        if (kLevels[i].supported()) best = i;
    return best;
}

int find_level(const char* name) {
    for (int i = 0; i < kNumLevels; ++i)
        if (std::strcmp(kLevels[i].name, name) == 0) return i;
    return -1;
}

}  // namespace

const char* init_level_from_env() {
    const char* env = std::getenv("M3KERNELS_SIMD");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) {
        g_active = best_level();
        return nullptr;
    }
    int want = find_level(env);
    if (want < 0) {
        g_active = best_level();
        return "M3KERNELS_SIMD must be one of auto, generic, avx2, avx512";
    }
    // An unsupported request falls back to the best supported level below it.
    while (want > 0 && !kLevels[want].supported()) --want;
    g_active = want;
    return nullptr;
}

const KernelTable& active_table() {
    if (g_active < 0) init_level_from_env();
    return kLevels[g_active].table();
}

const char* active_level() {
    if (g_active < 0) init_level_from_env();
    return kLevels[g_active].name;
}

int supported_levels(const char** names, int cap) {
    int k = 0;
    for (int i = 0; i < kNumLevels && k < cap; ++i)
        if (kLevels[i].supported()) names[k++] = kLevels[i].name;
    return k;
}

bool set_level(const char* name) {
    int want = std::strcmp(name, "auto") == 0 ? best_level() : find_level(name);
    if (want < 0 || !kLevels[want].supported()) return false;
    g_active = want;
    return true;
}

}  // namespace m3k
