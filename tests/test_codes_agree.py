"""The numbers that Python, the C++ CPU kernels, the CUDA kernels and the Triton kernels each
write down for themselves agree.

The per-tensor parameter block is built in Python (m3kernels/merge/kernel_params.py) and read by
code in three other places that cannot import it: csrc/cpu/kernel_api.h (and the variants),
csrc/cuda/merge_args.h (and the kernels), m3kernels/backends/triton/kernels/. This test reads
their sources (no compiler, no GPU needed) and checks that the copies equal the Python ones:
dtype codes, combine codes, the parameter block's field names, the trim keep-all / keep-none
values and the DARE threshold range, the histogram size, the most models per CUDA launch and
the Philox constants.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from pathlib import Path

import pytest
import torch

from m3kernels.backends import cuda as cuda_backend
from m3kernels.merge import philox
from m3kernels.merge.kernel_params import (
    COMBINE_CODES,
    DTYPE_CODES,
    HIST_BINS,
    TRIM_KEEP_ALL,
    TRIM_KEEP_NONE,
    KernelParams,
)
from m3kernels.merge.registry import MEAN, SUM, TIES

ROOT = Path(__file__).resolve().parents[1]
CPU_API = "csrc/cpu/kernel_api.h"
CPU_IMPL = "csrc/cpu/variant_impl.h"
CPU_PHILOX = "csrc/cpu/philox_simd.h"
CUDA_ARGS = "csrc/cuda/merge_args.h"
CUDA_STATS = "csrc/cuda/stats_element.cuh"
CUDA_PHILOX = "csrc/cuda/philox.cuh"
TRITON = "m3kernels/backends/triton/kernels/"

CPP_DTYPES = {"kF32": torch.float32, "kBF16": torch.bfloat16, "kF16": torch.float16}
CPP_COMBINES = {"kSum": SUM, "kMean": MEAN, "kTies": TIES, "kNearswap": "nearswap", "kRam": "ram"}


def source(rel: str, comments: bool = False) -> str:
    """A source file's text, without its // and /* */ comments unless ``comments``."""
    text = (ROOT / rel).read_text()
    if not comments:
        text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
        text = re.sub(r"//[^\n]*", "", text)
    return text


_OPS = {
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.BitOr: operator.or_,
}


def c_int(expr: str) -> int:
    """The value of a C++ integer constant expression such as ``int64_t(1) << 31`` or ``0xFFu``."""
    e = re.sub(r"static_cast<\s*\w+\s*>", "", expr)
    e = re.sub(r"\b(?:u?int(?:8|16|32|64)_t|size_t|unsigned|int)\s*\(", "(", e)  # functional casts
    e = re.sub(r"\b(0[xX][0-9A-Fa-f]+|\d+)[uUlL]+\b", r"\1", e)  # literal suffixes

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not an integer constant expression: {expr!r}")

    return ev(ast.parse(e.strip(), mode="eval").body)


def cpp_enum(rel: str, name: str) -> dict:
    """{enumerator: value} of ``enum [class] name [: type] { ... }`` in a header."""
    m = re.search(r"\benum\s+(?:class\s+)?" + name + r"\b\s*(?::\s*\w+\s*)?\{(.*?)\}", source(rel), re.S)
    assert m, f"{rel}: no enum {name} (renamed or moved? update tests/test_codes_agree.py)"
    out = {}
    for item in filter(None, (s.strip() for s in m.group(1).split(","))):
        key, _, value = item.partition("=")
        assert value, f"{rel}: enum {name} member {item!r} has no explicit value"
        out[key.strip()] = c_int(value)
    return out


def cpp_constants(rel: str) -> dict:
    """{name: value} of every ``constexpr <integer type> kName = <expr>`` in a file (also
    ``constexpr T kA = 1, kB = 2;``)."""
    out = {}
    for decl in re.findall(
        r"\bconstexpr\s+(?:u?int(?:8|16|32|64)_t|int|unsigned|size_t)\s+([^;]+);", source(rel)
    ):
        for part in decl.split(","):
            name, _, value = part.partition("=")
            if value and re.fullmatch(r"\s*k\w+\s*", name):
                try:
                    out[name.strip()] = c_int(value)
                except (ValueError, SyntaxError):
                    pass  # not a plain integer expression (e.g. uses sizeof): not compared here
    return out


