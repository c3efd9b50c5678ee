"""The method and dtype cases every backend's test matrix runs (one table for all backends)."""

import torch

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

METHOD_CASES = {
    "linear": dict(method="linear"),
    "linear_w": dict(method="linear", weights=[0.3, 0.7, 1.1]),
    "average_sum": dict(method="average", normalize=False, weights=0.5),
    "task_arith": dict(method="task_arithmetic", lambda_=0.7),
    "ties": dict(method="ties", density=0.3),
    "ties_full": dict(method="ties", density=1.0),
    "ties_nonorm_w": dict(method="ties", density=[0.2, 0.5, 0.9], normalize=False, weights=[1.0, 0.6, 1.3]),
    "dare_linear": dict(method="dare_linear", density=0.6),
    "dare_lin_norescale": dict(method="dare_linear", drop_rate=0.3, rescale=False),
    "dare_ties_l1": dict(method="dare_ties", density=0.5, rescale="l1"),
    "ties_dare": dict(method="ties_dare", drop_rate=0.4, density=0.5),
    "ties_dare_sparse": dict(method="ties_dare", drop_rate=0.9, density=0.3),  # threshold 0: many zeros
    "ties_m3": dict(method="ties", density=0.4, mixup_alpha=0.4, seed=11),
    "task_m3": dict(method="task_arithmetic", mixup_alpha=2.0, seed=5, lambda_=0.9),
    "dare_ties_m3": dict(method="dare_ties", density=0.7, mixup_alpha=0.5, seed=3),
}

DTYPE_CASES = {  # (base dtype, model dtypes (cycled), out dtype)
    "bf16": (BF16, [BF16], BF16),
    "f16": (F16, [F16], F16),
    "f32": (F32, [F32], F32),
    "mixed": (BF16, [F32, F16, BF16], F16),
    "mixed_f32out": (F16, [BF16, F32], F32),
}


def kwargs_for(case: str, n: int) -> dict:
    """merge_tensors keyword arguments of ``case`` for ``n`` models (per-model lists cycled to n)."""
    kw = dict(METHOD_CASES[case])
    for k in ("weights", "density", "drop_rate"):
        if isinstance(kw.get(k), list):
            kw[k] = [kw[k][i % len(kw[k])] for i in range(n)]
    return kw
