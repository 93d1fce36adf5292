"""Which GPUs code compiled for a TORCH_CUDA_ARCH_LIST entry runs on. No imports beyond the standard
library: setup.py loads this file by path, before anything is built."""
import re


def arch_runs_on(arch, capability):
    """Whether code built for ``arch`` (a TORCH_CUDA_ARCH_LIST entry: "8.0", "9.0+PTX", "9.0a") runs on a GPU
    of compute ``capability`` (major, minor): machine code runs on the same major version at the same or a
    higher minor one; PTX is compiled at load time for any GPU at least as new; an "a" variant (9.0a) runs
    on its own architecture only, an "f" variant (10.0f) on its family (same major, same or higher minor)."""
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch.strip())
    if m is None:
        return False
    built = (int(m.group(1)), int(m.group(2)))
    if m.group(3) == "a":
        return built == tuple(capability)
    if m.group(3) == "f":
        return built[0] == capability[0] and built[1] <= capability[1]
    if built[0] == capability[0] and built[1] <= capability[1]:
        return True
    return bool(m.group(4)) and built <= tuple(capability)
