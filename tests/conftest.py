import os
import socket
import subprocess
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton decides at @triton.jit time whether to interpret, so this must precede importing
    # insloc_ops: without a GPU every Triton kernel runs on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Runs the test with one intra-op thread and restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def poisoned_like(t):
    """A tensor shaped like ``t`` full of NaN: a kernel that leaves an element unwritten shows it."""
    return torch.full_like(t, float("nan"))


def triton_compile_api():
    """Whether this Triton's triton.compile takes what tests/triton_aot.py gives it (ASTSource(...,
    constexprs=)); older releases (e.g. 3.2) name those arguments differently. Checked without importing
    triton_aot, which clears TRITON_INTERPRET."""
    try:
        import inspect

        from triton.compiler import ASTSource
    except ImportError:
        return False
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


def compile_for_sm90(script):
    """Runs ``script`` (Python that compiles Triton kernels with tests/triton_aot.py's helpers and prints what
    it counts) in a fresh interpreter without TRITON_INTERPRET; returns its standard output. Skips where
    Triton, or a triton.compile that takes triton_aot's arguments, is missing."""
    pytest.importorskip("triton")
    if not triton_compile_api():
        pytest.skip("this Triton's triton.compile API is older than tests/triton_aot.py's")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(here), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def free_port():
    """A free TCP port on 127.0.0.1, for a process group's store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(fn, args, nprocs, timeout_s):
    """fn(rank, *args) in nprocs spawned processes, joined with a deadline: a rank stuck in a collective (its
    peer gone) fails the test instead of hanging it."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {timeout_s} s: " +
                        ", ".join(f"rank {r} exit code {p.exitcode}" for r, p in enumerate(ctx.processes)))
