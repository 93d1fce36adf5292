"""roi_align_multilevel vs torchvision: forward, backward, forward+backward, peak memory.

Shapes:
  insloc     32 images, P2-P5 of 256x256 (64, 32, 16, 8) at 256 channels, one box per image pooled from all
             4 levels, 7x7, sampling 0. Baseline: 4 x torchvision.ops.roi_align + torch.stack.
  insloc-bf16-cl  the same as training feeds it: bf16 channels_last features under bf16 autocast, for the
             fused op and the baseline alike (torchvision's autocast wrapper computes in fp32).
  detection  2 images 800x1344, P2-P5 200x336 .. 25x42 at 256 channels, 1024 boxes in all (512 per image),
             each pooled from its FPN level (fpn_levels), 7x7 and 14x14, aligned. Baseline: a
             MultiScaleRoIAlign-equivalent loop (per level: select the RoIs, torchvision roi_align, scatter
             into the output).
The implementations of a shape are timed in alternation, pass by pass (bench/common.py time_interleaved).

    python bench/bench_roi_align.py [--device cpu|cuda] [--quick] [--shapes insloc,detection] [--out CSV]
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import insloc_ops  # noqa: E402
from bench import baselines  # noqa: E402
from bench.common import Recorder, environ, peak_extra_mb, time_interleaved  # noqa: E402
from insloc_ops._backend import is_available  # noqa: E402

OP = "roi_align_multilevel"


def insloc_inputs(device, dtype=torch.float32, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    B, C, image = 32, 256, 256
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.randn(B, C, s, s, generator=g).to(device=device, dtype=dtype, memory_format=fmt)
             for s in (64, 32, 16, 8)]
    wh = torch.rand(B, 2, generator=g) * 0.65 * image + 0.25 * image
    xy = torch.rand(B, 2, generator=g) * (image - wh)
    rois = torch.cat([torch.arange(B, dtype=torch.float32)[:, None], xy, xy + wh], 1).to(device)
    return dict(features=feats, rois=rois, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], levels=None, output_size=(7, 7),
                aligned=True)


def detection_inputs(device, output_size, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, R, (H, W) = 2, 256, 1024, (800, 1344)
    feats = [torch.randn(B, C, H // s, W // s, generator=g).to(device=device, dtype=dtype) for s in (4, 8, 16, 32)]
    side = torch.exp(torch.rand(R, 2, generator=g) * (torch.log(torch.tensor(600.0)) - torch.log(torch.tensor(16.0)))
                     + torch.log(torch.tensor(16.0)))  # log-uniform 16..600 px
    xy = torch.rand(R, 2, generator=g) * (torch.tensor([W, H]) - side).clamp(min=1)
    b = (torch.arange(R) * B // R).float()[:, None]
    rois = torch.cat([b, xy, xy + side], 1).to(device)
    levels = insloc_ops.fpn_levels(rois)
    return dict(features=feats, rois=rois, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], levels=levels,
                output_size=output_size, aligned=True)


# The rows' shapes and passes, in every run: on CUDA, pick_defaults.py expects each of them for each fused backend.
SHAPES = {
    "insloc": insloc_inputs,
    "insloc-bf16-cl": lambda device: insloc_inputs(device, torch.bfloat16, channels_last=True),
    "detection-7x7": lambda device: detection_inputs(device, (7, 7)),
    "detection-14x14": lambda device: detection_inputs(device, (14, 14)),
}
PASSES = ("forward", "backward", "fwd+bwd")


def baseline(inp, feats):
    return baselines.roi_align_torchvision(feats, inp["rois"], inp["output_size"], inp["scales"], 0, inp["aligned"],
                                           inp["levels"])


def fused(backend):
    def fn(inp, feats):
        return insloc_ops.roi_align_multilevel(feats, inp["rois"], inp["output_size"], inp["scales"], 0, inp["aligned"],
                                               inp["levels"], backend=backend)
    return fn


@contextlib.contextmanager
def deterministic_algorithms(on):
    """torch.use_deterministic_algorithms(on) for the block. The CUDA backward picks its kernel (atomic or
    deterministic) when it runs, so the flag must cover the backward as well as the forward."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# Environment that selects the CUDA kernel's separable forward and backward (csrc/cuda/roi_align.cu).
SEPARABLE_ENV = {"INSLOC_OPS_CUDA_ROI_FORWARD": "separable", "INSLOC_OPS_CUDA_ROI_BACKWARD": "separable"}
# Every CUDA row runs with these unset unless it sets them (a value exported in the shell would otherwise change
# the kernel a row names without its settings column saying so).
CUDA_ROI_ENV = {"INSLOC_OPS_CUDA_ROI_FORWARD": None, "INSLOC_OPS_CUDA_ROI_BACKWARD": None,
                "INSLOC_OPS_CUDA_ROI_CHANNELS": None}


