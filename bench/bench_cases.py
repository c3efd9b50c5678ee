"""The methods every tensor benchmark (CPU and GPU) times, with the same parameters."""

MIXUP_ALPHA = 0.5

METHODS = {
    "linear": dict(method="linear"),
    "task_arithmetic": dict(method="task_arithmetic", lambda_=1.0),
    "ties": dict(method="ties", density=0.2),
    "dare_linear": dict(method="dare_linear", density=0.5),
    "dare_ties": dict(method="dare_ties", density=0.5),
    "ties_dare": dict(method="ties_dare", drop_rate=0.5, density=0.2),
    "ties_m3": dict(method="ties", density=0.2, mixup_alpha=MIXUP_ALPHA),
}
