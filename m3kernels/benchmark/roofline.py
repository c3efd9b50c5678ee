"""The roofline of a streaming kernel: the copy bandwidth of the same device, measured in the same run.

A merge reads every input once and writes the output once (stage B), so the bytes it moves are
``numel x (N x input element size + base element size, if the method reads the base + output
element size)``: N + 1 reads and one write (N reads for a method that ignores the base, as
``linear`` does). Its rate in GB/s (10^9 bytes per second) is set against the rate of a plain copy
(which also reads and writes: 2 x buffer bytes per copy), over a buffer as large as a case's
inputs, on the same device:

* CPU: the best of three multi-threaded copies: the extension's memcpy as one call per thread,
  the same in 64 KiB calls, and torch's ``copy_``; the read-only rate (one pass summing the words)
  is recorded beside it. A merge reads 3-4x what it writes, so it may pass 100% of a copy.
* CUDA: ``torch.Tensor.copy_`` on the device, timed with CUDA events.
"""

from __future__ import annotations

from m3kernels.benchmark.timing import time_call

GB = 1e9


def bytes_moved(
    numel: int, n: int, in_size: int, out_size: int, reads_base: bool, base_size: int | None = None
) -> int:
    """Bytes a merge of ``numel`` elements moves: N model reads, the base read (if used), one write."""
    if numel < 0 or n < 1:
        raise ValueError(f"numel must be >= 0 and n >= 1, got {numel}, {n}")
    base = (in_size if base_size is None else base_size) if reads_base else 0
    return numel * (n * in_size + base + out_size)


def gbps(nbytes: float, seconds: float) -> float | None:
    """nbytes / seconds in GB/s (10^9 B/s); None for a time <= 0."""
    if seconds is None or seconds <= 0:
        return None
    return nbytes / seconds / GB


def pct_of(rate: float | None, reference: float | None) -> float | None:
    """rate as a percentage of reference (None when either is missing or the reference is 0)."""
    if rate is None or not reference:
        return None
    return 100.0 * rate / reference


def copy_bandwidth(nbytes: int, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> dict:
    """The copy rates of ``device`` over an ``nbytes`` buffer (see the module docstring), in GB/s;
    ``reference_gbps`` is the one merges are compared with."""
    import torch

    nbytes = max(int(nbytes), 1 << 16)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    res = {"device": str(device), "bytes": nbytes, "repeats": repeats}
    other = 0.0

    def rate(fn, moved):
        nonlocal other
        t = time_call(fn, repeats=repeats, warmup=warmup, device=device)
        other += t.other_cpu_s or 0.0
        return gbps(moved, t.best)

    res["torch_copy_gbps"] = rate(lambda: dst.copy_(src), 2 * nbytes)
    rates = [res["torch_copy_gbps"]]
    if str(device) == "cpu":
        from m3kernels.backends import cpu

        if cpu.available():
            ext = cpu._C
            s, d = src.data_ptr(), dst.data_ptr()
            res["memcpy_gbps"] = rate(lambda: ext.copy(d, s, nbytes, 0), 2 * nbytes)
            res["memcpy_64k_chunks_gbps"] = rate(lambda: ext.copy(d, s, nbytes, 1 << 16), 2 * nbytes)
            res["read_only_gbps"] = rate(lambda: ext.read(s, nbytes), nbytes)
            rates += [res["memcpy_gbps"], res["memcpy_64k_chunks_gbps"]]
    res["reference_gbps"] = max(r for r in rates if r is not None)
    res["other_cpu_s"] = other
    return res


__all__ = ["GB", "bytes_moved", "gbps", "pct_of", "copy_bandwidth"]
