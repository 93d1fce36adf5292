"""Triton kernels. Each module registers its kernels as the implementation of an ``insloc_ops::*_triton``
op for CPU (run by the Triton interpreter, TRITON_INTERPRET=1) and CUDA tensors."""
import functools
import importlib
import importlib.util

import torch

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


def tensor_device(args):
    """The device of the first tensor among args (looking into lists and tuples), or None."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            found = tensor_device(a)
            if found is not None:
                return found
    return None


def on_tensor_device(fn):
    """fn run with its tensors' CUDA device current. Triton launches on the current device and its current
    stream, not on the device of the pointers it is given: a tensor on cuda:1 while cuda:0 is current would
    be read by a kernel running on cuda:0. (The CUDA C++ kernels take a device guard for the same reason.)"""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = tensor_device(args)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def register_kernel(op, fn):
    """fn as the CPU (interpreter) and CUDA implementation of insloc_ops::op, run on its tensors' device."""
    torch.library.register_kernel(f"insloc_ops::{op}", ("cpu", "cuda"), on_tensor_device(fn))
