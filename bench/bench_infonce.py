"""queue_infonce: fused kernels vs materialised logits (per group einsum + cat + F.cross_entropy).

Shapes: InsLoc (G=4, N=32, K=65,536, D=128) and MoCo (G=1, N=256, K=65,536, D=128), queue fp32 and bf16;
forward, backward and both; median ms and peak extra memory; on a GPU also the achieved bandwidth over
the floor (the queue read once forward and once backward). On CPU the fused impl is the C++ kernel:
"cpu" is what the public API runs (for training, the one-pass kernel that returns what the backward needs,
so "forward" -- timed under no_grad, i.e. inference -- and "backward" do not add up to "both"), and
"cpu-twopass" is the same kernel's forward + recompute-in-backward path, for comparison. The "cpu" backward
row has no speed-up (its queue work was done in the forward). The implementations of a shape are timed in
alternation, pass by pass (bench/common.py time_interleaved).

On a GPU, fp32 products run as IEEE fp32 in the baseline (torch's default) and as TF32x3 on tensor cores
in the Triton kernel (about fp32 accuracy); --tf32 allows TF32 for both (torch.backends.cuda.matmul
.allow_tf32) and marks the rows' shapes with "/tf32". The CUDA C++ kernels run three times: "cuda" (TF32x3
WMMA on tensor cores where they apply, as by default), "cuda-cudacores" (INSLOC_OPS_CUDA_INFONCE_TC=0:
fp32 on CUDA cores), to show whether the tensor cores pay, and "cuda-pipelined"
(INSLOC_OPS_CUDA_INFONCE_PIPELINE=1: queue tiles prefetched into registers; opt-in until measured).

The bandwidth fraction needs the GPU's peak: 3350 GB/s for an H100 SXM and 4800 GB/s for an H200 are known;
on another GPU pass --peak-gbs (without it, only the achieved GB/s is printed).

    python bench/bench_infonce.py [--device cpu|cuda] [--quick] [--tf32] [--peak-gbs GB/S] [--out CSV]
"""
import argparse
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import insloc_ops  # noqa: E402
from bench import baselines  # noqa: E402
from bench.common import Recorder, environ, peak_extra_mb, time_interleaved  # noqa: E402

# The rows' shapes (G, N, K, D, queue dtype) and passes, in every run without --tf32: on CUDA, pick_defaults.py
# expects each of them for each fused backend.
SHAPES = {f"{name}/{str(dt).split('.')[-1]}": (*dims, dt)
          for name, dims in (("insloc", (4, 32, 65536, 128)), ("moco", (1, 256, 65536, 128)))
          for dt in (torch.float32, torch.bfloat16)}
PASSES = ("forward", "backward", "both")
TEMPERATURE = 0.2
# Peak memory bandwidth (GB/s) by device name: H100 SXM ("NVIDIA H100 80GB HBM3"; PCIe and NVL differ) and
# H200 (not the GH200).
PEAK_GBS = ((r"\bH100 (80GB HBM3|SXM)", 3350.0), (r"\bH200\b", 4800.0))


def materialised(q, k, queue, temperature):
    return baselines.queue_infonce_materialised(q, k, queue, temperature)  # [G]


def peak_gbs(device_name):
    """The known peak bandwidth of this GPU in GB/s, else None."""
    return next((gbs for pattern, gbs in PEAK_GBS if re.search(pattern, device_name)), None)


def make_inputs(shape, device):
    G, N, K, D, queue_dtype = shape
    q = F.normalize(torch.randn(G, N, D, device=device), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(G, N, D, device=device), dim=-1).requires_grad_()
    queue = F.normalize(torch.randn(G, K, D, device=device), dim=-1).to(queue_dtype)
    return q, k, queue