def cpp_struct_members(rel: str, name: str) -> set:
    """The data member names of ``struct name { ... };``."""
    m = re.search(r"\bstruct\s+" + name + r"\s*\{(.*?)\n\};", source(rel), re.S)
    assert m, f"{rel}: no struct {name}"
    return set(re.findall(r"([A-Za-z_]\w*)\s*(?:\[[^\]]*\])?\s*;", m.group(1)))


def triton_constants(rel: str) -> dict:
    """{NAME: value} of the module-level ``NAME = tl.constexpr(<int>)`` lines of a kernel file."""
    out = {}
    for name, value in re.findall(
        r"^([A-Z][A-Z0-9_]*)\s*=\s*tl\.constexpr\(([^)]*)\)", source(rel, True), re.M
    ):
        out[name] = ast.literal_eval(value.strip())
    return out


def loop_bounds(rel: str, var: str = "r") -> set:
    """The bounds N of every ``for (int var = 0; var < N; ++var)`` loop in a file."""
    return {
        int(n)
        for n in re.findall(
            r"for\s*\(\s*int\s+" + var + r"\s*=\s*0\s*;\s*" + var + r"\s*<\s*(\d+)\s*;", source(rel)
        )
    }


# ----------------------------------------------------------------------------- dtype and combine codes


@pytest.mark.parametrize("rel", [CPU_API, CUDA_ARGS])
def test_dtype_codes(rel):
    enum = cpp_enum(rel, "DType")
    assert set(enum) == set(CPP_DTYPES), f"{rel}: DType enumerators {sorted(enum)}"
    assert {CPP_DTYPES[k]: v for k, v in enum.items()} == DTYPE_CODES, rel


@pytest.mark.parametrize("rel", [CPU_API, CUDA_ARGS])
def test_combine_codes(rel):
    enum = cpp_enum(rel, "Combine")
    assert set(enum) == set(CPP_COMBINES), f"{rel}: Combine enumerators {sorted(enum)}"
    assert {CPP_COMBINES[k]: v for k, v in enum.items()} == COMBINE_CODES, rel


def test_triton_codes():
    consts = triton_constants(TRITON + "stage_b.py")
    assert {
        SUM: consts["COMBINE_SUM"],
        MEAN: consts["COMBINE_MEAN"],
        TIES: consts["COMBINE_TIES"],
    } == {k: COMBINE_CODES[k] for k in (SUM, MEAN, TIES)}
    # the launcher passes OUT_KIND = DTYPE_CODES[out.dtype]
    assert {
        torch.float32: consts["OUT_F32"],
        torch.bfloat16: consts["OUT_BF16"],
        torch.float16: consts["OUT_F16"],
    } == DTYPE_CODES


# ----------------------------------------------------------------------------- the parameter block


@pytest.mark.parametrize("rel,struct", [(CPU_API, "TensorArgs"), (CUDA_ARGS, "MergeArgs")])
def test_kernel_params_fields_are_struct_members(rel, struct):
    """Every KernelParams field has a member of the same name in the C++ argument block."""
    fields = {f.name for f in dataclasses.fields(KernelParams)}
    missing = fields - cpp_struct_members(rel, struct)
    assert not missing, f"{rel}: struct {struct} lacks {sorted(missing)}"


