"""Every CUDA source compiles with nvcc (setup.py's flags, one architecture): no GPU needed.

Skipped when nvcc is absent. Each ``csrc/cuda/*.cu`` is compiled with ``-c`` into a temporary
directory for sm_90 (``M3KERNELS_TEST_CUDA_ARCH`` overrides), in parallel, keeping the PTX, which
must have no fused multiply-add and only IEEE divisions; the pybind11 binding file is
syntax-checked with the C++ compiler against the CUDA and Python headers.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCH = os.environ.get("M3KERNELS_TEST_CUDA_ARCH", "90")


def find_nvcc():
    """nvcc as setup.py finds it: $CUDA_HOME/bin/nvcc, else the PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include(nvcc: str) -> Path:
    """The toolkit's include dir (nvcc may be a wrapper script outside the toolkit)."""
    out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return Path(line.split("TOP=", 1)[1].strip()) / "include"
    return Path(nvcc).resolve().parent.parent / "include"


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")

CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def _compile(src: Path, out_dir: Path) -> tuple[Path, int, str]:
    cmd = [
        NVCC,
        "-c",
        str(src),
        "-o",
        str(out_dir / (src.stem + ".o")),
        "-O3",
        "-std=c++17",
        "-fmad=false",
        "-Xcompiler",
        "-fPIC",
        f"-I{CUDA_DIR}",
        "-gencode",
        f"arch=compute_{ARCH},code=sm_{ARCH}",
        "-keep",  # the PTX stays in out_dir for test_ptx_is_unfused_ieee
        f"-keep-dir={out_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src, proc.returncode, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


def test_there_are_cuda_sources():
    assert CU_SOURCES, f"no .cu files in {CUDA_DIR}"
    assert list(CUDA_DIR.glob("*.cpp")), "the pybind11 binding file is missing"


def test_every_cu_file_compiles(compiled):
    tmp_path, results = compiled
    failed = [(src.name, log) for src, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(f"{name} failed to compile:\n{log}" for name, log in failed)
    for src, _, log in results:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0, log
        ours = [line for line in log.splitlines() if "warning" in line.lower() and "csrc/cuda" in line]
        assert not ours, f"{src.name} compiled with warnings in our sources:\n{log}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda")
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return out, list(pool.map(lambda s: _compile(s, out), CU_SOURCES))


def test_ptx_is_unfused_ieee(compiled):
    """docs/KERNEL.md: every float operation one IEEE rounding. The kernels' PTX has no fma (float32
    or float64: the gram sums too), and divisions are div.rn."""
    out, results = compiled
    assert all(rc == 0 for _, rc, _ in results), "compile failed (see test_every_cu_file_compiles)"
    ptx = {p.name: p.read_text() for p in out.glob("*.ptx")}
    assert {f"{s.stem}.ptx" for s in CU_SOURCES if s.stem != "device_info"} <= set(ptx), sorted(ptx)
    for name, text in ptx.items():
        # the only fma is V1's explicit __fmaf_rn (fma.rn.f32), in the merge kernels with the round-2
        # pieces compiled in (EXT, the last template argument) and the exact-k tie kernel
        for entry in text.split(".entry")[1:]:
            fn = entry.split("(", 1)[0].strip()
            fmas = set(re.findall(r"\bfma\.[a-z0-9.]+", entry))
            if ("merge_kernel" in fn and fn.endswith("ELb1EEEvNS_9MergeArgsE")) or "merge_ties_kernel" in fn:
                assert fmas <= {"fma.rn.f32"}, (name, fn, fmas)
            else:
                assert not fmas, f"{name}: fused multiply-add in {fn}"
        assert "div.approx" not in text and "div.full" not in text, f"{name}: approximate division"
    assert "div.rn.f32" in ptx["merge_kernel.ptx"] and "fma.rn.f32" in ptx["merge_kernel.ptx"]
    assert "add.rn.f64" in ptx["gram_kernel.ptx"] and "mul.rn.f64" in ptx["gram_kernel.ptx"]


def test_binding_file_compiles():
    pybind11 = pytest.importorskip("pybind11")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for src in sorted(CUDA_DIR.glob("*.cpp")):
        cmd = [
            cxx,
            "-fsyntax-only",
            "-std=c++17",
            "-Wall",
            f"-I{CUDA_DIR}",
            f"-I{cuda_include(NVCC)}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr
        assert "warning" not in proc.stderr.lower() or "csrc/cuda" not in proc.stderr, proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
