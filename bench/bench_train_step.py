"""Training-step throughput of InsLoc (R50-FPN, R50-C4) with the fused ops versus the same model on the
baselines (torchvision roi_align per level, IoU matrix + multinomial, materialised-logits
cross-entropy), on synthetic device-resident input; and the data pipeline alone.

    python bench/bench_train_step.py --device cuda --out results.csv            # the recipe's shape
    python bench/bench_train_step.py --device cpu --depth 18 --batch 4 --image-size 128 --queue 4096 --steps 3
    python bench/bench_train_step.py --data-only --data imagenet-like     # the data pipeline (or --data DIR)

A step is: query + key forward (momentum update included), the summed loss's backward, SGD step, enqueue.
Model FLOP utilisation is the step's FLOPs (torch.utils.flop_counter: convolutions and matmuls) per second
over the GPU's dense bf16 peak, when the GPU is known.
"""
import argparse
import contextlib
import functools
import os
import sys
import tempfile

import torch

import insloc_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
from common import Recorder, peak_extra_mb, time_interleaved, time_ms  # noqa: E402

import insloc.models.encoders as encoders  # noqa: E402
import insloc.moco as moco_module  # noqa: E402
from insloc.config import Config  # noqa: E402
from insloc.train import build_dataset, build_model  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
# dense bf16 peaks by device-name fragment, the more specific first (an H100 PCIe or NVL is also an "H100")
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

OPS = {  # where the model looks the ops up, and the baseline that replaces each
    "roi_align": (encoders, "roi_align_multilevel", baselines.roi_align_torchvision),
    "anchors": (moco_module, "sample_anchor_boxes", baselines.sample_anchor_boxes_iou_matrix),
    "infonce": (moco_module, "queue_infonce", baselines.queue_infonce_materialised),
}


@contextlib.contextmanager
def implementations(impl, backends):
    """impl "fused": the insloc_ops ops with the named backends; "baseline": the baselines."""
    saved = {name: getattr(mod, attr) for name, (mod, attr, _) in OPS.items()}
    try:
        for name, (mod, attr, base) in OPS.items():
            if impl == "baseline":
                setattr(mod, attr, base)
            elif backends.get(name):
                setattr(mod, attr, functools.partial(saved[name], backend=backends[name]))
        yield
    finally:
        for name, (mod, attr, _) in OPS.items():
            setattr(mod, attr, saved[name])


