"""Loads the compiled extension, if there is one. Without it every op runs its pure-PyTorch reference."""
import importlib
import warnings

import torch  # noqa: F401  (loads libc10 / libtorch, which _C links against)

try:
    _C = importlib.import_module("insloc_ops._C")
    LOAD_ERROR = None
except ImportError as e:  # not built (or built for another torch): the reference backend still works
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    # Not built is what a pure-Python install means; a build that is there and does not load (made for another
    # torch, or its CUDA libraries missing) is said once here, or every op would quietly run the reference.
    if not isinstance(e, ModuleNotFoundError) or e.name != "insloc_ops._C":
        warnings.warn(f"insloc_ops: the compiled extension did not load ({LOAD_ERROR}); every op runs its "
                      "pure-PyTorch reference. Rebuild it for this torch: pip install --no-build-isolation -e .",
                      RuntimeWarning, stacklevel=2)

HAS_EXTENSION = _C is not None