def impls(device):
    device = torch.device(device)  # "cuda:1" is a CUDA device too
    out = {"baseline": materialised}
    fused = ["cpu"] if device.type == "cpu" else ["triton", "cuda"]
    for backend in fused:
        if insloc_ops._backend.is_available("queue_infonce", backend, device.type, device.index):
            out[backend] = (lambda b: lambda q, k, queue, t: insloc_ops.queue_infonce(q, k, queue, t, backend=b))(
                backend)
    if "cuda" in out:  # the CUDA C++ kernels on CUDA cores (timed with INSLOC_OPS_CUDA_INFONCE_TC=0)
        out["cuda-cudacores"] = out["cuda"]
        # ... and with register-prefetched queue tiles (INSLOC_OPS_CUDA_INFONCE_PIPELINE=1; opt-in until measured)
        out["cuda-pipelined"] = out["cuda"]
    if device.type == "cpu" and "cpu" in out:
        out["cpu-twopass"] = lambda q, k, queue, t: torch.ops.insloc_ops.queue_infonce(q, k, queue, t)[0].mean(-1)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="GPU memory bandwidth for the floor, GB/s (default: from the device name, if known)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for fp32 products (baseline matmuls and Triton dots alike)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "infonce.csv"))
    args = parser.parse_args()
    on_cpu = torch.device(args.device).type == "cpu"
    if on_cpu:
        torch.set_num_threads(args.threads)
    reps, max_s = (5, 5.0) if args.quick else (30, 20.0)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if not on_cpu:
        print(f"fp32 products: baseline {'TF32' if args.tf32 else 'IEEE fp32'}, Triton "
              f"{'TF32' if args.tf32 else 'TF32x3'}, CUDA C++ TF32x3 (WMMA; cuda-cudacores: fp32 on CUDA "
              f"cores)", flush=True)
    if not on_cpu and args.peak_gbs is None:
        gpu = torch.cuda.get_device_name(args.device)
        args.peak_gbs = peak_gbs(gpu)
        print(f"peak bandwidth of {gpu}: " + (f"{args.peak_gbs:.0f} GB/s" if args.peak_gbs else
                                               "unknown, so no fraction of peak (pass --peak-gbs)"), flush=True)
    tc_setting = os.environ.get("INSLOC_OPS_CUDA_INFONCE_TC", "1")
    pipeline_setting = os.environ.get("INSLOC_OPS_CUDA_INFONCE_PIPELINE", "0")
    rec = Recorder("queue_infonce", path=args.out, device=args.device)
    for shape_name, shape in SHAPES.items():
        q, k, queue = make_inputs(shape, args.device)
        label = shape_name + ("/tf32" if args.tf32 else "")
        queue_bytes = queue.numel() * queue.element_size()
        calls = {}  # impl -> (context, {pass: fn}, settings)
        for name, fn in impls(args.device).items():
            env = {}
            if name.startswith("cuda"):  # the CUDA kernels read these per call
                env = {"INSLOC_OPS_CUDA_INFONCE_TC": "0" if name == "cuda-cudacores" else tc_setting,
                       "INSLOC_OPS_CUDA_INFONCE_PIPELINE": "1" if name == "cuda-pipelined" else pipeline_setting}

            def context(env=env):
                return environ(env)

            def forward(fn=fn):
                with torch.no_grad():
                    fn(q, k, queue, TEMPERATURE)

            def both(fn=fn):
                loss = fn(q, k, queue, TEMPERATURE).sum()
                torch.autograd.grad(loss, (q, k))

            with context():
                loss = fn(q, k, queue, TEMPERATURE).sum()  # kept for the backward pass's retained graph

            def backward(loss=loss):
                torch.autograd.grad(loss, (q, k), retain_graph=True)

            settings = " ".join(f"{key}={value}" for key, value in env.items())
            calls[name] = (context, dict(zip(PASSES, (forward, backward, both))), settings)
        for pass_ in PASSES:
            timings = time_interleaved([(name, fns[pass_], context) for name, (context, fns, _) in calls.items()],
                                       args.device, reps=reps, warmup=2, max_seconds=max_s * len(calls))
            for name, (context, fns, settings) in calls.items():
                timing = timings[name]
                with context():
                    peak = peak_extra_mb(fns[pass_], args.device)
                # The CPU one-pass kernel does the backward's queue work in the forward: its backward alone is
                # no comparison with the baseline's, so that row has no speed-up.
                one_pass = pass_ == "backward" and name == "cpu"
                rec.add(label, name, pass_, timing, peak, None if one_pass else timings["baseline"][0], settings)
                if not on_cpu and pass_ == "both":
                    floor_ms = 2 * queue_bytes / (args.peak_gbs * 1e9) * 1e3 if args.peak_gbs else None
                    print(f"    {name}: {2 * queue_bytes / timing[0] / 1e6:8.1f} GB/s achieved" + (
                        f", floor {floor_ms:.3f} ms = {floor_ms / timing[0]:.0%} of peak" if floor_ms else
                        ", fraction of peak unknown"), flush=True)
        calls.clear()
    rec.write(args.out)
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
