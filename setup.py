"""Build script: the fused CPU extension (always) and the CUDA extension (when nvcc is found).

* ``m3kernels._C``: csrc/cpu/*.cpp with pybind11 and OpenMP. Portable baseline code plus
  AVX2 and AVX-512 variants compiled through ``#pragma GCC target`` and chosen at run time;
  never ``-march=native``. ``-ffp-contract=off`` keeps every float32 operation separately
  rounded, which is what makes results identical across backends.
* ``m3kernels._cuda``: csrc/cuda/*.cu compiled by nvcc (``-fmad=false``), bound with
  pybind11 through raw pointers and a stream handle, so it does not depend on the PyTorch
  C++ ABI. ``M3KERNELS_BUILD_CUDA=1`` forces it (failing if nvcc is missing), ``=0`` skips it,
  unset builds it when ``nvcc`` is found.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CPU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
CUDA_BINDINGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
CUDA_ARCHS = os.environ.get("M3KERNELS_CUDA_ARCHS", "80;90").split(";")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cuda_home(nvcc):
    """The toolkit root for ``nvcc``, also when ``nvcc`` on PATH is a wrapper script."""
    for cand in (
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        str(Path(nvcc).resolve().parent.parent),
        "/usr/local/cuda",
    ):
        if cand and (Path(cand) / "include" / "cuda_runtime.h").exists():
            return Path(cand)
    try:  # nvcc --dryrun prints the toolkit root as "#$ TOP=..."
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                return Path(line.split("TOP=", 1)[1].strip())
    except OSError:
        pass
    sys.exit(f"cannot find the CUDA toolkit (include/cuda_runtime.h) for {nvcc}: set CUDA_HOME")


def want_cuda():
    flag = os.environ.get("M3KERNELS_BUILD_CUDA", "auto").lower()
    nvcc = find_nvcc()
    if flag in ("0", "false", "no", "off"):
        return None
    if flag in ("1", "true", "yes", "on") and nvcc is None:
        sys.exit("M3KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    if not CUDA_SOURCES:
        return None
    return nvcc


class BuildExt(build_ext):
    """build_ext that compiles .cu files with nvcc before the normal C++ link."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            nvcc = find_nvcc()
            cuda_home = find_cuda_home(nvcc)
            objs = []
            build_temp = Path(self.build_temp) / "cuda"
            build_temp.mkdir(parents=True, exist_ok=True)
            gencode = []
            for arch in CUDA_ARCHS:
                gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            for src in cu:
                obj = build_temp / (Path(src).stem + ".o")
                cmd = [
                    nvcc,
                    "-c",
                    src,
                    "-o",
                    str(obj),
                    "-O3",
                    "-std=c++17",
                    "-fmad=false",
                    "-Xcompiler",
                    "-fPIC",
                    "-Icsrc/cuda",
                    *gencode,
                ]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                objs.append(str(obj))
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = objs
            ext.include_dirs.append(str(cuda_home / "include"))
            ext.library_dirs.append(str(cuda_home / "lib64"))
            ext.libraries.append("cudart")
            ext.runtime_library_dirs.append(str(cuda_home / "lib64"))
        super().build_extension(ext)


ext_modules = [
    Pybind11Extension(
        "m3kernels._C",
        CPU_SOURCES,
        include_dirs=["csrc/cpu"],
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.h")),
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
]
if want_cuda():
    ext_modules.append(
        Pybind11Extension(
            "m3kernels._cuda",
            CUDA_BINDINGS + CUDA_SOURCES,
            include_dirs=["csrc/cuda"],
            cxx_std=17,
            extra_compile_args=["-O2"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
