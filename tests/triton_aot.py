"""Compiles every Triton kernel launch of insloc_ops for real GPU targets, with no GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but not that they compile: type
rules, tl.dot shapes and layouts, and shared-memory limits are only met by the real compiler. Here every
launch the CPU wrappers would make is captured (JITFunction.run is replaced; nothing runs), its signature
and constexprs are read off the arguments, and `triton.compile` takes it to a cubin for each target
(ptxas included), whose shared memory must fit the target's per-block limit. Variants the CPU wrappers
cannot reach (tf32x3 and tf32 dots, the atomic and deterministic backward modes) are added by flipping those constexprs.

Run without TRITON_INTERPRET: `python tests/triton_aot.py [--full] [ARCH ...]` (default sm_90). Prints one
JSON line per compile. The default set covers every dtype, layout and mode at least once (76 compiles per
arch, about 2 minutes on 2 cores); --full takes the whole product (218).
"""
import itertools
import json
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from insloc_ops.triton import anchors, infonce, roi_align  # noqa: E402

LAUNCHED = {  # every kernel the wrappers launch, by module
    "infonce": ("_forward_partials", "_forward_combine", "_backward_dq", "_backward_finish"),
    "roi_align": ("_forward_kernel", "_backward_kernel"),
    "anchors": ("_sample_anchor_kernel", "_finalize_kernel"),
}
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1"}
# The most shared memory one block may use (opt-in), bytes: a kernel that needs more fails at launch.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


def signature_of(fn, args, kwargs):
    """(signature, constexprs, options) of one launch, as triton.compile takes them."""
    values = dict(zip(fn.arg_names, args))
    options = {}
    for name, value in kwargs.items():
        if name in _OPTIONS:
            options[name] = value
        else:
            values[name] = value
    sig, constexprs = {}, {}
    for p in fn.params:
        value = values[p.name] if p.name in values else p.default
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={value!r}")
    return sig, constexprs, options


class Capture:
    def __init__(self):
        self.launches = []

    def __enter__(self):
        self._run = JITFunction.run
        launches = self.launches

        def run(fn, *args, grid, warmup, **kwargs):
            launches.append((fn, args, kwargs))

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run


def launches(full=False):
    """Calls every Triton wrapper on small CPU inputs over the dtype / layout / mode combinations."""
    gen = torch.Generator().manual_seed(0)
    with Capture() as cap:
        # InfoNCE: (q dtype, queue dtype) as the public API allows.
        for q_dt, queue_dt in [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                               (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                               (torch.float16, torch.float16), (torch.float64, torch.float64)]:
            for N in (32, 256) if full or (q_dt, queue_dt) == (torch.float32, torch.float32) else (32,):
                # N = 32: one 32-row block; 256: 64-row blocks
                q = torch.randn(4, N, 128, generator=gen).to(q_dt)
                k = torch.randn(4, N, 128, generator=gen).to(q_dt)
                queue = torch.randn(4, 1000, 128, generator=gen).to(queue_dt)
                infonce.queue_infonce(q, k, queue, 0.2)
                acc = infonce._acc(q)  # the loss's dtype, hence its gradient's: fp64 for fp64 inputs
                lse = torch.zeros(4, N, dtype=acc)
                infonce.queue_infonce_backward(torch.ones(4, N, dtype=acc), q, k, queue, lse, 0.2)
        # RoIAlign: dtypes x layout x aligned x by-level, two pooled sizes.
        sizes = [(16, 16), (8, 8), (4, 4), (2, 2)]
        dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        if full:
            cases = itertools.product(dtypes, (False, True), (False, True), (False, True), (7, 14))
        else:  # every dtype with each value of every flag
            cases = [(dt, *flags) for dt in dtypes for flags in ((False, False, False, 7), (True, True, True, 14))]
        for dt, channels_last, aligned, by_level, pooled in cases:
            feats = [torch.randn(2, 256, h, w, generator=gen).to(dt) for h, w in sizes]
            if channels_last:
                feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
            rois = torch.tensor([[0, 1.0, 1.0, 30.0, 40.0], [1, 5.0, 2.0, 60.0, 50.0]])
            levels = torch.tensor([0, 3]) if by_level else None
            out = roi_align.roi_align_multilevel(feats, rois, levels, [1 / 4, 1 / 8, 1 / 16, 1 / 32], pooled, pooled,
                                                 0, aligned)
            roi_align.roi_align_multilevel_backward(torch.ones_like(out), rois, levels, [1 / 4, 1 / 8, 1 / 16, 1 / 32],
                                                    2, aligned, 2, 256, [h for h, _ in sizes], [w for _, w in sizes],
                                                    channels_last)
        # Anchors.
        gt = torch.tensor([[10.0, 10.0, 60.0, 80.0], [0.0, 0.0, 200.0, 100.0]])
        grid_anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0], [20.0, 20.0, 70.0, 90.0]] * 50)
        anchors.sample_anchor_boxes(gt, grid_anchors, 0.5, 7)
    return cap.launches


