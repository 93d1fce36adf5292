"""Which implementation of an op runs: one table of per-device defaults, and the override rules.

Backends: "reference" (pure PyTorch, any device), "cpu" (C++ kernel), "cuda" (CUDA C++ kernel),
"triton" (Triton kernel; on CPU tensors only under TRITON_INTERPRET=1).
Precedence: the call's ``backend=``, then the ``INSLOC_OPS_BACKEND`` environment variable, then DEFAULTS.
"""
import functools
import os
import re

import torch

from ._ext import HAS_EXTENSION

OPS = ("roi_align_multilevel", "sample_anchor_boxes", "queue_infonce")
BACKENDS = ("reference", "cpu", "cuda", "triton")

# The backend a device gets when nobody asks for one. A CUDA entry names one of our GPU kernels only
# once it has passed the GPU tests and won its benchmark on a GPU (bench/pick_defaults.py: faster than the
# baseline in the op's deciding pass at every benchmark shape); the entry cites the BENCHMARKS.md rows. The
# CUDA entries apply on the GPUs listed in VERIFIED_CUDA_CAPABILITIES only; elsewhere CUDA tensors keep the
# reference unless a call or INSLOC_OPS_BACKEND names a kernel.
DEFAULTS = {
    "cpu": {"roi_align_multilevel": "cpu", "sample_anchor_boxes": "cpu", "queue_infonce": "cpu"},
    "cuda": {
        # fwd+bwd: insloc 0.975 ms = 1.21x, insloc-bf16-cl 0.585 ms = 2.47x, detection-7x7 4.453 ms = 1.17x,
        # detection-14x14 4.654 ms = 1.42x on NVIDIA H200 (2026-11-27; slower at insloc fp32 forward alone)
        "roi_align_multilevel": "cuda",
        # forward: insloc 32x5120 0.069 ms = 64.66x; det 200x242991 0.213 ms = 170.57x on NVIDIA H200 (2026-11-27)
        "sample_anchor_boxes": "cuda",
        # forward+backward: insloc/float32 0.761 ms = 4.39x, insloc/bfloat16 0.712 ms = 4.75x, moco/float32
        # 1.023 ms = 1.13x, moco/bfloat16 0.855 ms = 1.19x on NVIDIA H200 (2026-11-27; at the MoCo shape an
        # earlier run had 0.79x and 1.41x: a tie)
        "queue_infonce": "cuda",
    },
}
# Compute capabilities (major, minor) on which the CUDA defaults were verified: 9.0, an H200 (the H100 is
# the same chip). The kernels are built for other GPUs too, but have not run on one.
VERIFIED_CUDA_CAPABILITIES = ((9, 0),)


_VERIFIED_GPU = {}  # device index -> whether its capability is verified


# Fixed per GPU; telling dynamo so keeps backend selection inside a compiled graph (as _has_kernel).
@torch.compiler.assume_constant_result
def _verified_gpu(index):
    """Whether GPU ``index`` (None: the current one) is of a verified compute capability."""
    if index is None:
        index = torch.cuda.current_device()
    if index not in _VERIFIED_GPU:
        _VERIFIED_GPU[index] = tuple(torch.cuda.get_device_capability(index)) in VERIFIED_CUDA_CAPABILITIES
    return _VERIFIED_GPU[index]


def _default_for(op, device):
    device = torch.device(device)
    choice = DEFAULTS.get(device.type, {}).get(op, "reference")
    if device.type == "cuda" and choice != "reference" and torch.cuda.is_available() and \
            not _verified_gpu(device.index):
        return "reference"
    return choice


_HAS_KERNEL = {}  # (qualname, dispatch key) -> whether a kernel is registered


# Fixed once the package is imported (it registers every kernel then); telling dynamo so keeps backend
# selection inside a compiled graph. Cached: the dispatcher query takes about 8 us on a 2-core x86-64 CPU,
# a cost every op call paid in backend selection.
@torch.compiler.assume_constant_result
def _has_kernel(qualname, key):
    if not HAS_EXTENSION:
        return False
    found = _HAS_KERNEL.get((qualname, key))
    if found is None:
        found = _HAS_KERNEL[(qualname, key)] = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    return found


