"""The test checkpoint factory is ``m3kernels.synthetic`` (re-exported here for older imports)."""

from m3kernels.synthetic import *  # noqa: F401,F403
from m3kernels.synthetic import __all__  # noqa: F401
