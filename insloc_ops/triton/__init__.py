"""Triton kernels. Each module registers its kernels as the implementation of an ``insloc_ops::*_triton``
op for CPU (run by the Triton interpreter, TRITON_INTERPRET=1) and CUDA tensors."""
import functools
import importlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_MODULES = ("roi_align", "anchors", "infonce")
_interpreted = None  # set by register(): whether the kernels were made for the interpreter


def register():
    global _interpreted
    if not HAS_TRITON:
        return []
    loaded = []
    for name in KERNEL_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        module.register()
        loaded.append(name)
        if _interpreted is None:
            _interpreted = _made_for_interpreter(module)
    return loaded


def _made_for_interpreter(module):
    """Whether the module's kernels are the interpreter's (None if it has none). Triton decides when a kernel
    is defined, from TRITON_INTERPRET at that moment; setting or clearing the variable later changes nothing."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    kinds = {isinstance(v, InterpretedFunction) for v in vars(module).values()
             if isinstance(v, (InterpretedFunction, JITFunction))}
    return kinds.pop() if len(kinds) == 1 else None


def interpreted():
    """Whether the Triton kernels run in the interpreter (on CPU tensors) rather than compiled (on GPUs): as
    they were defined when insloc_ops was imported; before that (or if that cannot be told), TRITON_INTERPRET
    now."""
    if _interpreted is not None:
        return _interpreted
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