@torch.compiler.assume_constant_result
def _cuda_arch_ok(index=None):
    """False when GPU ``index`` (None: the current one) is one none of the compiled architectures runs on
    (its launches would fail with "no kernel image is available"); True without a GPU, where nothing can be
    launched."""
    if not torch.cuda.is_available():
        return True
    from ._build import cuda_kernels_run_on

    return cuda_kernels_run_on(torch.cuda.get_device_capability(index))


def _triton_interpreted():
    from .triton import interpreted  # as the kernels were defined, not TRITON_INTERPRET now

    return interpreted()


# Triton's interpreter before 3.7 cannot take a loop bound computed from tl.program_id (its `range` gets
# a one-element array: "only 0-dimensional arrays can be converted to Python scalars"), which every one
# of our kernels has. Compiled kernels are not affected (tests/triton_aot.py passes with Triton 3.6).
MIN_INTERPRETER_TRITON = (3, 7)


def _version_tuple(version):
    """(major, minor) of a version string such as "3.6.0" or "3.7.0+git1234", or None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


@functools.lru_cache(maxsize=None)
def _triton_version():
    """(major, minor) of the installed Triton, or None without one."""
    try:
        import triton
    except ImportError:
        return None
    return _version_tuple(getattr(triton, "__version__", ""))


@torch.compiler.assume_constant_result
def _triton_interpreter_ok():
    found = _triton_version()
    return found is not None and found >= MIN_INTERPRETER_TRITON


def is_available(op, backend, device_type, index=None):
    """Whether ``backend`` can run ``op`` on tensors of ``device_type`` ("cpu" or "cuda") here; on GPU ``index``
    (None: the current one), which matters on a machine with GPUs of several kinds."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _has_kernel(f"insloc_ops::{op}", "CPU")
    if backend == "cuda":
        return device_type == "cuda" and _has_kernel(f"insloc_ops::{op}", "CUDA") and _cuda_arch_ok(index)
    if backend == "triton":
        if device_type == "cpu" and not _triton_interpreted():
            return False
        if not _has_kernel(f"insloc_ops::{op}_triton", "CPU" if device_type == "cpu" else "CUDA"):
            return False
        return device_type != "cpu" or _triton_interpreter_ok()
    return False


def select(op, device, backend=None):
    """Names the backend that runs ``op`` for tensors on ``device``; raises if the one asked for can't."""
    device = torch.device(device)
    device_type, index = device.type, device.index
    source = "backend"
    if backend is None:
        backend = os.environ.get("INSLOC_OPS_BACKEND") or None
        source = "INSLOC_OPS_BACKEND"
    if backend is None:
        choice = _default_for(op, device)
        return choice if is_available(op, choice, device_type, index) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if not is_available(op, backend, device_type, index):
        why = ""
        if backend == "cuda" and device_type == "cuda" and _has_kernel(f"insloc_ops::{op}", "CUDA"):
            from ._build import cuda_archs

            major, minor = torch.cuda.get_device_capability(index)
            why = (f": the CUDA kernels were compiled for {';'.join(cuda_archs())}, which cannot run on this GPU "
                   f"(compute capability {major}.{minor}); reinstall with TORCH_CUDA_ARCH_LIST={major}.{minor}")
        if (backend == "triton" and device_type == "cpu" and _triton_interpreted()
                and _has_kernel(f"insloc_ops::{op}_triton", "CPU") and not _triton_interpreter_ok()):
            found = ".".join(map(str, _triton_version()))
            need = ".".join(map(str, MIN_INTERPRETER_TRITON))
            why = (f": the Triton interpreter of Triton {found} cannot run these kernels (it needs Triton >= {need}; "
                   "compiled kernels on a GPU are not affected)")
        raise RuntimeError(
            f"{source}={backend!r} is not available for {op} on {device_type} tensors here{why} "
            f"(available: {[b for b in BACKENDS if is_available(op, b, device_type, index)]}); "
            "see insloc_ops.build_info()"
        )
    return backend


def selected_backends(device="cpu"):
    """Maps each op to the backend that runs it for tensors on ``device`` when a call names none
    (``INSLOC_OPS_BACKEND`` if set, else the defaults table); raises as a call would if that can't run."""
    return {op: select(op, device) for op in OPS}


def available_backends():
    """Maps each op to the backends usable in this process, per device type."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        op: {d: [b for b in BACKENDS if is_available(op, b, d)] for d in devices} for op in OPS
    }
