"""Whether the CUDA kernels' machine code changed since a commit, with no GPU.

A GPU result holds for the code that ran. After a change to csrc/, this compiles each csrc/cuda/*.cu of the
commit REV and of the work tree to a cubin for one architecture (nvcc -cubin, the build's -O3 and
--expt-relaxed-constexpr, the same torch headers for both), disassembles them (cuobjdump -sass) and compares
each kernel's instructions. A kernel present in both with the same instructions has device code unchanged
since REV: the same compiler makes the same machine code of it from either commit. (This is not the cubin a
GPU ran, which was built there with that machine's torch headers and flags; the comparison shows that the
source the kernel is compiled from has not changed in effect.)
Names are matched after dropping the anonymous namespace's per-file hash (and its length); a kernel that
gained a template parameter `bool = false` (mangled `Lb0E`) is matched to the kernel without it.

    python tests/sass_compare.py REV [--arch 90a] [--file roi_align --file infonce ...]

Prints one line per kernel (same / DIFF / only-new / only-old) and a summary per file; exit status 1 when a
kernel present in both differs. nvcc comes from the toolkit setup.py would use; cuobjdump from it or from
Triton's bundled copy. About 20 s per file on 2 cores.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from insloc_ops import _toolkit  # noqa: E402


def _cuobjdump(cuda_home):
    found = os.path.join(cuda_home, "bin", "cuobjdump")
    if os.path.exists(found):
        return found
    try:
        import triton
        found = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        found = None
    if found and os.path.exists(found):
        return found
    sys.exit("cuobjdump not found (neither in the CUDA toolkit nor in Triton's package)")


def _include_flags():
    import torch.utils.cpp_extension as cpp
    flags = ["-I" + p for p in cpp.include_paths(device_type="cuda")]
    try:
        import nvidia
        flags += ["-I" + p for p in glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "include"))]
    except ImportError:
        pass
    return flags


def compile_sass(nvcc, cuobjdump, tree, name, arch, workdir):
    cubin = os.path.join(workdir, name + ".cubin")
    cmd = [nvcc, "-cubin", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20", f"-arch=sm_{arch}",
           "-I" + os.path.join(tree, "csrc"), *_include_flags(), "-DINSLOC_WITH_CUDA",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           '-DINSLOC_NVCC_VERSION="x"', '-DINSLOC_CUDA_ARCHS="x"', "-o", cubin,
           os.path.join(tree, "csrc", "cuda", name + ".cu")]
    subprocess.run(cmd, check=True)
    return subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout


def kernels(sass):
    """{normalised kernel name: [instruction, ...]} (offsets, encodings and comments dropped)."""
    out, body = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            body = out.setdefault(re.sub(r"\d*_GLOBAL__N__\w+?_cu_\w+?_\d+", "ANON", m.group(1)), [])
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if body is not None and m:
            body.append(m.group(1))
    return out


def compare(old, new):
    """[(status, name)]: each new kernel against the old one of its name (or of its name without `Lb0E`)."""
    rows, matched = [], set()
    for name in sorted(new):
        twin = name if name in old else name.replace("Lb0E", "") if name.replace("Lb0E", "") in old else None
        if twin is None:
            rows.append(("only-new", name))
            continue
        matched.add(twin)
        rows.append(("same" if old[twin] == new[name] else "DIFF", name))
    rows += [("only-old", name) for name in sorted(set(old) - matched)]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit whose kernels ran (e.g. the one a GPU result names)")
    parser.add_argument("--arch", default="90a", help="compute capability without the dot (default 90a, what "
                                                       "an H100/H200 build targets)")
    parser.add_argument("--file", action="append", help="csrc/cuda/<FILE>.cu to compare (default: every one)")
    args = parser.parse_args()
    cuda_home = _toolkit.find_cuda_home(explicit=os.environ.get("CUDA_HOME"))
    if cuda_home is None:
        sys.exit("no CUDA toolkit found (set CUDA_HOME)")
    nvcc, cuobjdump = os.path.join(cuda_home, "bin", "nvcc"), _cuobjdump(cuda_home)
    names = args.file or sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "old")
        os.makedirs(old_tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.rev, "csrc"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", old_tree], input=archive.stdout, check=True)
        for name in names:
            if not os.path.exists(os.path.join(old_tree, "csrc", "cuda", name + ".cu")):
                print(f"{name}.cu: not in {args.rev}")
                continue
            for side in ("old", "new"):
                os.makedirs(os.path.join(tmp, side + "-out"), exist_ok=True)
            old = kernels(compile_sass(nvcc, cuobjdump, old_tree, name, args.arch, os.path.join(tmp, "old-out")))
            new = kernels(compile_sass(nvcc, cuobjdump, ROOT, name, args.arch, os.path.join(tmp, "new-out")))
            rows = compare(old, new)
            for status, kernel in rows:
                print(f"{status:8s} {name}.cu {kernel}")
            counts = {s: sum(1 for r in rows if r[0] == s) for s in ("same", "DIFF", "only-new", "only-old")}
            print(f"{name}.cu sm_{args.arch} vs {args.rev}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
            failed |= counts["DIFF"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
