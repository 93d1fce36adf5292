"""Which CUDA toolkit builds the CUDA kernels. No imports beyond the standard library: setup.py loads this
file by path, before anything is built."""
import glob
import os
import shutil
import subprocess


def nvcc_version(cuda_home):
    """The release of ``cuda_home``/bin/nvcc, e.g. "13.0.88", or None when it does not answer."""
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for tok in out.replace(",", " ").split():
        if tok.startswith("V") and tok[1:2].isdigit():
            return tok[1:]
    return None


def is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def default_candidates():
    """Where toolkits usually are: the one of the nvcc on PATH, /usr/local/cuda, /usr/local/cuda-* (newest
    name first)."""
    found = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        found.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return found + ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def find_cuda_home(want_major=None, explicit=None, candidates=None):
    """The root of a real CUDA toolkit (bin/nvcc and include/cuda_runtime.h both exist), or None.

    torch guesses CUDA_HOME from the nvcc on PATH, which can be a wrapper in /usr/local/bin that makes it
    pick /usr/local; each candidate is checked for the toolkit's layout instead. ``explicit`` (CUDA_HOME,
    CUDA_PATH; read from the environment when None) wins when it is a toolkit; otherwise the first of
    ``candidates`` whose nvcc has major version ``want_major`` (torch's own CUDA), else the first toolkit.
    """
    if explicit is None:
        explicit = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    for path in explicit:
        if is_toolkit(path):
            return os.path.realpath(path)
    found = []
    for path in default_candidates() if candidates is None else candidates:
        if is_toolkit(path) and os.path.realpath(path) not in found:
            found.append(os.path.realpath(path))
    if want_major is not None:
        for path in found:
            version = nvcc_version(path)
            if version and version.split(".")[0] == str(want_major):
                return path
    return found[0] if found else None


def mismatch(cuda_home, toolkit_version, torch_version, torch_cuda):
    """Why torch cannot build with this toolkit (torch refuses a major version other than its own CUDA's),
    or None."""
    if not toolkit_version or not torch_cuda or toolkit_version.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    return (f"the CUDA toolkit at {cuda_home} is {toolkit_version}, but torch {torch_version} was built with "
            f"CUDA {torch_cuda} (the major versions must match: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x "
            "toolkit)")