def variants(fn, sig, constexprs):
    """The captured constexprs plus those a GPU run would use that a CPU run does not reach."""
    out = [dict(constexprs)]
    if "PRECISION" in constexprs and constexprs.get("DOT_DTYPE") == tl.float32:
        # fp32 dots on a GPU: TF32x3 by default, TF32 under torch.backends.cuda.matmul.allow_tf32 (the CPU
        # run captured "ieee", which the interpreter computes).
        out += [dict(constexprs, PRECISION="tf32x3"), dict(constexprs, PRECISION="tf32")]
    if fn.__name__ == "_forward_combine":  # a GPU's K split count (up to 4 per SM, G = 1) widens the tile
        out.append(dict(constexprs, BLOCK_S=1024, BLOCK_R=4))
    if "ATOMIC" in constexprs:
        out += [dict(c, ATOMIC=not c["ATOMIC"]) for c in list(out)]  # deterministic partials vs atomics
    return out


def main(archs, full=False):
    unique = {}
    for fn, args, kwargs in launches(full):
        sig, constexprs, options = signature_of(fn, args, kwargs)
        for cx in variants(fn, sig, constexprs):
            key = (fn.__name__, json.dumps(sig, sort_keys=True), repr(sorted(cx.items())), repr(sorted(options.items())))
            unique[key] = (fn, sig, cx, options)
    failures = 0
    for (name, _, _, _), (fn, sig, cx, options) in sorted(unique.items(), key=lambda kv: kv[0]):
        for arch in archs:
            t0 = time.time()
            row = {"kernel": name, "arch": arch,
                   "constexprs": {k: str(v) for k, v in cx.items()},
                   "pointers": sorted({v for v in sig.values() if v.startswith("*")})}
            try:
                compiled = triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", arch, 32),
                                          options=options)
                shared = compiled.metadata.shared
                # Tensor-core instructions in the PTX (mma.sync, or Hopper's wgmma): a tl.dot that has none
                # runs on CUDA cores.
                mma = len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b", compiled.asm.get("ptx", "")))
                row.update(cubin=bool(compiled.asm.get("cubin")), shared=shared,
                           shared_limit=SHARED_LIMIT.get(arch), mma=mma)
                row["ok"] = row["cubin"] and shared <= SHARED_LIMIT.get(arch, shared)
                if not row["ok"]:
                    row["error"] = f"no cubin, or {shared} B of shared memory > the sm_{arch} limit"
            except Exception as exc:  # report and go on: one line per failure
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
            row["seconds"] = round(time.time() - t0, 2)
            failures += not row["ok"]
            print(json.dumps(row), flush=True)
    return failures


if __name__ == "__main__":
    import inspect

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        sys.exit(f"tests/triton_aot.py: Triton {triton.__version__}'s ASTSource takes no constexprs=; "
                 "this tool needs a newer Triton (3.6 and 3.8 are known to work)")
    argv = sys.argv[1:]
    full = "--full" in argv
    archs = [int(a) for a in argv if a != "--full"] or [90]
    sys.exit(1 if main(archs, full) else 0)
