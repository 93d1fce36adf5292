"""Host cost per call: each op's public function at tiny shapes, where the kernels' own work is small.

On a GPU the calls are issued back to back without a sync between them, 20 a batch (a few hundred
launches, which the launch queue absorbs while the GPU keeps up), so a call's wall time is the host's work:
argument checks, backend selection, dispatch, autograd, allocations and launches (a call that syncs, as a
baseline selecting by a mask does, waits for the GPU as well). At the benchmark shapes that cost hides under
the kernels or adds to them (bench/profile_ops.py splits the two there); here it stands alone. On a CPU the
tiny kernels run inside the call, so the rows are host work plus a little kernel time. Baselines, side by
side: four torchvision.ops.roi_align calls + stack, the materialised-logits InfoNCE, the IoU-matrix argmax
anchor sampler. Rows (milliseconds per call) go to --out, in the op benchmarks' CSV format.

    python bench/bench_host.py [--device cpu|cuda] [--threads 2] [--quick] [--out bench/results/host.csv]
"""
import argparse
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import insloc_ops  # noqa: E402
from bench import baselines  # noqa: E402
from bench.common import Recorder  # noqa: E402

BACKENDS = ("cpu", "cuda", "triton")


def host_ms(fns, device, calls=100, batches=15, warmup=20):
    """{key: (median, p20, p80, batches)} of the wall time per call of each ``fns[key]`` over batches of
    ``calls`` calls. The implementations' batches are timed in alternation, in an order shuffled per round
    (seeded), as bench.common.time_interleaved does, so that a drift of the machine falls on all of them
    alike; the device is synced between batches, outside the timed part."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    keys, per_call, order = list(fns), {key: [] for key in fns}, random.Random(0)
    for _ in range(batches):
        for i in order.sample(range(len(keys)), len(keys)):
            fn = fns[keys[i]]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call[keys[i]].append((time.perf_counter() - t0) * 1e3 / calls)
            sync()
    summary = {}
    for key, times in per_call.items():
        q = statistics.quantiles(times, n=5)
        summary[key] = (statistics.median(times), q[0], q[-1], batches)
    return summary


def with_fused(op, device, baseline, fused):
    """{"baseline": baseline, backend: a call of ``fused(backend)`` for each backend available here}."""
    impls = {"baseline": baseline}
    for b in BACKENDS:
        if b == "triton" and torch.device(device).type == "cpu":
            continue  # only through TRITON_INTERPRET=1 (the tests' setting): an interpreter's time, not host cost
        if insloc_ops._backend.is_available(op, b, torch.device(device).type, torch.device(device).index):
            impls[b] = (lambda b: lambda: fused(b))(b)
    return impls


def roi_cases(device):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, s, s, generator=g).to(device).requires_grad_() for s in (16, 8, 4, 2)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    xy = torch.rand(4, 2, generator=g) * 40
    rois = torch.cat([torch.tensor([[0.], [1.], [0.], [1.]]), xy, xy + 20], 1).to(device)
    impls = with_fused("roi_align_multilevel", device, lambda: baselines.roi_align_torchvision(feats, rois, 7, scales),
                       lambda b: insloc_ops.roi_align_multilevel(feats, rois, 7, scales, backend=b))
    return "roi_align_multilevel", "4 levels, 4 RoIs", feats, impls


def infonce_cases(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 16, generator=g).to(device).requires_grad_()
    k = torch.randn(4, 4, 16, generator=g).to(device)
    queue = torch.randn(4, 64, 16, generator=g).to(device)
    impls = with_fused("queue_infonce", device, lambda: baselines.queue_infonce_materialised(q, k, queue, 0.2),
                       lambda b: insloc_ops.queue_infonce(q, k, queue, 0.2, backend=b))
    return "queue_infonce", "G=4 N=4 K=64 D=16", [q], impls


def anchor_cases(device):
    g = torch.Generator().manual_seed(0)
    gt, anchors = baselines.random_boxes(4, 64, 64, 8, 32, g), baselines.random_boxes(64, 64, 64, 8, 32, g)
    gt, anchors = gt.to(device), anchors.to(device)
    impls = with_fused("sample_anchor_boxes", device,
                       lambda: baselines.sample_anchor_boxes_random_argmax(gt, anchors, 0.5, generator=g),
                       lambda b: insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, generator=g, backend=b))
    return "sample_anchor_boxes", "4 boxes x 64 anchors", None, impls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--quick", action="store_true", help="fewer calls (5 batches of 20)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "host.csv"))
    args = ap.parse_args(argv)
    calls, batches = (20, 5) if args.quick else (100, 15)
    if torch.device(args.device).type == "cuda":
        calls, batches = 20, 5 * batches  # the launch queue must not fill within a batch
    if args.threads:
        torch.set_num_threads(args.threads)
    for make in (roi_cases, infonce_cases, anchor_cases):
        op, shape, grad_inputs, impls = make(args.device)
        rec = Recorder(op, args.out, device=args.device)
        passes = {"forward": False} if grad_inputs is None else {"forward": False, "fwd+bwd": True}
        for pass_, backward in passes.items():
            calls_of = {}
            for impl, fn in impls.items():
                if backward:
                    def call(fn=fn):
                        return torch.autograd.grad(fn().sum(), grad_inputs)
                else:
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn()
                calls_of[impl] = call
            timings = host_ms(calls_of, args.device, calls, batches)
            for impl, timing in timings.items():
                rec.add(shape, impl, pass_, timing,
                        baseline_ms=None if impl == "baseline" else timings["baseline"][0])

if __name__ == "__main__":
    main()
