import functools
import importlib.util

import torch

from ._archs import arch_runs_on
from ._ext import HAS_EXTENSION, LOAD_ERROR, _C


def build_info():
    """What this installation can run: versions, whether CUDA kernels were compiled and for which
    architectures, whether Triton is importable, and the GPU seen by this process."""
    ext = _C.build_info() if HAS_EXTENSION else {"cuda_compiled": False, "cuda_archs": "", "nvcc_version": ""}
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as e:  # a broken install is worth reporting, not crashing on
            triton_version = f"unusable ({type(e).__name__}: {e})"
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": HAS_EXTENSION,
        "extension_error": LOAD_ERROR,
        "cuda_kernels_compiled": bool(ext["cuda_compiled"]),
        "cuda_archs": cuda_archs(),
        "nvcc": ext["nvcc_version"] or None,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def cuda_archs():
    """The architectures the CUDA kernels were compiled for ([] without them)."""
    ext = _C.build_info() if HAS_EXTENSION else {"cuda_archs": ""}
    return [a for a in ext["cuda_archs"].replace(",", ";").split(";") if a]


@functools.lru_cache(maxsize=None)
def cuda_kernels_run_on(capability):
    """Whether any compiled architecture runs on a GPU of this compute capability."""
    return any(arch_runs_on(a, capability) for a in cuda_archs())
