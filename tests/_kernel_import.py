"""Import helper for the kernel tests: `elastic_jax.kernels` when the package is installed and
importable, else the repo's `kernels/` folder loaded as a top-level package."""
from __future__ import annotations

import importlib
import os
import sys


def load_kernels():
    try:
        return importlib.import_module("elastic_jax.kernels")
    except Exception:  # not installed yet, or elastic_jax/__init__ not importable yet
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module("kernels")


kernels = load_kernels()
