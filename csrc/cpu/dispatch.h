// Run-time selection of the kernel variant (see dispatch.cpp).
#pragma once

#include "kernel_api.h"

namespace m3k {

// Reads M3KERNELS_SIMD; returns an error message for an unknown name, else nullptr.
const char* init_level_from_env();
const KernelTable& active_table();
const char* active_level();
// Names of the variants this CPU supports (most portable first); returns how many.
int supported_levels(const char** names, int cap);
// Switch to a supported variant ("auto" = best); false when unknown or unsupported.
bool set_level(const char* name);

}  // namespace m3k
