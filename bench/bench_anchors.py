"""sample_anchor_boxes: fused kernels vs the IoU-matrix baseline, side by side.

Shapes: InsLoc (32 boxes in a 256 x 256 composite, the 5,120 anchors of a 16 x 16 grid with 4 sizes x 5
ratios) and detection (200 boxes, the 242,991 P2-P6 anchors of an 800 x 1216 padded image: strides
4..64, one size 8 x stride and ratios 0.5, 1, 2 per level). Baseline: torchvision.ops.box_iou (the
N x A matrix), a threshold, then one torch.multinomial draw per box over its eligible anchors (argmax
when none), as the official code does; and a stronger one, baseline_randargmax: the same IoU matrix and an
N x A uniform random matrix (drawn on the device), argmax over the eligible anchors of all boxes at once.
Fused: insloc_ops.sample_anchor_boxes (C++ kernel on CPU; the CUDA and Triton kernels on a GPU). Rows go
to bench/results/anchors.csv (see --out). The implementations of a shape are timed in alternation
(bench/common.py time_interleaved).

    python bench/bench_anchors.py [--device cpu|cuda] [--quick] [--threads 2] [--out PATH]
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import insloc_ops  # noqa: E402
from bench.common import Recorder, peak_extra_mb, time_interleaved  # noqa: E402
from bench.baselines import (detection_anchors, insloc_inputs, random_boxes,  # noqa: E402
                             sample_anchor_boxes_iou_matrix, sample_anchor_boxes_random_argmax)


# The rows' shapes and passes, in every run: pick_defaults.py expects each of them for each fused backend.
SHAPES = ("insloc 32x5120", "det 200x242991")
PASSES = ("forward",)


def shapes(device):
    g = torch.Generator().manual_seed(0)
    gt, anchors = insloc_inputs(32, g)
    yield SHAPES[0], gt.to(device), anchors.to(device)
    gt = random_boxes(200, 1216, 800, 16, 600, g)
    anchors = detection_anchors(800, 1216, (4, 8, 16, 32, 64))  # [242991, 4]
    yield SHAPES[1], gt.to(device), anchors.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "anchors.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps, max_seconds = (10, 3.0) if args.quick else (50, 15.0)
    available = insloc_ops.available_backends()["sample_anchor_boxes"][device.type]
    fused = [b for b in (("cpu",) if device.type == "cpu" else ("cuda", "triton")) if b in available]
    rec = Recorder("sample_anchor_boxes", path=args.out, device=args.device)
    (pass_,) = PASSES
    for name, gt, anchors in shapes(device):
        g = torch.Generator().manual_seed(1)
        baseline_gen = g if device.type == "cpu" else None  # multinomial needs a generator on the tensors' device

        def baseline():
            return sample_anchor_boxes_iou_matrix(gt, anchors, 0.5, generator=baseline_gen)

        def randargmax():
            return sample_anchor_boxes_random_argmax(gt, anchors, 0.5, generator=g)

        entries = [("baseline", baseline, None), ("baseline_randargmax", randargmax, None)]
        for backend in fused:
            def run(backend=backend):
                return insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, generator=g, backend=backend)

            entries.append((backend, run, None))
        # Timed in alternation; a per-box baseline call takes seconds at the detection shape on a CPU: one
        # warm-up, at least 5 timed rounds.
        timings = time_interleaved(entries, device, reps, 1, max_seconds * len(entries))
        base, strong = timings["baseline"][0], timings["baseline_randargmax"][0]
        for impl, fn, _ in entries:
            rec.add(name, impl, pass_, timings[impl], peak_extra_mb(fn, device),
                    None if impl == "baseline" else base)
            if impl in fused:
                print(f"{'':22s} {name:18s} {impl:12s} vs baseline_randargmax: x{strong / timings[impl][0]:.2f}")
    rec.write(args.out)


if __name__ == "__main__":
    main()