def synthetic_batch(n, size, device, generator):
    """Images [n, 3, size, size] and pasted boxes [n, 4] with sides in [size/4, size) inside the canvas."""
    def boxes():
        wh = torch.randint(size // 4, size, (n, 2), generator=generator).float()
        xy = (torch.rand(n, 2, generator=generator) * (size - wh)).floor()
        return torch.cat([xy, xy + wh], 1).to(device)
    im = lambda: torch.randn(n, 3, size, size, generator=generator).to(device)  # noqa: E731
    return im(), boxes(), im(), boxes()


def make_step(cfg, args, device):
    """One training step of a fresh model on a fixed synthetic batch (the ops it calls are looked up when it runs,
    so implementations() around a call decides which run)."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    im_q, boxes_q, im_k, boxes_k = synthetic_batch(cfg.batch_size, cfg.image_size, device, gen)
    if cuda:
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and args.bf16) else contextlib.nullcontext()
    box_gen = torch.Generator().manual_seed(1)

    def step():
        with autocast:
            losses, keys = model(im_q, boxes_q, im_k, boxes_k, generator=box_gen)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        model.dequeue_and_enqueue(keys)
    return step


def measure_steps(cfg, impls, backends, args, rec, device):
    """The step of each implementation (its own model), timed in alternation (time_interleaved: a drift of the
    machine falls on all of them alike), then each one's peak memory. Returns {impl: (median ms, row)}."""
    cuda = device.type == "cuda"
    steps = {impl: make_step(cfg, args, device) for impl in impls}
    timings = time_interleaved([(impl, steps[impl], functools.partial(implementations, impl, backends))
                                for impl in impls], device, reps=args.steps, warmup=args.warmup,
                               max_seconds=args.max_seconds * len(impls))
    flops = None
    if args.flops:  # counted on the baseline's ops for every row: FlopCounterMode does not see the custom ops
        from torch.utils.flop_counter import FlopCounterMode

        with implementations("baseline", backends), FlopCounterMode(display=False) as counter:
            steps[impls[0]]()
        flops = counter.get_total_flops()
    name = f"{'R50' if cfg.depth == 50 else 'R18'}-{cfg.arch.upper()} b{cfg.batch_size} {cfg.image_size}px"
    out = {}
    for impl in impls:
        with implementations(impl, backends):
            peak = peak_extra_mb(steps[impl], device) if cuda else None
        timing = timings[impl]
        settings = ""
        if impl == "fused":  # the backend each op ran on: the package's default unless --backends named one
            selected = insloc_ops.selected_backends(device.type)
            settings = " ".join(f"{attr}={backends.get(op) or selected[attr]}" for op, (_, attr, _) in OPS.items())
        ips = cfg.batch_size / (timing[0] / 1e3)
        extra = f"{ips:.1f} img/s"
        if flops:
            tflops = flops / (timing[0] / 1e3) / 1e12
            peak_tf = next((v for k, v in PEAK_BF16_TFLOPS.items() if cuda and args.bf16  # a bf16 peak: bf16 only
                            and k in torch.cuda.get_device_name(device)), None)
            extra += f", {flops / 1e9:.2f} GFLOP a step, {tflops:.1f} TFLOP/s" + (
                f", MFU {100 * tflops / peak_tf:.1f}%" if peak_tf else "")
        # The shape cell names the shape alone (the same on every implementation's row, so rows join on it); the
        # throughput goes first in the settings cell, before the backends the fused step ran on.
        row = rec.add(name, impl, "step", timing, peak, settings="; ".join(s for s in (extra, settings) if s))
        print("   ", impl, extra, flush=True)
        out[impl] = (timing[0], row)
    return out


def imagenet_like_folder(folder, long_side=500, quality=90):
    """The built-in photographs re-encoded as ImageNet-like files: JPEG (quality 90), long side 500 px (many
    ImageNet images are 500 px on the long side). The built-in files are mostly large PNGs, slower to decode
    than the JPEGs that pretraining sets are made of. Returns `folder`."""
    from PIL import Image

    from insloc.data.sources import builtin_image_paths

    os.makedirs(folder, exist_ok=True)
    for i, path in enumerate(builtin_image_paths()):
        with Image.open(path) as f:
            image = f.convert("RGB")
        scale = long_side / max(image.size)
        size = tuple(max(2, round(s * scale)) for s in image.size)
        image.resize(size, Image.BILINEAR).save(os.path.join(folder, f"{i:02d}.jpg"), quality=quality)
    return folder


def measure_data(cfg, args, rec):
    """Composites per second in one process (= per DataLoader worker): decode, paste, augment."""
    ds = build_dataset(cfg)
    n = min(len(ds), args.data_samples)
    i = iter(range(10**9))
    timing = time_ms(lambda: ds[next(i) % len(ds)], "cpu", reps=n, warmup=2, max_seconds=args.max_seconds)
    rec.add(f"{cfg.image_size}px composite ({args.data})", "data", "sample", timing)
    print(f"    {1e3 / timing[0]:.1f} composites/s per worker", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", nargs="+", default=["fpn", "c4"], choices=["fpn", "c4"])
    p.add_argument("--depth", type=int, default=50, choices=[18, 50])
    p.add_argument("--batch", type=int, default=32, help="images per GPU (recipe: 32)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--impl", nargs="+", default=["baseline", "fused"], choices=["baseline", "fused"])
    p.add_argument("--backends", default="",
                   help="fused backends per op, e.g. roi_align=cuda,anchors=cuda,infonce=triton "
                        "(default: the package's defaults for the device, insloc_ops.selected_backends; the "
                        "rows' settings column names the backends that ran)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--data-samples", type=int, default=32, help="composites timed for the data pipeline")
    p.add_argument("--data", default="builtin",
                   help="images for the data-pipeline row: 'builtin' (mostly large PNGs), 'imagenet-like' (the "
                        "built-in photographs as 500 px JPEGs), a folder or a list file (your pretraining set)")
    p.add_argument("--no-data", dest="measure_data", action="store_false")
    p.add_argument("--data-only", action="store_true", help="time the data pipeline only, no training step")
    p.add_argument("--out", default=None, help="CSV to append rows to")
    p.add_argument("--quick", action="store_true", help="5 steps, 1 warm-up")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 5, 1
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    backends = dict(kv.split("=") for kv in args.backends.split(",") if kv)
    unknown = sorted(set(backends) - set(OPS))
    if unknown:
        p.error(f"--backends: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    rec = Recorder("train_step", device=args.device)
    for arch in [] if args.data_only else args.arch:
        cfg = Config(method="insloc", arch=arch, depth=args.depth, batch_size=args.batch,
                     image_size=args.image_size, queue_size=args.queue)
        measured = measure_steps(cfg, list(dict.fromkeys(args.impl)), backends, args, rec, device)
        if "baseline" in measured and "fused" in measured:  # on the fused row, whatever the order of --impl
            speedup = measured["baseline"][0] / measured["fused"][0]
            measured["fused"][1]["speedup_vs_baseline"] = f"{speedup:.2f}"
            print(f"    fused step x{speedup:.2f} vs baseline", flush=True)
        if args.out:  # each architecture's rows as soon as they are complete: a stopped run keeps them
            rec.write(args.out)
    if args.measure_data or args.data_only:
        if args.data == "imagenet-like":
            with tempfile.TemporaryDirectory() as folder:
                cfg = Config(method="insloc", image_size=args.image_size, data=imagenet_like_folder(folder))
                measure_data(cfg, args, rec)
        else:
            measure_data(Config(method="insloc", image_size=args.image_size, data=args.data), args, rec)
    if args.out:
        rec.write(args.out)


if __name__ == "__main__":
    main()
