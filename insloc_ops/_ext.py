"""Loads the compiled extension, if there is one. Without it every op runs its pure-PyTorch reference."""
import importlib

import torch  # noqa: F401  (loads libc10 / libtorch, which _C links against)

try:
    _C = importlib.import_module("insloc_ops._C")
    LOAD_ERROR = None
except ImportError as e:  # not built (or built for another torch): the reference backend still works
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"

HAS_EXTENSION = _C is not None
