"""Backend registry: which kernels exist here, and how ``backend="auto"`` chooses.

Each backend is a module satisfying :class:`m3kernels.backends.protocol.Backend`.

Every backend implements three per-tensor operations on contiguous tensors of one device
(``base`` is None when ``p.has_base`` is false; dtypes may be float32/bfloat16/float16,
mixed freely):

* ``l1_sums(p, base, models) -> (total, kept)``: float64[n] Σ|δ_i| and Σ|δ_i| over the
  DARE-kept elements (for ``rescale: l1``), summed in a fixed order (thread-count independent).
* ``histogram(p, base, models, prefix) -> numpy int64[n, 65536]``: counts of the high 16 bits
  (``prefix is None``) or, for elements whose high 16 bits equal ``prefix[i]``, of the low 16
  bits of bits(|δ'_i|), where δ' is the delta after the DARE drop and rescale (stage A).
* ``merge(p, base, models, out)``: stage B, the fused single pass of docs/KERNEL.md.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m3kernels.backends.protocol import Backend

log = logging.getLogger("m3kernels")

_MODULES = {
    "cpu": "m3kernels.backends.cpu",
    "triton": "m3kernels.backends.triton",
    "cuda": "m3kernels.backends.cuda",
}
_cache: dict = {}
_logged: set = set()


def _load(name: str):
    if name not in _cache:
        try:
            mod = importlib.import_module(_MODULES[name])
            _cache[name] = mod if mod.available() else None
            if _cache[name] is None:
                _cache[(name, "why")] = mod.unavailable_reason()
        except Exception as exc:  # a missing extension or missing triton: record why
            _cache[name] = None
            _cache[(name, "why")] = f"{type(exc).__name__}: {exc}"
    return _cache[name]


def available_backends() -> dict[str, str]:
    """{backend name: 'available' or the reason it is not} for this installation."""
    out = {}
    for name in _MODULES:
        out[name] = "available" if _load(name) is not None else _cache.get((name, "why"), "unavailable")
    return out


def get_backend(name: str, device) -> Backend:
    """The backend module for ``name`` ('auto', 'cpu', 'triton', 'cuda') on ``device``."""
    import torch

    device = torch.device(device)
    if name not in ("auto", *_MODULES):
        raise ValueError(f"backend must be one of auto, {', '.join(_MODULES)}; got {name!r}")
    if name == "auto":
        order = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
        for cand in order:
            mod = _load(cand)
            if mod is not None and mod.supports(device):
                if (cand, device.type) not in _logged:
                    log.info("m3kernels: using the %s backend on %s", cand, device.type)
                    _logged.add((cand, device.type))
                return mod
        raise RuntimeError(f"no m3kernels backend for device {device}: {available_backends()}")
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available: {_cache.get((name, 'why'))}")
    if not mod.supports(device):
        raise ValueError(f"backend {name!r} does not run on device {device}")
    return mod


__all__ = ["available_backends", "get_backend"]
