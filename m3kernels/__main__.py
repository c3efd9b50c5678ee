"""``python -m m3kernels ...``: the same as the ``m3kernels`` command."""

import sys

from m3kernels.cli import main

sys.exit(main())
