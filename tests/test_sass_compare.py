"""tests/sass_compare.py: the SASS parser and matcher on a hand-written listing, and one real comparison."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sass_compare  # noqa: E402


def listing(functions):
    """cuobjdump -sass text for {mangled name: [instruction, ...]}, offsets and encodings as it prints them."""
    lines = ["", "Fatbin elf code:", "================", "arch = sm_90"]
    for name, body in functions.items():
        lines.append(f"\t\tFunction : {name}")
        lines.append("\t.headerflags\t@\"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)\"")
        for i, ins in enumerate(body):
            lines.append(f"        /*{16 * i:04x}*/                   {ins} ;                 /* 0x000fe200000001ff */")
            lines.append("                                                          /* 0x000fe20000000f00 */")
    return "\n".join(lines) + "\n"


ANON_OLD = "_ZN6insloc49_GLOBAL__N__aac46633_10_infonce_cu_4befee30_3052922"
ANON_NEW = "_ZN6insloc50_GLOBAL__N__0b1c2d3e9_10_infonce_cu_77aa11bb_1234562"  # a hash of another length


def test_kernels_parse_and_compare_by_name():
    old = sass_compare.kernels(listing({
        ANON_OLD + "fwdIfEEvPKT_": ["LDC R1, c[0x0][0x28]", "EXIT"],
        ANON_OLD + "bwdIfEEvPKT_": ["LDC R1, c[0x0][0x28]", "@P0 BRA 0x40", "EXIT"],
        ANON_OLD + "tcIfEEvPKf": ["S2R R0, SR_TID.X", "EXIT"],
        ANON_OLD + "goneEv": ["EXIT"]}))
    assert old["_ZN6inslocANONbwdIfEEvPKT_"] == [
        "LDC R1, c[0x0][0x28]", "@P0 BRA 0x40", "EXIT"]
    new = sass_compare.kernels(listing({
        ANON_NEW + "fwdIfEEvPKT_": ["LDC R1, c[0x0][0x28]", "EXIT"],            # the same, another file hash
        ANON_NEW + "bwdIfEEvPKT_": ["LDC R1, c[0x0][0x28]", "@P0 BRA 0x50", "EXIT"],  # a branch moved
        ANON_NEW + "tcIfLb0EEEvPKf": ["S2R R0, SR_TID.X", "EXIT"],              # gained `bool = false`
        ANON_NEW + "tcIfLb1EEEvPKf": ["S2R R0, SR_TID.X", "NOP", "EXIT"]}))      # its new `true` instance
    rows = {status + " " + name.split("ANON")[1] for status, name in sass_compare.compare(old, new)}
    assert rows == {"same fwdIfEEvPKT_", "DIFF bwdIfEEvPKT_", "same tcIfLb0EEEvPKf", "only-new tcIfLb1EEEvPKf",
                    "only-old goneEv"}


@pytest.mark.slow
def test_the_work_tree_matches_its_own_commit():
    """The anchors kernels of HEAD against the work tree (equal in CI): every kernel the same, exit 0."""
    sys.path.insert(0, os.path.dirname(HERE))
    from insloc_ops import _toolkit
    if torch.version.cuda is None or _toolkit.find_cuda_home() is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    root = os.path.dirname(HERE)
    if subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "csrc"]).returncode != 0:
        pytest.skip("csrc/ has uncommitted changes")
    out = subprocess.run([sys.executable, os.path.join(HERE, "sass_compare.py"), "HEAD", "--file", "anchors"],
                         capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "anchors.cu sm_90a vs HEAD: 2 same, 0 DIFF, 0 only-new, 0 only-old" in out.stdout, out.stdout