def settings_of(deterministic, env):
    """The row's settings column: the deterministic flag and environment variables an implementation sets."""
    items = (["deterministic"] if deterministic else []) + [f"{k}={v}" for k, v in (env[0] if env else {}).items()
                                                             if v is not None]
    return " ".join(items)


def bench_shape(rec, name, inp, impls, device, reps, max_seconds):
    """Every implementation at one shape: each pass timed for all of them in alternation (time_interleaved),
    then each one's peak memory."""
    feats = [f.detach().requires_grad_() for f in inp["features"]]

    def amp():  # bf16 features run under bf16 autocast, as in training (torchvision's kernel wants fp32 boxes)
        return torch.autocast(device, torch.bfloat16, enabled=feats[0].dtype == torch.bfloat16)

    with torch.no_grad(), amp():
        grad = torch.randn_like(baseline(inp, inp["features"]))
    calls = {}  # impl -> (context, {pass: fn}, settings)
    for impl, fn, deterministic, *env in impls:
        def context(deterministic=deterministic, env=env):
            stack = contextlib.ExitStack()
            stack.enter_context(amp())
            stack.enter_context(deterministic_algorithms(deterministic))
            stack.enter_context(environ(*env))
            return stack

        with context():
            out = fn(inp, feats)  # kept for the backward pass's retained graph

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(inp, inp["features"])

        def bwd(out=out):
            return torch.autograd.grad(out, feats, grad, retain_graph=True)

        def both(fn=fn):
            return torch.autograd.grad(fn(inp, feats), feats, grad)

        calls[impl] = (context, dict(zip(PASSES, (fwd, bwd, both))), settings_of(deterministic, env))
    for pass_ in PASSES:
        timings = time_interleaved([(impl, fns[pass_], context) for impl, (context, fns, _) in calls.items()],
                                   device, reps=reps, warmup=2 if device == "cpu" else 5,
                                   max_seconds=max_seconds * len(calls))
        for impl, (context, fns, settings) in calls.items():
            with context():
                peak = peak_extra_mb(fns[pass_], device)
            rec.add(name, impl, pass_, timings[impl], peak, timings["torchvision"][0], settings)
    calls.clear()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="shapes to run, by name or name prefix")
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "roi_align.csv"))
    args = ap.parse_args()
    device = torch.device(args.device).type
    if device == "cpu":
        torch.set_num_threads(args.threads)
    reps = 5 if args.quick else (10 if device == "cpu" else 50)
    max_seconds = 20.0 if device == "cpu" else 10.0
    # On CPU the fused op is the C++ kernel (the Triton interpreter is no speed path); on CUDA, every GPU
    # backend that is built, plus the CUDA kernel with torch.use_deterministic_algorithms (its backward without
    # atomics). Each entry: (impl, fn, deterministic[, environment variables to set]).
    impls = [("torchvision", baseline, False)]
    if device == "cpu":
        impls.append(("cpp", fused("cpu"), False))
    else:
        index = torch.device(args.device).index
        has_cuda = is_available(OP, "cuda", "cuda", index)
        if has_cuda:
            impls.append(("cuda", fused("cuda"), False, CUDA_ROI_ENV))
        if is_available(OP, "triton", "cuda", index):
            impls.append(("triton", fused("triton"), False))
        if has_cuda:
            impls.append(("cuda-determ", fused("cuda"), True, CUDA_ROI_ENV))
            # The CUDA kernels with one channel per thread (torchvision's layout of the work), for comparison.
            impls.append(("cuda-1ch", fused("cuda"), False, {**CUDA_ROI_ENV, "INSLOC_OPS_CUDA_ROI_CHANNELS": "1"}))
            # The separable kernels (tabulated per-axis weights, one read or atomic per footprint pixel): opt-in
            # until measured here.
            impls.append(("cuda-separable", fused("cuda"), False, {**CUDA_ROI_ENV, **SEPARABLE_ENV}))
            impls.append(("cuda-separable-determ", fused("cuda"), True, {**CUDA_ROI_ENV, **SEPARABLE_ENV}))
    rec = Recorder(OP, path=args.out, device=args.device)
    for name, make_inputs in SHAPES.items():
        if any(name.startswith(prefix) for prefix in args.shapes.split(",")):
            bench_shape(rec, name, make_inputs(device), impls, device, reps, max_seconds)
    rec.write(args.out)
    print(f"wrote {len(rec.rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
