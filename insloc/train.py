"""The pretraining loop: the same script on CPU, one GPU, or torchrun over many (DDP from the environment:
NCCL on GPU, gloo on CPU). Every knob is a field of insloc.config.Config.

    python -m insloc pretrain --preset demo                  # CPU or one GPU
    torchrun --nproc_per_node 8 -m insloc pretrain --preset insloc-r50-fpn --data /data/imagenet/train
"""
import contextlib
import csv
import inspect
import math
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from insloc_ops import grid_anchors, selected_backends

from .checkpoint import (load_checkpoint, load_latest_checkpoint, numbered_checkpoints, remove_stale_temporaries,
                         resolve_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .config import Config, UsageError, architecture_fields, architecture_mismatch
from .data import CopyPasteComposite, EpochSampler, ImageFiles, TwoViewCrops, image_paths, normalize
from .data.sources import listing_fingerprint
from .models import build_encoder
from .moco import MoCo


def _no_buffer_sync():
    """DDP's argument for not broadcasting buffers at every forward: the queues stay equal on every process
    (all enqueue the same gathered keys) and each process keeps its own BatchNorm statistics, as in MoCo.
    Torch versions that have `forward_sync_buffers` deprecate `broadcast_buffers` (with a warning per
    process); there buffers are synced once at start, which only copies what every process already holds."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def build_model(cfg: Config):
    """MoCo over the encoder of cfg; the query's box jitter on P5 (FPN) or on the one C4 group."""
    encoder = build_encoder(cfg)
    anchors, jittered = None, ()
    if cfg.method == "insloc":
        grid = math.ceil(cfg.image_size / cfg.anchor_stride)
        anchors = grid_anchors(grid, cfg.anchor_stride, cfg.anchor_sizes, cfg.anchor_ratios)  # [A, 4]
        jittered = (encoder.num_groups - 1,)  # FPN: P5 only (as upstream); C4: its one group
    return MoCo(encoder, queue_size=cfg.queue_size, dim=cfg.dim, momentum=cfg.momentum,
                temperature=cfg.temperature, anchors=anchors, anchor_iou=cfg.anchor_iou,
                anchor_nms_iou=cfg.anchor_nms_iou,
                jittered_groups=jittered, shuffle_bn=cfg.shuffle_bn)


def build_dataset(cfg: Config):
    kind = CopyPasteComposite if cfg.method == "insloc" else TwoViewCrops
    try:
        paths = image_paths(cfg.data)
    except (OSError, RuntimeError) as e:
        raise UsageError(f"--data (data): {e}") from e
    probe, tries = ImageFiles(paths), min(16, len(paths))
    with warnings.catch_warnings(record=True) as caught:  # the reasons go into the error, if all fail
        warnings.simplefilter("always")
        if all(probe.load(i) is None for i in range(tries)):
            raise UsageError(f"--data (data): none of its first {tries} images can be read ({caught[0].message})")
    return kind(paths, cfg.image_size, cfg.crop_scale, cfg.crop_ratio, cfg.paste_size, cfg.samples_per_epoch,
                cfg.seed, cfg.decode_cache)


# What a resumed run reads from a checkpoint (an exported file has the model's weights only).
TRAINING_STATE = ("model", "optimizer", "epoch", "step_in_epoch", "step", "rng")


def _progress(ckpt):
    epoch, in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
    return f"it stopped in epoch {epoch + 1}, after {in_epoch} of its steps" if in_epoch else \
        f"it completed {epoch} epoch{'s' if epoch != 1 else ''}"


def _same_folder(path, folder):
    return os.path.realpath(os.path.dirname(path) or ".") == os.path.realpath(folder)


def gather_outcomes(problem, value, world):
    """Every process's `value`, by rank, once every process has reached this point: a problem (UsageError)
    of any process is raised in all of them (naming the rank it came from), so that they stop alike rather
    than some waiting forever in the next collective. One process: raises `problem`, else gives [value]."""
    if world == 1:
        if problem is not None:
            raise problem
        return [value]
    seen = [None] * world
    dist.all_gather_object(seen, (str(problem) if problem else None, value))
    failed = [(rank, text) for rank, (text, _) in enumerate(seen) if text]
    if failed:
        raise problem or UsageError(f"{failed[0][1]} (on rank {failed[0][0]})")
    return [value for _, value in seen]


def cosine_lr(step, steps_per_epoch, epochs, base_lr):
    """Cosine decay by epoch from base_lr towards 0, no warm-up: constant within an epoch, as both official
    codes schedule it (mmcv's CosineAnnealing by_epoch=True; MoCo's adjust_learning_rate). ``step`` is the
    number of optimizer steps done before this one."""
    epoch = min(step // max(steps_per_epoch, 1), epochs)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def resume_position(ckpt, global_batch, epoch_samples, steps_per_epoch, path):
    """(epoch, step_in_epoch, step, note, renumber) a resumed run starts from. A checkpoint written with another
    global batch (batch_size x processes) or epoch length is renumbered in this run's steps: at an epoch boundary
    always; mid-epoch when the epoch's samples are the same and the ones done are whole batches of this run
    (global batch j is samples [j x batch, (j + 1) x batch) of the epoch's order whatever the process count),
    else refused: continuing it would skip or repeat samples and mis-schedule the learning rate.
    ``renumber(step, epoch)``: a step of the checkpoint's numbering (its metrics rows) in this run's, or None
    when the numbering is unchanged."""
    epoch, in_epoch, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
    cfg = ckpt.get("config") or {}
    old_batch = ckpt.get("global_batch") or cfg.get("batch_size", 0) * ckpt.get("world_size", 1) or global_batch
    old_samples = ckpt.get("epoch_samples", epoch_samples)  # older checkpoints: assumed unchanged mid-epoch
    # Older checkpoints do not record their steps per epoch: inferred from a finished epoch, if any.
    old_per_epoch = ckpt.get("steps_per_epoch") or ((step - in_epoch) // epoch if epoch else steps_per_epoch)
    done = in_epoch * old_batch
    if in_epoch and (old_batch, old_samples) != (global_batch, epoch_samples):
        if old_samples != epoch_samples or done % global_batch:
            raise UsageError(f"--resume (resume): {path} stopped mid-epoch, after {done} of {old_samples} samples "
                             f"at a global batch of {old_batch}; this run's global batch (batch_size x processes) "
                             f"{global_batch} and {epoch_samples} samples per epoch cannot continue that epoch "
                             f"where it stopped: resume with a global batch of {old_batch}, or from a checkpoint "
                             f"written at the end of an epoch")
        in_epoch = done // global_batch
    new_step = epoch * steps_per_epoch + in_epoch
    if new_step == step:
        return epoch, in_epoch, step, "", None

    def renumber(old_step, old_epoch):
        return old_epoch * steps_per_epoch + (old_step - old_epoch * old_per_epoch) * old_batch // global_batch

    return epoch, in_epoch, new_step, (f"global batch {old_batch} -> {global_batch}, {old_samples} -> "
                                       f"{epoch_samples} samples per epoch: step {step} is step {new_step} here, "
                                       f"and so numbered in metrics.csv"), renumber


def setup_distributed(cfg: Config):
    """(rank, world_size, device). DDP when torchrun's WORLD_SIZE > 1; otherwise one process, rank 0, whatever
    RANK or LOCAL_RANK the shell holds (a rank other than 0 would write no checkpoint)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = 0, 0
    if world > 1:
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device (device): {cfg.device} asked for, but torch sees no CUDA GPU here "
                                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
            if world > 1 or device.index is None:  # torchrun: the local rank's GPU; plain "cuda": GPU 0
                device = torch.device("cuda", local_rank if world > 1 else 0)
            if device.index >= torch.cuda.device_count():
                raise UsageError(f"--device (device): {cfg.device} names GPU {device.index}, but there are "
                                 f"{torch.cuda.device_count()}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class MetricsLog:
    """metrics.csv (one row per step, appended on resume after dropping rows past the checkpoint) and
    the progress line."""

    def __init__(self, path, num_groups, resume_step, enabled, renumber=None):
        """``resume_step``: the checkpoint's step, in its own numbering (rows past it are work the checkpoint
        does not hold); ``renumber(step, epoch)``: the kept rows' steps in this run's numbering, if it differs."""
        self.path, self.enabled = path, enabled
        self.fields = ["step", "epoch", "lr", "loss"] + [f"loss_{g}" for g in range(num_groups)] + \
                      ["images_per_s", "data_wait"]
        if not enabled:
            return
        rows = []
        if resume_step > 0 and os.path.isfile(path):
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if renumber is not None:
                for r in rows:
                    r["step"] = renumber(int(r["step"]), int(r["epoch"]))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, rows):
        if self.enabled and rows:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields).writerows(rows)


def group_names(cfg, num_groups):
    return [f"P{g + 2}" for g in range(num_groups)] if num_groups == 4 else \
        ["C4" if cfg.method == "insloc" else "img"]


def plot_losses(csv_path, png_path, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = np.array([int(r["step"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    for g, name in enumerate(names):
        ax.plot(steps, [float(r[f"loss_{g}"]) for r in rows], lw=0.8, label=f"loss {name}")
    if len(names) > 1:
        ax.plot(steps, [float(r["loss"]) / len(names) for r in rows], "k", lw=1.2, label="sum / levels")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def epoch_means(csv_path, from_step=0):
    """{epoch: mean total loss} from metrics.csv, over the steps after ``from_step``."""
    sums = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if int(r["step"]) <= from_step:
                continue
            total, count = sums.get(int(r["epoch"]), (0.0, 0))
            sums[int(r["epoch"])] = (total + float(r["loss"]), count + 1)
    return {e: total / count for e, (total, count) in sorted(sums.items())}


def ops_line(device, anchor_nms_iou=None, method="insloc"):
    """The log line naming which insloc_ops backend runs each op on ``device`` (with ``anchor_nms_iou``
    set, the box jitter is the official NMS choice, which runs in eager PyTorch on the CPU). Image-level MoCo
    runs the InfoNCE op alone."""
    chosen = selected_backends(device)
    if method != "insloc":
        chosen = {op: b for op, b in chosen.items() if op == "queue_infonce"}
    shown = dict(chosen)
    if anchor_nms_iou is not None:
        shown["sample_anchor_boxes"] = f"reference on the CPU (official NMS choice at IoU {anchor_nms_iou:g})"
    line = "ops: " + ", ".join(f"{op}={backend}" for op, backend in shown.items())
    if torch.device(device).type == "cuda" and "reference" in chosen.values():
        line += (" (reference: pure PyTorch, slow on a GPU; the CUDA kernels are the default on the GPUs they were "
                 "verified on (see BENCHMARKS.md) when built; INSLOC_OPS_BACKEND=cuda or =triton runs them elsewhere)")
    return line


def _fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: Config, *, interrupt_after_step=None):
    """Runs (or resumes) a pretraining run. Returns a summary dict. `interrupt_after_step` stops after
    that many steps in total without a final checkpoint, as a crash would (for tests)."""
    cfg.validate()
    rank, world, device = setup_distributed(cfg)
    main = rank == 0
    out_dir = cfg.out_dir or os.path.join("runs", "custom")
    say = print if main else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    # What can be checked only now is checked before anything is built or written (UsageError: a bad flag).
    global_batch = cfg.batch_size * world
    if cfg.queue_size < global_batch:
        raise UsageError(f"--queue-size (queue_size) must be at least the global batch {global_batch} "
                         f"(batch_size x processes), got {cfg.queue_size}")
    try:  # INSLOC_OPS_BACKEND: a backend that does not exist, or is not available on this device
        ops = ops_line(device, cfg.anchor_nms_iou if cfg.method == "insloc" else None, cfg.method)
    except (RuntimeError, ValueError) as e:
        raise UsageError(str(e)) from e  # the message names INSLOC_OPS_BACKEND
    not_folder = main and os.path.exists(out_dir) and not os.path.isdir(out_dir)
    found = numbered_checkpoints(out_dir) if main and not not_folder else None
    if world > 1:  # rank 0's folder decides (other nodes may not see it), and every process stops alike
        shared = [(found, not_folder)]
        dist.broadcast_object_list(shared, src=0)
        found, not_folder = shared[0]
    if not_folder:
        raise UsageError(f"--out-dir (out_dir): {out_dir} is a file, not a folder")
    if not cfg.resume and found:
        raise UsageError(f"--out-dir (out_dir): {out_dir} holds checkpoints of an earlier run (the newest "
                         f"{os.path.basename(found[-1][1])}), which a fresh run would overwrite: continue it "
                         f"with --resume auto, or choose another --out-dir")
    ckpt, resume_path, problem = None, None, None
    try:  # each process loads the checkpoint itself; a problem is raised once every process has said its own
        if cfg.resume not in ("", "auto") and not os.path.exists(cfg.resume):
            raise UsageError(f"--resume (resume): no checkpoint file {cfg.resume}")
        try:
            if cfg.resume == "auto":
                ckpt, resume_path = load_latest_checkpoint(out_dir)
            elif cfg.resume:
                resume_path = resolve_checkpoint(cfg.resume)  # a run folder or its latest file: what latest names
                ckpt = load_checkpoint(resume_path)
        except (RuntimeError, FileNotFoundError) as e:  # unreadable, or a folder without checkpoints
            raise UsageError(f"--resume (resume): {e}") from e
        lacking = [k for k in TRAINING_STATE if ckpt is not None and not (isinstance(ckpt, dict) and k in ckpt)]
        if lacking:  # e.g. an `insloc export` output, or another program's weights
            raise UsageError(f"--resume (resume): {resume_path} is not a checkpoint of insloc pretrain (it has no "
                             f"{', '.join(repr(k) for k in lacking)}): resume from a run's checkpoint_<step>.pt, "
                             f"its folder or its latest file")
        if cfg.resume not in ("", "auto") and found and not _same_folder(resume_path, out_dir):
            raise UsageError(f"--out-dir (out_dir): {out_dir} holds checkpoints of another run than "
                             f"{resume_path} (the newest {os.path.basename(found[-1][1])}), which continuing "
                             f"there would mix with and prune: continue in that checkpoint's folder "
                             f"(--out-dir {os.path.dirname(resume_path) or '.'}) or in a new folder")
        if ckpt is not None and (ckpt["epoch"], ckpt["step_in_epoch"]) > (cfg.epochs, 0):
            raise UsageError(f"--epochs (epochs): {resume_path} is past the end of a run of {cfg.epochs} epochs "
                             f"({_progress(ckpt)}): resume with at least "
                             f"{ckpt['epoch'] + (ckpt['step_in_epoch'] > 0)} epochs")
        if ckpt is not None:
            mismatch = architecture_mismatch(cfg, ckpt.get("config") or {},
                                             architecture_fields(cfg.method, cfg.arch) + ("queue_size",))
            if mismatch:
                raise UsageError(f"--resume (resume): {resume_path} holds another model than this run builds "
                                 f"({'; '.join(mismatch)}): resume with the checkpoint's values")
    except UsageError as e:
        problem = e
    # every process must continue the same checkpoint (each loads it from its own filesystem)
    found_by_rank = gather_outcomes(problem, None if ckpt is None else (os.path.basename(resume_path),
                                                                        ckpt.get("step")), world)
    if any(found_here != found_by_rank[0] for found_here in found_by_rank):
        raise UsageError(f"--resume (resume): the processes found different checkpoints to continue "
                         f"({found_by_rank}, by rank): resuming a run of several "
                         f"machines needs --out-dir on a filesystem all of them share")
    # Every process lists the images itself; the samplers split one epoch of len(dataset) samples between
    # them, so different listings (a file missing from one machine's copy) would give the processes different
    # numbers of steps: the ones with fewer would leave the others waiting forever in a collective.
    dataset, listing, problem = None, None, None
    try:
        dataset = build_dataset(cfg)
        if world > 1:
            listing = (len(dataset.images), listing_fingerprint(dataset.images.paths, cfg.data))
    except UsageError as e:
        problem = e
    listings = gather_outcomes(problem, listing, world)
    if any(listed != listings[0] for listed in listings):
        counts = [count for count, _ in listings]
        raise UsageError(f"--data (data): the processes list different images ({counts} images, by rank"
                         f"{'; the same number, other files' if len(set(counts)) == 1 else ''}): every process "
                         f"must see the same files at the same place (one shared folder, or identical copies)")
    try:
        sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, rank, world)
    except ValueError as e:
        raise UsageError(str(e)) from e
    position = None if ckpt is None else resume_position(ckpt, global_batch, len(dataset),
                                                         sampler.batches_per_epoch, resume_path)
    if main:
        os.makedirs(out_dir, exist_ok=True)
        for stale in remove_stale_temporaries(out_dir):
            say(f"removed {stale}, a checkpoint a killed run had not finished writing")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)  # the same init on every process (DDP also broadcasts it)
    box_generator = torch.Generator().manual_seed(cfg.seed * 7919 + rank)  # CPU: the anchor choice

    moco = build_model(cfg).to(device)
    if cfg.channels_last and cuda:
        moco = moco.to(memory_format=torch.channels_last)
    base_lr = cfg.lr * global_batch / cfg.lr_batch
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=base_lr, momentum=cfg.sgd_momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)

    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.num_workers, pin_memory=cuda,
                                         persistent_workers=cfg.num_workers > 0,
                                         prefetch_factor=4 if cfg.num_workers > 0 else None,
                                         # the workers' base seed comes from here, not torch's global generator
                                         # (which shuffle-BN draws from): a resumed run then draws the same
                                         # permutations as an uninterrupted one. The samples do not use it.
                                         generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch

    epoch, step_in_epoch, step, renumber = 0, 0, 0, None
    if ckpt is not None:
        moco.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step_in_epoch, step, note, renumber = position
        set_rng_state(ckpt["rng"], device)
        generators = ckpt["rng"]["box_generator"]
        if ckpt.get("world_size") == world:
            box_generator.set_state(generators[rank])
        else:  # another number of processes: one seed per rank from rank 0's state (equal states would give
            # every rank the same anchor draws)
            first = torch.Generator()
            first.set_state(generators[0])
            box_generator.manual_seed(int(torch.randint(0, 2**62, (), generator=first)) + rank)
        say(f"resumed from {resume_path} at epoch {epoch}, step {step}" + (f" ({note})" if note else ""))
    later = [p for s, p in numbered_checkpoints(out_dir) if s > step and
             not (resume_path and os.path.abspath(p) == os.path.abspath(resume_path))]
    if main and later:
        warnings.warn(f"{out_dir} holds checkpoints past step {step} ({os.path.basename(later[-1])} the last), "
                      f"of the run before this one resumed or unreadable: none is deleted (one that this run "
                      f"reaches the step of is kept as checkpoint_<step>.superseded-<n>.pt), and `latest` (what "
                      f"--resume auto continues from) will name this run's checkpoints", stacklevel=2)

    model = moco
    if world > 1:
        model = DistributedDataParallel(moco, device_ids=[device.index] if cuda else None, **_no_buffer_sync())
    if cfg.compile:
        moco.encoder_q.compile()
        moco.encoder_k.compile()  # in place: state-dict keys are unchanged
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.bf16 and cuda) else contextlib.nullcontext()

    names = group_names(cfg, moco.num_groups)
    log = MetricsLog(os.path.join(out_dir, "metrics.csv"), moco.num_groups, ckpt["step"] if ckpt else 0, main,
                     renumber)
    shuffle_state = "on" if (cfg.shuffle_bn and world > 1) else "off (one process)" if cfg.shuffle_bn else "off"
    model_name = f"arch={cfg.arch} " if cfg.method == "insloc" else ""
    say(f"insloc pretrain: method={cfg.method} {model_name}ResNet-{cfg.depth} on {device} x {world}, "
        f"{len(dataset.images)} images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
        f"global batch {global_batch}, lr {base_lr:.4g}, queue {moco.num_groups}x{cfg.queue_size}, "
        f"shuffle-BN {shuffle_state}, bf16 {'on' if cfg.bf16 and cuda else 'off'}, out {out_dir}")
    say(ops)

    def checkpoint(epoch_done, in_epoch):
        states, path, failure = [None] * world, None, None
        if world > 1:
            dist.all_gather_object(states, box_generator.get_state())
        else:
            states = [box_generator.get_state()]
        if main:
            try:
                state = {"model": moco.state_dict(), "optimizer": optimizer.state_dict(), "scaler": None,
                         "epoch": epoch_done, "step_in_epoch": in_epoch, "step": step,
                         "rng": {**rng_state(device), "box_generator": states}, "config": cfg.to_dict(),
                         "world_size": world, "global_batch": global_batch, "epoch_samples": len(dataset),
                         "steps_per_epoch": steps_per_epoch}
                path = save_checkpoint(state, out_dir, cfg.keep_checkpoints)
            except Exception as e:
                if world == 1:
                    raise
                failure = e
        if world > 1:
            # Every process leaves once the checkpoint is on disk (a restart then finds it), or all stop with
            # rank 0's error rather than wait for it at a barrier.
            outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
            dist.broadcast_object_list(outcome, src=0)
            if failure is not None:
                raise failure
            if outcome[0] is not None:
                raise RuntimeError(f"rank 0 could not write the checkpoint of step {step}: {outcome[0]}")
        return path

    model.train()
    first_loss = last_loss = None
    pending, skipped_images = [], 0
    t_start = t_window = time.perf_counter()
    wait_window, steps_window, start_step = 0.0, 0, step
    while epoch < cfg.epochs:
        sampler.set_epoch(epoch, step_in_epoch)
        t_data = time.perf_counter()
        for batch in loader:
            wait_window += time.perf_counter() - t_data
            lr = cosine_lr(step, steps_per_epoch, cfg.epochs, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            im_q = batch["im_q"].to(device, non_blocking=True)  # [N, 3, S, S] uint8
            im_k = batch["im_k"].to(device, non_blocking=True)  # [N, 3, S, S] uint8
            if cfg.channels_last and cuda:  # on the uint8 images: normalize keeps the layout, no float32 copy
                im_q, im_k = im_q.contiguous(memory_format=torch.channels_last), \
                    im_k.contiguous(memory_format=torch.channels_last)
            im_q, im_k = normalize(im_q), normalize(im_k)  # float32
            boxes_q = batch["boxes_q"].to(device, non_blocking=True)  # [N, 4]
            boxes_k = batch["boxes_k"].to(device, non_blocking=True)  # [N, 4]
            skipped_images += int(batch["unreadable"].sum())
            rois_q = None
            if moco.anchor_nms_iou is not None:
                # The official anchor choice runs on the CPU: from the loader's boxes, so no wait for the GPU.
                rois_q = moco.query_rois(batch["boxes_q"], box_generator)  # [G, N, 5]
                if cuda:
                    rois_q = rois_q.pin_memory().to(device, non_blocking=True)
            with autocast:
                losses, keys = model(im_q, boxes_q, im_k, boxes_k, generator=box_generator,
                                     rois_q=rois_q)  # [G], [G, N, D]
            loss = losses.sum()  # the levels' losses, weights 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            moco.dequeue_and_enqueue(keys)  # after backward: the loss read the queue in place
            step, step_in_epoch, steps_window = step + 1, step_in_epoch + 1, steps_window + 1
            pending.append((step, epoch, lr, losses.detach()))

            end_of_epoch = step_in_epoch == steps_per_epoch
            stop = interrupt_after_step is not None and step >= interrupt_after_step
            checkpoint_due = not end_of_epoch and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
            # The rows are written before a checkpoint: a run resumed from it then has every step's row.
            if step % cfg.log_every == 0 or end_of_epoch or stop or checkpoint_due:
                now = time.perf_counter()
                images_per_s = steps_window * global_batch / (now - t_window)
                wait_share = wait_window / (now - t_window)
                values = torch.stack([p[3] for p in pending]).float().cpu().tolist()  # one sync per window
                rows = [{"step": s, "epoch": e, "lr": f"{l:.6g}", "loss": f"{sum(v):.6f}",
                         **{f"loss_{g}": f"{x:.6f}" for g, x in enumerate(v)},
                         "images_per_s": f"{images_per_s:.2f}", "data_wait": f"{wait_share:.3f}"}
                        for (s, e, l, _), v in zip(pending, values)]
                log.append(rows)
                first_loss = sum(values[0]) if first_loss is None else first_loss
                last_loss = sum(values[-1])
                eta = (now - t_start) / max(step - start_step, 1) * (total_steps - step)
                per_group = " ".join(f"{n} {x:.3f}" for n, x in zip(names, values[-1]))
                say(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} ({100 * step / total_steps:3.0f}%) "
                    f"loss {last_loss:.3f} [{per_group}] lr {lr:.4g} {images_per_s:.1f} img/s "
                    f"data wait {100 * wait_share:.0f}% eta {_fmt_time(eta)}"
                    + (f" replaced {skipped_images} draws of unreadable images" if skipped_images else ""), flush=True)
                pending, wait_window, steps_window, t_window = [], 0.0, 0, now
            if end_of_epoch:
                break
            if checkpoint_due:
                checkpoint(epoch, step_in_epoch)
            if stop:
                return {"step": step, "interrupted": True, "out_dir": out_dir}
            t_data = time.perf_counter()
        epoch, step_in_epoch = epoch + 1, 0
        path = checkpoint(epoch, 0)
        if path:
            say(f"saved {path}")
        if interrupt_after_step is not None and step >= interrupt_after_step:
            return {"step": step, "interrupted": True, "out_dir": out_dir}

    summary = {"step": step, "out_dir": out_dir, "first_loss": first_loss, "last_loss": last_loss,
               "wall_s": time.perf_counter() - t_start, "skipped_images": skipped_images}
    if main:
        # Until the queue has been filled once it holds random vectors, which are easy negatives: the loss
        # starts low and climbs to about log(K + 1) over those steps, so the trend is read after them.
        queue_full_step = math.ceil(cfg.queue_size / global_batch)
        summary["epoch_mean_loss"] = epoch_means(log.path, from_step=queue_full_step)
    if main and cfg.plot:
        plot_losses(log.path, os.path.join(out_dir, "loss.png"), names)
        say(f"wrote {os.path.join(out_dir, 'loss.png')}")
    means = summary.get("epoch_mean_loss") or {}
    trend = " -> ".join(f"{m:.3f}" for m in means.values()) or "none (the queue never filled)"
    say(f"done: {step} steps in {_fmt_time(summary['wall_s'])}; mean loss per epoch (once the queue is full) "
        f"{trend}; outputs in {out_dir}")
    if world > 1:
        dist.barrier()
    return summary
