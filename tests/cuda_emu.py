"""Builds and loads the CUDA emulator library: csrc/cuda/*.cu compiled as host C++ against
csrc/emu/cuda_emu.h, registered as torch.ops.insloc_emu.* for CPU tensors.

    import cuda_emu; cuda_emu.load()
    torch.ops.insloc_emu.queue_infonce(q, k, queue, 0.2)   # the CUDA kernels' own code, run on the CPU

INSLOC_EMU_SM_COUNT (read at every launch) sets the SM count the host code sees (default 4).
Two more builds, one per process, chosen by the environment:
- INSLOC_EMU_ASAN=1: with AddressSanitizer (build/cuda_emu_asan/), so that an out-of-bounds read or
  write of a kernel aborts the process with a report; the process must start with libasan preloaded
  (asan_env()).
- INSLOC_EMU_RACES=1: with the race detector (build/cuda_emu_races/): -fsanitize=thread instrumentation
  whose hooks csrc/emu/races.cpp supplies; a race fails the launch.
Linux only (fibers are ucontext). Builds are incremental."""
import os
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cuda_emu"
SOURCES = sorted(str(p) for p in (ROOT / "csrc" / "emu").glob("*.cpp"))
OPS = ("roi_align_multilevel", "roi_align_multilevel_backward", "sample_anchor_boxes", "queue_infonce",
       "queue_infonce_backward")

_loaded = False


def supported():
    return sys.platform.startswith("linux")


def asan_wanted():
    return os.environ.get("INSLOC_EMU_ASAN") == "1"


def races_wanted():
    return os.environ.get("INSLOC_EMU_RACES") == "1"


def variant():
    return "asan" if asan_wanted() else "races" if races_wanted() else "plain"


FLAGS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    # Instrumentation only: the hooks are ours (csrc/emu/races.cpp), so nothing links ThreadSanitizer.
    "races": ["-O1", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-DINSLOC_EMU_RACES"],
}


def asan_env(env=None):
    """The environment for a child process that loads the AddressSanitizer build."""
    env = dict(os.environ if env is None else env)

    def lib(name):
        return subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    # libstdc++ right after the ASan runtime: loaded later (by Python's imports), a C++ exception thrown by
    # the kernels (the emulator's launch errors, TORCH_CHECK) aborts in ASan's __cxa_throw interceptor.
    env["LD_PRELOAD"] = f"{lib('libasan.so')} {lib('libstdc++.so.6')}"
    # Python and torch are not instrumented: leaks at exit are theirs, not the kernels'.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0"
    env["INSLOC_EMU_ASAN"] = "1"
    return env


def load(verbose=False):
    global _loaded
    if _loaded:
        return torch.ops.insloc_emu
    from torch.utils.cpp_extension import load as load_extension

    kind = variant()
    build = BUILD if kind == "plain" else BUILD.with_name(f"cuda_emu_{kind}")
    build.mkdir(parents=True, exist_ok=True)
    load_extension(
        name="insloc_cuda_emu" if kind == "plain" else f"insloc_cuda_emu_{kind}",
        sources=SOURCES,
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=FLAGS[kind],
        extra_ldflags=["-fsanitize=address"] if kind == "asan" else [],
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    _loaded = True
    return torch.ops.insloc_emu


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", "2")
    load(verbose=True)
    print("loaded:", ", ".join(f"insloc_emu.{op}" for op in OPS))
