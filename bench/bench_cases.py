"""The methods every tensor benchmark (CPU and GPU) times, with the same parameters.

Each entry is a case of the tests' one table (tests/cases.py) with the benchmark's own parameters
on top: the densities, drop rates and λ that bench/RESULTS.md's figures were measured with.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(  # by path: no tests/ folder on sys.path
    "m3kernels_test_cases", Path(__file__).resolve().parents[1] / "tests" / "cases.py"
)
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)

MIXUP_ALPHA = 0.5


def _case(name: str, **params) -> dict:
    """tests/cases.py's ``name`` with ``params`` replacing its parameters."""
    return {**_cases.METHOD_CASES[name], **params}


METHODS = {
    "linear": _case("linear"),
    "task_arithmetic": _case("task_arith", lambda_=1.0),
    "ties": _case("ties", density=0.2),
    "dare_linear": _case("dare_linear", density=0.5),
    "dare_ties": _case("dare_ties", density=0.5),
    "ties_dare": _case("ties_dare", drop_rate=0.5, density=0.2),
}
METHODS["ties_m3"] = {**METHODS["ties"], "mixup_alpha": MIXUP_ALPHA}  # the TIES benchmark + M³
