"""Adapter for tools that hold models as in-memory state dicts (PEFT scripts, training loops).

``merge_state_dicts(base_sd, [sd_1, ..., sd_N], method=..., **kwargs)`` merges every floating
tensor with :func:`m3kernels.merge_tensors`, keying the DARE stream by the tensor's name and
drawing the M³ ratios once for the whole model (as the checkpoint merger does), so its result
equals ``m3kernels merge`` on the same weights. Non-float tensors are taken from the base.

    python python/state_dict_adapter.py      # merges two random "fine-tunes" of a tiny MLP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

import m3kernels


def merge_state_dicts(
    base_sd: Mapping[str, torch.Tensor] | None,
    model_sds: Sequence[Mapping[str, torch.Tensor]],
    *,
    method: str,
    mixup_alpha: float | None = None,
    seed: int = 0,
    **kwargs,
) -> dict:
    """Merge whole state dicts tensor by tensor; returns a new state dict."""
    if not model_sds:
        raise ValueError("model_sds: at least one model is needed")
    ratios = kwargs.pop("mix_ratios", None)
    if mixup_alpha is not None:  # one M³ draw per merge, not per tensor
        ratios = m3kernels.draw_mix_ratios(mixup_alpha, len(model_sds), seed)
    merged = {}
    ref = base_sd if base_sd is not None else model_sds[0]
    for name, ref_t in ref.items():
        missing = [i for i, sd in enumerate(model_sds) if name not in sd]
        if missing:
            raise ValueError(f"tensor {name!r} is missing from model(s) {missing}")
        if not ref_t.is_floating_point():
            merged[name] = ref_t.clone()
            continue
        merged[name] = m3kernels.merge_tensors(
            base_sd[name] if base_sd is not None else None,
            [sd[name] for sd in model_sds],
            method=method,
            mix_ratios=ratios,
            seed=seed,
            name=name,
            **kwargs,
        )
    return merged


def _demo() -> None:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    base_sd = {k: v.detach().to(torch.bfloat16) for k, v in base.state_dict().items()}
    tunes = [
        {k: (v.float() + 0.01 * torch.randn_like(v.float())).to(torch.bfloat16) for k, v in base_sd.items()}
        for _ in range(2)
    ]
    out = merge_state_dicts(base_sd, tunes, method="dare_ties", density=0.3, mixup_alpha=0.5, seed=7)
    lam = m3kernels.draw_mix_ratios(0.5, 2, 7)[0]
    print(f"DARE-TIES + M³ (λ = {lam:.4f}) over {len(out)} tensors:")
    for k, v in out.items():
        moved = (v.float() - base_sd[k].float()).abs().mean().item()
        print(f"  {k:10s} {str(tuple(v.shape)):12s} mean |θ - θ0| = {moved:.5f}")


if __name__ == "__main__":
    _demo()