@pytest.mark.parametrize("rel", [CPU_API, CUDA_ARGS])
def test_trim_and_dare_ranges_documented_in_the_headers(rel):
    """trim_min: 0 keeps all, 2^32 keeps none; dare_thr: 0 .. 2^32 (keep iff u32 < thr)."""
    text = source(rel, comments=True)
    trim = [ln for ln in text.splitlines() if re.search(r"\btrim_min\b", ln) and "//" in ln]
    dare = [ln for ln in text.splitlines() if re.search(r"\bdare_thr\b", ln) and "//" in ln]
    assert trim and dare, f"{rel}: the trim_min / dare_thr members lost their comments"
    note = " ".join(ln.split("//", 1)[1] for ln in trim)
    keep_all = re.search(r"\b(\d+):?\s*(?:keep all|no trim)", note)
    keep_none = re.search(r"\b2\^(\d+):?\s*none", note)
    assert keep_all and int(keep_all.group(1)) == TRIM_KEEP_ALL, (rel, note)
    assert keep_none and 2 ** int(keep_none.group(1)) == TRIM_KEEP_NONE, (rel, note)
    rng = re.search(r"\((\d+)\s*\.\.\s*2\^(\d+)\)", " ".join(dare))
    assert rng, (rel, dare)
    assert int(rng.group(1)) == philox.keep_threshold(0.0) and 2 ** int(
        rng.group(2)
    ) == philox.keep_threshold(1.0)


def test_trim_keep_none_in_the_kernels():
    """The CPU variants treat trim_min > 0xffffffff as 'keep nothing' and 0 as 'no trim'; the
    CUDA kernel skips the trim for 0 and compares 32-bit patterns with the 64-bit trim_min."""
    impl = source(CPU_IMPL)
    m = re.search(r"tm\s*==\s*(\w+)\s*\?\s*0\s*:\s*\(\s*tm\s*>\s*(\w+)\s*\?\s*2\s*:\s*1\s*\)", impl)
    assert m, f"{CPU_IMPL}: the trim plan (0 off / 1 compare / 2 keep nothing) changed form"
    assert c_int(m.group(1)) == TRIM_KEEP_ALL
    assert c_int(m.group(2)) == (1 << 32) - 1 < TRIM_KEEP_NONE  # every 32-bit |d| pattern is below keep-none
    element = source("csrc/cuda/merge_element.cuh")
    assert re.search(r"trim_min\[i\];\s*if\s*\(\s*t\s*==\s*0\s*\)\s*return;", element), (
        "csrc/cuda/merge_element.cuh: trim() no longer skips trim_min == 0"
    )
    bindings = source("csrc/cuda/bindings.cpp")  # which values the CUDA argument parser accepts
    for field, largest in (("trim_min", TRIM_KEEP_NONE), ("dare_thr", philox.keep_threshold(1.0))):
        m = re.search(field + r"\[i\]\s*>\s*\((\w+\s*\(\s*1\s*\)\s*<<\s*\d+)\)", bindings)
        assert m, f"csrc/cuda/bindings.cpp: the range check of {field} changed form"
        assert largest <= c_int(m.group(1)), field


# ----------------------------------------------------------------------------- sizes


def test_histogram_bins():
    assert HIST_BINS == 1 << 16
    assert cpp_constants(CPU_IMPL)["kBins"] == HIST_BINS
    cuda = cpp_constants(CUDA_STATS)
    assert cuda["kHistBins"] == HIST_BINS
    assert cuda["kPass1Bins"] * 2 == HIST_BINS  # bits(|d|) < 2^31: the sign bit's half is empty
    assert triton_constants(TRITON + "stage_a.py")["HIST_BINS"] == HIST_BINS


def test_max_models_per_cuda_launch():
    assert cpp_constants(CUDA_ARGS)["kMaxModels"] == cuda_backend.MAX_MODELS


# ----------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("rel", [CPU_PHILOX, CUDA_PHILOX, TRITON + "philox.py"])
def test_philox_constants(rel):
    python = {"M0": philox.PHILOX_M0, "M1": philox.PHILOX_M1, "W0": philox.PHILOX_W0, "W1": philox.PHILOX_W1}
    if rel.endswith(".py"):
        consts = triton_constants(rel)
        got = {k: consts[f"PHILOX_{k}"] for k in python}
        rounds = {consts["PHILOX_ROUNDS"]}
    else:
        consts = cpp_constants(rel)
        got = {k: consts[f"kPhilox{k}"] for k in python}
        rounds = loop_bounds(rel)
        assert rounds, f"{rel}: no round loop found"
    assert got == python, rel
    assert rounds == {philox.PHILOX_ROUNDS}, rel
