"""Triton kernels. Each module registers its kernels as the implementation of an ``insloc_ops::*_triton``
op for CPU (run by the Triton interpreter, TRITON_INTERPRET=1) and CUDA tensors."""
import importlib
import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_MODULES = ("roi_align", "anchors", "infonce")


def register():
    if not HAS_TRITON:
        return []
    loaded = []
    for name in KERNEL_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        importlib.import_module(f"{__name__}.{name}").register()
        loaded.append(name)
    return loaded
