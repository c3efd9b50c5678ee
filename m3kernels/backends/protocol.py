"""What a kernel backend is: the :class:`Backend` protocol every backend module satisfies.

A backend is a module (``m3kernels.backends.cpu``, ``.triton``, ``.cuda``) with these functions.
``get_backend`` hands one out; stage A (:func:`m3kernels.api.prepare`) and stage B
(:func:`m3kernels.api.merge_job`) call only what is declared here. Tensors are contiguous, on one
device, float32/bfloat16/float16 in any mix; ``base`` is None when ``p.has_base`` is false.
Optional extras a backend may add (checked with ``hasattr``): ``delta_keys`` (the |δ'| bit
patterns of a small tensor, for an exact sort-based threshold) and ``merge_batch`` (many small
tensors in one call).

The pieces of issue 8 (docs/KERNEL.md) are announced, not guessed: each backend module has
``FEATURES: frozenset[str]`` naming those it implements: ``"trim_max"`` (the trim window),
``"group_coef"`` (per-row / per-column coefficients), ``"nearswap"`` (combine 3), ``"ram"``
(combine 4), and the optional stage-A extras

* ``"gram"``: ``gram(p, base, models) -> np.ndarray`` float64[groups, n, n], the Gram matrices of
  ``f32(x_i) - b`` per tensor / row / column (``p.coef_group``) in the documented summation order
  (a module constant ``GRAM_EXACT_ORDER = False`` says a backend only agrees to 1e-12 relative);
* ``"ram_counts"``: ``ram_counts(p, base, models) -> (shared, unique)``, int64[n] each;
* ``"trim_ties_k"``: the exact-k tie rule in stage B (``p.tie_keep`` / ``p.tie_skip`` with their
  per-1024-block prefixes) and ``tie_counts(p, base, models) -> (cmin, cmax)``, int64[n, blocks].

A backend without a name in ``FEATURES`` must not be handed that piece: the method layer raises
"method X is not implemented on backend Y yet" instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from m3kernels.merge.kernel_params import KernelParams


@runtime_checkable
class Backend(Protocol):
    def available(self) -> bool:
        """True when this installation can run the backend at all."""

    def unavailable_reason(self) -> str:
        """Why not ('' when available)."""

    def supports(self, device) -> bool:
        """True when the backend runs on tensors of ``device``."""

    def l1_sums(
        self, p: KernelParams, base: torch.Tensor | None, models: Sequence[torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """float64[n] Σ|δ_i| and Σ|δ_i| over the DARE-kept elements, in a fixed order."""

    def histogram(
        self, p: KernelParams, base: torch.Tensor | None, models: Sequence[torch.Tensor], prefix
    ) -> np.ndarray:
        """int64[n, 65536] counts of the high 16 bits of bits(|δ'_i|) (``prefix`` None), or of the
        low 16 bits among elements whose high 16 bits equal ``prefix[i]``."""

    def merge(
        self, p: KernelParams, base: torch.Tensor | None, models: Sequence[torch.Tensor], out: torch.Tensor
    ) -> None:
        """Stage B: the fused pass of docs/KERNEL.md into ``out``."""


__all__ = ["Backend"]
