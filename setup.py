"""Builds insloc_ops._C: C++ CPU kernels always, CUDA kernels when a CUDA torch and nvcc are present.

Environment:
  INSLOC_OPS_CUDA=0      never compile CUDA sources
  INSLOC_OPS_CUDA=1      require CUDA sources to be compiled (fail loudly otherwise)
  TORCH_CUDA_ARCH_LIST   architectures (default "8.0;9.0+PTX", plus the architecture of each GPU visible
                         at build time that those do not cover, e.g. 7.5 on a T4)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup


ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _log(msg):
    print(f"[insloc_ops setup] {msg}", file=sys.stderr)


def _load(name):
    """A stdlib-only module of insloc_ops, loaded by path (nothing is built or installed yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "insloc_ops", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toolkit = _load("_toolkit")


def _pip_nvidia_includes():
    """Include folders of pip's nvidia-* packages (e.g. nvidia/cu13/include holds cusparse.h)."""
    found = []
    for p in sys.path:
        base = os.path.join(p, "nvidia")
        if not os.path.isdir(base):
            continue
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def _want_cuda():
    flag = os.environ.get("INSLOC_OPS_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise SystemExit(f"INSLOC_OPS_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, None
    import torch

    torch_major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    cuda_home = _toolkit.find_cuda_home(torch_major)
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found")
    else:
        why = _toolkit.mismatch(cuda_home, _toolkit.nvcc_version(cuda_home), torch.__version__, torch.version.cuda)
        if why:
            problems.append(why)
    if problems:
        if flag == "1":
            raise SystemExit("INSLOC_OPS_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems))
        _log("building CPU kernels only: " + "; ".join(problems))
        return False, None
    return True, cuda_home


def _default_archs():
    """DEFAULT_ARCHS (A100 and newer: sm_80 machine code also runs on sm_86/sm_89, sm_90 PTX on anything
    newer), plus the architecture of each visible GPU they would not run on (e.g. a T4's 7.5)."""
    archs_module = _load("_archs")
    archs = DEFAULT_ARCHS.split(";")
    try:
        import torch

        found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # no driver or no GPU: the defaults
        found = set()
    for capability in sorted(found):
        if not any(archs_module.arch_runs_on(a, capability) for a in archs):
            archs.insert(0, "%d.%d" % capability)
            _log(f"adding the visible GPU's architecture {archs[0]} to {DEFAULT_ARCHS}")
    return ";".join(archs)


def _extensions():
    use_cuda, cuda_home = _want_cuda()
    if use_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_archs())
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    macros = []  # torch adds Py_LIMITED_API itself for py_limited_api=True extensions
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _pip_nvidia_includes()
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros.append(("INSLOC_WITH_CUDA", None))
        macros.append(("INSLOC_CUDA_ARCHS", '"' + archs + '"'))
        nvcc_version = _toolkit.nvcc_version(cuda_home)
        macros.append(("INSLOC_NVCC_VERSION", '"' + (nvcc_version or "unknown") + '"'))
        _log(f"building CUDA kernels with {cuda_home} (nvcc {nvcc_version}) for {archs}")
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        if os.environ.get("INSLOC_OPS_PTXAS_VERBOSE") == "1":  # registers, spills, shared memory per kernel
            nvcc_flags += ["-Xptxas", "-v"]
        ext = CUDAExtension(
            "insloc_ops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "insloc_ops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}})
