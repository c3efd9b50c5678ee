// What the extension's CUDA runtime sees: its version, the driver's, and the device count.
//
// The extension links the toolkit's cudart, which may be newer than PyTorch's and than what
// the installed driver supports; the Python backend asks here before it calls itself available.
#include <cuda_runtime.h>

#include "launch.h"

namespace m3k {

RuntimeInfo runtime_info() {
    RuntimeInfo info{};
    cudaRuntimeGetVersion(&info.runtime_version);
    cudaDriverGetVersion(&info.driver_version);
    const cudaError_t err = cudaGetDeviceCount(&info.device_count);
    if (err != cudaSuccess) {
        info.device_count = 0;
        info.error = cudaGetErrorString(err);
        cudaGetLastError();  // reset the thread's last error so later calls start clean
    }
    return info;
}

}  // namespace m3k
