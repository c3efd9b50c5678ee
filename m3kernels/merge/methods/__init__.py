"""Methods that own their stage A and coefficient computation (registry ``Method.family``).

Each family is a module here with a ``prepare(base, models, recipe, name, backend)`` hook that
returns :class:`Staged`: the :class:`~m3kernels.merge.kernel_params.KernelParams` and the input
list stage B gets (raw-value methods pass the base as model 0 with ``has_base = 0``), or a
``direct`` function for a method with no kernel pass (passthrough). :func:`m3kernels.api.merge_job`
calls :func:`merge` for every recipe with a family, so the tensor API, the checkpoint merge and the
GPU pipeline share this one path. docs/ADDING_A_METHOD.md describes how a family is added.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from m3kernels.errors import M3KError
from m3kernels.merge.kernel_params import KernelParams, make_params
from m3kernels.merge.registry import SUM

FAMILIES = (
    "passthrough",
    "elementwise",
    "breadcrumbs",
    "gram",
    "della",
    "sce",
    "arcee_fusion",
    "data_aware",
)


@dataclass
class Staged:
    """What stage B runs for one tensor: ``backend.merge(params, base, models, out)``, or
    ``direct(out)`` when the method needs no kernel pass."""

    params: KernelParams | None
    base: torch.Tensor | None
    models: Sequence[torch.Tensor]
    direct: Callable[[torch.Tensor], None] | None = None


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}")
    return importlib.import_module(f"m3kernels.merge.methods.{family}")


def backend_name(backend) -> str:
    return getattr(backend, "__name__", str(backend)).rsplit(".", 1)[-1]


class BackendFeatureError(M3KError, ValueError):
    """A method needs a kernel piece (``FEATURES``) the chosen backend does not have yet: a
    ``ValueError`` for the API, a user error (not an internal one) for the CLI."""


def missing_features(backend, method) -> list:
    """The kernel features ``method`` (a registry Method) may need that ``backend`` lacks."""
    have = getattr(backend, "FEATURES", frozenset())
    return [f for f in method.features if f not in have]


def require(backend, method: str, *features: str) -> None:
    """ValueError unless ``backend`` lists every one of ``features`` in its ``FEATURES``."""
    have = getattr(backend, "FEATURES", frozenset())
    missing = [f for f in features if f not in have]
    if missing:
        raise BackendFeatureError(
            f"method {method!r} is not implemented on backend {backend_name(backend)!r} yet "
            f"(it needs the kernel feature(s) {', '.join(missing)})"
        )


def stage(base, models, recipe, name: str, backend) -> Staged:
    """The family hook of ``recipe``: stage A and the stage-B program for one tensor."""
    return family_module(recipe.family).prepare(base, list(models), recipe, name, backend)


def merge(job, backend, out: torch.Tensor) -> torch.Tensor:
    """Stage A and stage B of one :class:`~m3kernels.merge.job.MergeJob` of a family method."""
    st = stage(job.base, job.models, job.recipe, job.name, backend)
    if st.direct is not None:
        st.direct(out)
    else:
        backend.merge(st.params, st.base, st.models, out)
    return out


def plain_params(recipe, name: str, n: int, has_base: bool, **fields) -> KernelParams:
    """KernelParams for ``n`` inputs with the plain program: no DARE, no trim, coefficients 1,
    combine SUM, lam 1 (``y = b + Σ coef_i d_i``); ``fields`` then replace any of them."""
    plain = dataclasses.replace(
        recipe,
        n=n,
        uses_base=has_base,
        combine=SUM,
        normalize=False,
        weights=(1.0,) * n,
        mix_ratios=(1.0,) * n,
        lambda_=1.0,
        dare_density=None,
        rescale=None,
        trim_density=None,
    )
    p = make_params(plain, name, has_base)
    return p.with_fields(**fields) if fields else p


__all__ = [
    "BackendFeatureError",
    "Staged",
    "stage",
    "merge",
    "require",
    "missing_features",
    "plain_params",
    "family_module",
    "FAMILIES",
]
