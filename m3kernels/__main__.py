"""``python -m m3kernels ...``: the same as the ``m3kernels`` command."""

from m3kernels.cli import entry

entry()
