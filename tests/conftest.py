import os

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


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])

