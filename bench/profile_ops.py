"""Where each op's time goes on a GPU: host work per call against the GPU's own kernel time.

The op benchmarks time one call at a time (CUDA events around it, then a sync), so a call that spends
longer launching than its kernels run is timed at its launch cost. This script reports, per op, shape and
implementation (forward+backward, forward alone for the anchors):
  latency  median of single calls, as the benchmarks time them (GPU idle before each);
  stream   per-call time of 20 back-to-back calls between two events (host and GPU overlap, as in training);
  host     the host's wall time per call in those 20 calls (it waits for the GPU there only where a call
           itself syncs, e.g. a baseline that selects by a mask);
  gpu      the call's kernel time, from torch.profiler (the sum of its kernels' durations);
  kernels  kernel launches per call.
Where latency and stream are both well above gpu, the host is the bottleneck (host says how much of it is
ours to save); where stream is near gpu, the kernels are. Rows go to --out (CSV) and to stdout.

    python bench/profile_ops.py --out OUT/profile.csv
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import insloc_ops  # noqa: E402
from bench import baselines  # noqa: E402
from bench import bench_infonce, bench_roi_align  # noqa: E402
from bench.common import environ, environment, time_ms  # noqa: E402

STREAM_CALLS = 20


def roi_cases(device):
    for shape in ("insloc", "insloc-bf16-cl", "detection-7x7"):
        inp = bench_roi_align.SHAPES[shape](device)
        feats = [f.detach().requires_grad_() for f in inp["features"]]
        amp = feats[0].dtype == torch.bfloat16
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=amp):
            grad = torch.randn_like(bench_roi_align.baseline(inp, inp["features"]))
        impls = [("torchvision", bench_roi_align.baseline, None)]
        impls += [(b, bench_roi_align.fused(b), None) for b in ("cuda", "triton")
                  if insloc_ops._backend.is_available("roi_align_multilevel", b, device)]
        if insloc_ops._backend.is_available("roi_align_multilevel", "cuda", device):
            impls.append(("cuda-separable", bench_roi_align.fused("cuda"), bench_roi_align.SEPARABLE_ENV))
        for impl, fn, env in impls:
            def call(fn=fn, inp=inp, feats=feats, grad=grad, amp=amp, env=env):
                with environ(env):  # the kernels read it in the backward too
                    with torch.autocast(device, torch.bfloat16, enabled=amp):
                        out = fn(inp, feats)
                    return torch.autograd.grad(out, feats, grad)
            yield "roi_align_multilevel", shape, impl, "fwd+bwd", call


def infonce_cases(device):
    for shape in ("insloc/float32", "insloc/bfloat16", "moco/float32"):
        q, k, queue = bench_infonce.make_inputs(bench_infonce.SHAPES[shape], device)
        for impl, fn in bench_infonce.impls(device).items():
            if impl == "cuda-cudacores":
                continue
            env = {"INSLOC_OPS_CUDA_INFONCE_PIPELINE": "1" if impl == "cuda-pipelined" else "0"}

            def call(fn=fn, q=q, k=k, queue=queue, env=env):
                with environ(env):
                    return torch.autograd.grad(fn(q, k, queue, bench_infonce.TEMPERATURE).sum(), (q, k))
            yield "queue_infonce", shape, impl, "both", call


def anchor_cases(device):
    g = torch.Generator().manual_seed(0)
    gt, anchors = baselines.insloc_inputs(32, g)
    gt, anchors = gt.to(device), anchors.to(device)
    yield ("sample_anchor_boxes", "insloc 32x5120", "baseline_randargmax", "forward",
           lambda: baselines.sample_anchor_boxes_random_argmax(gt, anchors, 0.5, generator=g))
    for b in ("cuda", "triton"):
        if insloc_ops._backend.is_available("sample_anchor_boxes", b, device):
            yield ("sample_anchor_boxes", "insloc 32x5120", b, "forward",
                   lambda b=b: insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, generator=g, backend=b))


def stream_ms(fn, reps=5):
    """(stream, host): medians over reps of STREAM_CALLS back-to-back calls, the GPU's time per call
    between two events, and the host's (wall time until the last call returned, before the sync: the
    launch queue holds a few hundred launches, so the host waits for the GPU only where a call syncs)."""
    times, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        for _ in range(STREAM_CALLS):
            fn()
        host.append((time.perf_counter() - t0) * 1e3 / STREAM_CALLS)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / STREAM_CALLS)
    return statistics.median(times), statistics.median(host)


def kernel_time(fn, calls=10):
    """(ms of kernel time per call, kernel launches per call, the three largest kernels)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    total = sum(t for t, _ in kernels.values()) / calls / 1e3
    launches = sum(n for _, n in kernels.values()) / calls
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:3]
    return total, launches, "; ".join(f"{name[:60]} {t / calls / 1e3:.3f}" for name, (t, _) in top)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="CSV file")
    ap.add_argument("--ops", default="roi,infonce,anchors", help="which ops: roi, infonce, anchors")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_ops.py needs a GPU")
    device = "cuda"
    env = environment()
    makers = {"roi": roi_cases, "infonce": infonce_cases, "anchors": anchor_cases}
    fields = ["op", "shape", "impl", "pass", "latency_ms", "stream_ms", "host_ms", "gpu_ms", "kernels_per_call",
              "top_kernels_ms", *env]
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        print(f"{'op':22s} {'shape':16s} {'impl':20s} {'latency':>8s} {'stream':>8s} {'host':>8s} {'gpu':>8s} "
              f"{'launches':>8s}")
        for which in args.ops.split(","):
            for op, shape, impl, pass_, fn in makers[which](device):
                latency = time_ms(fn, device, reps=30, warmup=5, max_seconds=5.0)[0]
                stream, host = stream_ms(fn)
                gpu, launches, top = kernel_time(fn)
                w.writerow({"op": op, "shape": shape, "impl": impl, "pass": pass_, "latency_ms": f"{latency:.4f}",
                            "stream_ms": f"{stream:.4f}", "host_ms": f"{host:.4f}", "gpu_ms": f"{gpu:.4f}",
                            "kernels_per_call": f"{launches:.1f}", "top_kernels_ms": top, **env})
                fh.flush()
                print(f"{op:22s} {shape:16s} {impl:20s} {latency:8.3f} {stream:8.3f} {host:8.3f} {gpu:8.3f} "
                      f"{launches:8.1f}", flush=True)


if __name__ == "__main__":
    main()
