"""The method and dtype cases every backend's test matrix runs (one table for all backends).

``METHOD_CASES`` x ``DTYPE_CASES`` x N is the matrix of test_merge_tensors (CPU, Triton),
test_triton_backend, test_cuda_emulation, test_gpu_backends and test_cpu_backend's bit-for-bit
stage B; tests/cuda_sanitize_driver.py and bench/bench_cases.py pick entries by name. A new
method gets its rows here and every backend's tests run it.

``N_DTYPE_CASES`` and ``EDGE_CASES`` are the extra rows of the fast bit-for-bit matrix
(test_cpu_backend): N up to 6 with each model's dtype spelled out, and parameter edge cases.
"""

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
    "dare_linear_l1": dict(method="dare_linear", density=[0.3, 0.8, 0.6], rescale="l1", lambda_=0.8),
    "dare_ties": dict(method="dare_ties", density=[0.5, 0.7, 0.4]),
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
    "mixed_bf16out": (F32, [F16, BF16], BF16),
}

# (base dtype, [the dtype of each model], out dtype): N = 1 .. 6, uniform and mixed (the CPU kernel
# unrolls N <= 4 and has dtype-specialised loops when every tensor has the output's dtype)
N_DTYPE_CASES = [
    (BF16, [BF16], BF16),
    (F32, [F16, BF16], F16),
    (F16, [F32, F16, BF16], F32),
    (BF16, [F16, F32], BF16),
    (BF16, [BF16, BF16], BF16),
    (F16, [F16] * 4, F16),
    (F32, [F32] * 5, F32),
    (BF16, [BF16, F16, F32, BF16, F16, F32], BF16),
]

EDGE_CASES = {  # negative weights, lambda != 1, explicit mix ratios, default density, rates 0 and 1
    "linear_neg_w": dict(method="linear", weights=[0.7, -0.2, 1.1]),
    "task_neg_w": dict(method="task_arithmetic", lambda_=0.6, weights=[1.0, -0.5, 0.25]),
    "ties_default": dict(method="ties"),
    "ties_nonorm_lam": dict(method="ties", density=0.45, normalize=False, lambda_=1.3),
    "ties_mix_ratios": dict(method="ties", mix_ratios=[0.3, 0.5, 0.2], weights=[1.0, 2.0, 0.5]),
    "dare_linear_07": dict(method="dare_linear", density=0.7),
    "dare_lin_norescale_w": dict(method="dare_linear", density=[0.5, 0.9, 0.3], rescale=False),
    "dare_linear_l1_06": dict(method="dare_linear", density=0.6, rescale="l1"),
    "dare_ties_w": dict(method="dare_ties", density=0.5, weights=[1.0, 0.6, 1.4]),
    "ties_dare_03": dict(method="ties_dare", drop_rate=0.3, density=0.4),
    "ties_dare_edges": dict(method="ties_dare", drop_rate=[0.0, 1.0, 0.5], density=[0.2, 0.5, 0.0]),
}


def kwargs_for(case: str, n: int) -> dict:
    """merge_tensors keyword arguments of ``case`` (in METHOD_CASES or EDGE_CASES) for ``n`` models:
    per-model lists cycled to n, mix ratios then normalised to sum 1."""
    kw = dict(METHOD_CASES[case] if case in METHOD_CASES else EDGE_CASES[case])
    for k in ("weights", "density", "drop_rate", "mix_ratios"):
        if isinstance(kw.get(k), list):
            kw[k] = [kw[k][i % len(kw[k])] for i in range(n)]
    if "mix_ratios" in kw:
        kw["mix_ratios"] = [x / sum(kw["mix_ratios"]) for x in kw["mix_ratios"]]
    return kw


# The issue-8 methods with their own stage A (registry ``family``): read by tests/test_methods_*.py
# only (the bit-for-bit matrices above stay the generic task-vector program). name -> (merge_tensors
# keyword arguments, the model counts to run).
FAMILY_CASES = {
    "passthrough": (dict(method="passthrough"), [1]),
    "passthrough_scale": (dict(method="passthrough", scale=0.37), [1]),
    "nearswap": (dict(method="nearswap", t=0.004), [1]),
    "nearswap_big_t": (dict(method="nearswap", t=5.0), [1]),
    "ram": (dict(method="ram", epsilon=0.008), [1, 2, 3, 5]),
    "ram_default": (dict(method="ram"), [2, 3]),
    "ramplus_tl": (dict(method="ramplus_tl", epsilon=0.008), [1, 2, 3, 5]),
    "ramplus_tl_r": (dict(method="ramplus_tl", epsilon=0.01, r=0.5, alpha=3.0), [2, 3]),
    "breadcrumbs": (dict(method="breadcrumbs", density=0.6, gamma=0.05), [1, 2, 3]),
    "breadcrumbs_w": (
        dict(method="breadcrumbs", density=[0.3, 0.9, 0.5], gamma=[0.1, 0.0, 0.3], weights=[1.0, -0.5, 0.7]),
        [2, 3],
    ),
    "breadcrumbs_ties": (dict(method="breadcrumbs_ties", density=0.5, gamma=0.02), [1, 2, 3]),
    "breadcrumbs_ties_norm": (
        dict(method="breadcrumbs_ties", density=[0.2, 0.7, 0.95], normalize=True, lambda_=0.8),
        [2, 3],
    ),
    "breadcrumbs_m3": (dict(method="breadcrumbs", density=0.7, mixup_alpha=0.5, seed=4), [2, 3]),
    "slerp": (dict(method="slerp", t=0.3), [1]),
    "slerp_t0": (dict(method="slerp", t=0.0), [1]),
    "slerp_extrapolate": (dict(method="slerp", t=1.4), [1]),
    "slerp_m3": (dict(method="slerp", mixup_alpha=0.7, seed=9), [1]),
    "nuslerp": (dict(method="nuslerp", weights=[1.0, 2.0]), [2]),
    "nuslerp_rows": (dict(method="nuslerp", weights=[0.4, 0.6], nuslerp_flatten=False), [2]),
    "nuslerp_cols": (dict(method="nuslerp", nuslerp_flatten=False, nuslerp_row_wise=True), [2]),
    "nuslerp_m3": (dict(method="nuslerp", mix_ratios=[0.3, 0.7]), [2]),
    "multislerp": (dict(method="multislerp"), [1, 2, 3, 4]),
    "multislerp_w": (dict(method="multislerp", weights=[0.2, 0.5, 1.0, 0.3], eps=1e-6), [2, 3, 4]),
    "multislerp_raw_w": (dict(method="multislerp", weights=[2.0, 1.0, 0.5], normalize_weights=False), [2, 3]),
    "karcher": (dict(method="karcher"), [1, 2, 3, 4]),
    "karcher_iter": (dict(method="karcher", max_iter=40, tol=1e-9), [2, 3]),
    "karcher_m3": (dict(method="karcher", mixup_alpha=1.5, seed=2), [2, 3]),
    "model_stock": (dict(method="model_stock"), [2, 3, 4]),
    "model_stock_rows": (dict(method="model_stock", filter_wise=True), [2, 3]),
}


def family_kwargs(case: str, n: int) -> dict:
    """FAMILY_CASES keyword arguments of ``case`` for ``n`` models (per-model lists cut to n)."""
    kw = dict(FAMILY_CASES[case][0])
    for k in ("weights", "density", "gamma", "mix_ratios"):
        if isinstance(kw.get(k), list):
            kw[k] = [kw[k][i % len(kw[k])] for i in range(n)]
    return kw
