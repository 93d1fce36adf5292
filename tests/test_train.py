import csv
import dataclasses
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image

import insloc.config
import insloc.train
from insloc.checkpoint import find_latest, list_checkpoints, load_checkpoint, save_checkpoint
from insloc.cli import build_parser, config_from_args, default_out_dir, main
from insloc.config import Config, UsageError, demo
from insloc.train import cosine_lr, train

from conftest import free_port, run_processes


# a few small ops per step: one thread avoids OpenMP oversubscription on shared CPUs
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out_dir, **kw):
    base = dict(depth=18, fpn_channels=8, head_fc_dim=16, dim=8, image_size=64, paste_size=[24, 63],
                anchor_sizes=[16.0, 32.0, 64.0], queue_size=16, batch_size=2, samples_per_epoch=4, epochs=2,
                num_workers=0, decode_cache=8, log_every=1, out_dir=str(out_dir), plot=False,
                data="builtin", seed=3, threads=1)
    base.update(kw)
    return Config(**base)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [[float(r[k]) for k in r if k.startswith("loss")] for r in rows]


def test_cosine_lr_decays_by_epoch_without_warmup():
    # 10 steps per epoch, 4 epochs: constant within an epoch, 0.5 * (1 + cos(pi * epoch / 4)) of the base
    assert [cosine_lr(s, 10, 4, 0.03) for s in (0, 9)] == [0.03, 0.03]
    assert cosine_lr(10, 10, 4, 0.03) == pytest.approx(0.015 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(20, 10, 4, 0.03) == pytest.approx(0.015)
    assert cosine_lr(39, 10, 4, 0.03) == pytest.approx(0.015 * (1 + math.cos(3 * math.pi / 4)))
    assert cosine_lr(40, 10, 4, 0.03) == pytest.approx(0.0)


def test_run_writes_checkpoint_metrics_and_plot(tmp_path):
    summary = train(tiny(tmp_path, plot=True))
    assert summary["step"] == 4
    steps, values = losses(tmp_path)
    assert steps == [1, 2, 3, 4] and all(len(v) == 5 for v in values)  # total + 4 levels
    assert all(abs(v[0] - sum(v[1:])) < 1e-4 for v in values)
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    ckpt = load_checkpoint(find_latest(str(tmp_path)))
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (2, 0, 4)
    assert ckpt["model"]["queue"].shape == (4, 16, 8) and int(ckpt["model"]["queue_ptr"]) == 8
    assert any(k.startswith("encoder_k.head.fc3") for k in ckpt["model"])
    assert Config.from_dict(ckpt["config"]).queue_size == 16
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python", "box_generator"}
    assert ckpt["optimizer"]["state"] and ckpt["scaler"] is None
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == \
        ["checkpoint_00000002.pt", "checkpoint_00000004.pt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.mark.parametrize("anchor_nms_iou", [None, 0.7])  # 0.7: the official anchor choice, made before the forward
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tmp_path, anchor_nms_iou):
    train(tiny(tmp_path / "straight", anchor_nms_iou=anchor_nms_iou))
    interrupted = tiny(tmp_path / "resumed", checkpoint_every=1, anchor_nms_iou=anchor_nms_iou)
    assert train(interrupted, interrupt_after_step=3)["interrupted"]  # mid-epoch 2, like a crash
    assert load_checkpoint(find_latest(str(tmp_path / "resumed")))["step_in_epoch"] == 1
    train(tiny(tmp_path / "resumed", resume="auto", anchor_nms_iou=anchor_nms_iou))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def assert_same_run(straight, resumed):
    """Both runs logged steps 1-4 with equal losses and end with bitwise equal models."""
    steps_a, loss_a = losses(straight)
    steps_b, loss_b = losses(resumed)
    assert steps_a == steps_b == [1, 2, 3, 4]
    assert loss_a == loss_b
    a = load_checkpoint(find_latest(str(straight)))["model"]
    b = load_checkpoint(find_latest(str(resumed)))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_can_extend_the_epochs(tmp_path):
    train(tiny(tmp_path, epochs=1))
    summary = train(tiny(tmp_path, epochs=2, resume="auto"))
    assert summary["step"] == 4
    steps, _ = losses(tmp_path)
    assert steps == [1, 2, 3, 4]
    assert load_checkpoint(find_latest(str(tmp_path)))["epoch"] == 2


@pytest.mark.parametrize("method, arch", [("insloc", "c4"), ("moco", "fpn")])
def test_c4_and_moco_runs_train(tmp_path, method, arch):
    summary = train(tiny(tmp_path, method=method, arch=arch, epochs=1))
    _, values = losses(tmp_path)
    assert summary["step"] == 2 and all(len(v) == 2 for v in values)


def test_checkpoints_are_atomic_and_latest_points_at_the_newest(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint({"step": step, "x": torch.arange(3)}, str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == \
        ["checkpoint_00000010.pt", "checkpoint_00000015.pt"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint_00000015.pt"
    assert load_checkpoint(find_latest(str(tmp_path)))["step"] == 15
    (tmp_path / "latest").unlink()
    assert find_latest(str(tmp_path)).endswith("checkpoint_00000015.pt")
    assert find_latest(str(tmp_path / "nothing")) is None


def test_the_folder_is_synced_after_each_rename_and_before_old_checkpoints_go(tmp_path, monkeypatch):
    import stat
    events, real_fsync, real_replace, real_remove = [], os.fsync, os.replace, os.remove
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        ("fsync-folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                     real_replace(a, b)))
    monkeypatch.setattr(os, "remove", lambda p: (events.append(("remove", os.path.basename(p))), real_remove(p)))
    save_checkpoint({"step": 1}, str(tmp_path), keep=1)
    events.clear()
    save_checkpoint({"step": 2}, str(tmp_path), keep=1)
    assert events == ["fsync-file", ("replace", "checkpoint_00000002.pt"), "fsync-folder",
                      "fsync-file", ("replace", "latest"), "fsync-folder",
                      ("remove", "checkpoint_00000001.pt")]


def test_checkpoints_get_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o027)
    try:
        path = save_checkpoint({"step": 1}, str(tmp_path))
    finally:
        os.umask(previous)
    assert [os.stat(p).st_mode & 0o777 for p in (path, tmp_path / "latest")] == [0o640, 0o640]  # not 0600


def test_cli_flags_override_yaml_which_overrides_the_preset(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"queue_size": 128, "epochs": 3, "bf16": False}))
    args = build_parser().parse_args(["pretrain", "--preset", "demo", "--config", str(tmp_path / "c.yaml"),
                                      "--epochs", "7", "--anchor-ratios", "1", "2", "--no-shuffle-bn"])
    cfg = config_from_args(args)
    assert (cfg.queue_size, cfg.epochs, cfg.bf16, cfg.shuffle_bn) == (128, 7, False, False)
    assert cfg.anchor_ratios == [1.0, 2.0] and cfg.depth == demo().depth == 18
    assert cfg.out_dir == ""  # resolved when the run starts (default_out_dir), not written by --print-config
    recipe = config_from_args(build_parser().parse_args(["pretrain", "--preset", "insloc-r50-fpn"]))
    assert (recipe.queue_size, recipe.momentum, recipe.temperature, recipe.image_size) == (65536, 0.999, 0.2, 256)
    assert (recipe.batch_size, recipe.epochs, recipe.lr, recipe.lr_batch) == (32, 200, 0.03, 256)
    # the official model: BatchNorm in the FPN and the head, the head's mmcv initialisation, Nesterov SGD
    assert (recipe.fpn_norm, recipe.head_norm, recipe.head_init, recipe.nesterov) == ("bn", "bn", "official", True)
    moco = config_from_args(build_parser().parse_args(["pretrain", "--preset", "moco-r50"]))
    # MoCo v2's main_moco.py: RandomResizedCrop(224, scale=(0.2, 1)) with its default ratios, no Nesterov
    assert (moco.image_size, moco.crop_scale, moco.crop_ratio, moco.nesterov) == (224, [0.2, 1.0], [3 / 4, 4 / 3],
                                                                                   False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--arch", "c5"])
    # An optional number: absent is the preset's None, "none" is None, YAML null too.
    assert recipe.anchor_nms_iou is None
    nms = config_from_args(build_parser().parse_args(["pretrain", "--anchor-nms-iou", "0.7"]))
    assert nms.anchor_nms_iou == 0.7
    (tmp_path / "n.yaml").write_text(yaml.safe_dump({"anchor_nms_iou": 0.7}))
    off = config_from_args(build_parser().parse_args(["pretrain", "--config", str(tmp_path / "n.yaml"),
                                                      "--anchor-nms-iou", "None"]))
    assert off.anchor_nms_iou is None
    assert config_from_args(build_parser().parse_args(["pretrain", "--config", str(tmp_path / "n.yaml")])
                            ).anchor_nms_iou == 0.7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--anchor-nms-iou", "high"])


def test_the_recipe_preset_holds_every_number_of_the_recipe():
    # the recipe (the official code's numbers) is the spec: a default changed by mistake would train another recipe
    cfg = insloc.config.insloc_r50_fpn()
    assert cfg == Config(name="insloc-r50-fpn")  # the recipe is the defaults
    # pretext data
    assert (cfg.image_size, cfg.crop_scale, cfg.crop_ratio, cfg.paste_size) == (256, [0.2, 1.0], [0.5, 2.0], [128, 255])
    # box augmentation: one stride-16 grid, 4 sizes x 5 ratios (5,120 anchors on 256 x 256), IoU > 0.5, uniform pick
    assert (cfg.anchor_stride, cfg.anchor_sizes, cfg.anchor_ratios) == (16, [32.0, 64.0, 128.0, 256.0],
                                                                         [0.5, 0.75, 1.0, 1.5, 2.0])
    assert (cfg.anchor_iou, cfg.anchor_nms_iou) == (0.5, None)
    # R50-FPN: FPN 256, RoIAlign 7x7, fc 1024, D 128, BatchNorm (not SyncBN), the official head
    assert (cfg.method, cfg.arch, cfg.depth, cfg.fpn_channels, cfg.fpn_roi_size, cfg.head_fc_dim, cfg.dim) == \
        ("insloc", "fpn", 50, 256, 7, 1024, 128)
    assert (cfg.head_norm, cfg.fpn_norm, cfg.head_init) == ("bn", "bn", "official")
    # R50-C4: RoIAlign 14x14 on res4
    assert insloc.config.insloc_r50_c4().c4_roi_size == 14 and insloc.config.insloc_r50_c4().arch == "c4"
    # MoCo: K 65,536, m 0.999, T 0.2, shuffle-BN
    assert (cfg.queue_size, cfg.momentum, cfg.temperature, cfg.shuffle_bn) == (65536, 0.999, 0.2, True)
    # SGD lr 0.03 per 256, 32 per GPU, momentum 0.9, weight decay 1e-4, Nesterov, 200 epochs
    assert (cfg.lr, cfg.lr_batch, cfg.batch_size, cfg.sgd_momentum, cfg.weight_decay, cfg.nesterov, cfg.epochs) == \
        (0.03, 256, 32, 0.9, 1e-4, True, 200)
    from insloc_ops import grid_anchors
    anchors = grid_anchors(math.ceil(cfg.image_size / cfg.anchor_stride), cfg.anchor_stride, cfg.anchor_sizes,
                           cfg.anchor_ratios)
    assert anchors.shape == (5120, 4)
    model = insloc.train.build_model(dataclasses.replace(cfg, depth=18, queue_size=8))
    assert model.jittered_groups == (3,) and model.num_groups == 4  # P5 only pools the augmented box


def test_a_training_step_descends_the_sum_of_the_level_losses_with_the_configured_sgd(tmp_path, monkeypatch):
    # The optimizer must see the gradient of the levels' losses summed (weights 1), not their mean, and use
    # the configured SGD (weight decay, momentum, Nesterov) at the cosine schedule's learning rate.
    from insloc.moco import MoCo
    real_forward, wanted, seen = MoCo.forward, [], []

    def forward(self, *args, **kw):
        out = real_forward(self, *args, **kw)
        params = list(self.encoder_q.parameters())
        wanted.append(torch.autograd.grad(out[0].sum(), params, retain_graph=True, allow_unused=True))
        return out

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            group, = self.param_groups
            seen.append(([None if p.grad is None else p.grad.clone() for p in group["params"]], group["lr"]))
            return super().step(closure)

    monkeypatch.setattr(MoCo, "forward", forward)
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    cfg = tiny(tmp_path, samples_per_epoch=2, epochs=2, weight_decay=3e-4, sgd_momentum=0.8, lr=0.05, lr_batch=4)
    assert train(cfg)["step"] == 2
    assert len(wanted) == len(seen) == 2
    for want, (got, _) in zip(wanted, seen):
        assert sum(g is not None for g in got) > 10
        for w, g in zip(want, got):
            assert (w is None) == (g is None)
            if g is not None:
                torch.testing.assert_close(g, w)
    assert [lr for _, lr in seen] == pytest.approx([0.025, 0.0125])  # 0.05 x 2 / 4, then cosine at epoch 1 of 2
    group = load_checkpoint(find_latest(str(tmp_path)))["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (3e-4, 0.8, True)
    assert group["lr"] == pytest.approx(0.0125)


def test_the_trainer_feeds_the_samples_views_and_boxes_and_each_rank_draws_its_own_anchors(tmp_path, monkeypatch):
    # The first step's forward gets the sampler's first batch: im_q/boxes_q and im_k/boxes_k of each sample
    # (not the query's boxes for the key), the official anchor choice made from the query's boxes, and a box
    # generator seeded per rank (equal seeds would give every process the same anchor draws).
    from insloc.data import EpochSampler, normalize
    from insloc.moco import MoCo, rois_from_boxes
    from torchvision.ops import box_iou
    real_forward, calls = MoCo.forward, []

    def forward(self, im_q, boxes_q, im_k, boxes_k, generator=None, rois_q=None):
        calls.append(dict(im_q=im_q.clone(), boxes_q=boxes_q.clone(), im_k=im_k.clone(), boxes_k=boxes_k.clone(),
                          rois_q=rois_q.clone(), seed=generator.initial_seed()))
        return real_forward(self, im_q, boxes_q, im_k, boxes_k, generator=generator, rois_q=rois_q)

    monkeypatch.setattr(MoCo, "forward", forward)
    cfg = tiny(tmp_path / "rank0", anchor_nms_iou=0.7)
    train(cfg, interrupt_after_step=1)
    first = calls[0]
    dataset = insloc.train.build_dataset(cfg)
    samples = [dataset[key] for key in list(EpochSampler(len(dataset), 2, cfg.seed))[:2]]
    for name in ("boxes_q", "boxes_k"):
        assert torch.equal(first[name], torch.stack([s[name] for s in samples]))
    for name in ("im_q", "im_k"):
        assert torch.equal(first[name], normalize(torch.stack([s[name] for s in samples])))
    assert not torch.equal(first["boxes_q"], first["boxes_k"])
    rois = first["rois_q"]  # [4, 2, 5]: P2-P4 the query's boxes, P5 an anchor around each of them
    for level in range(3):
        assert torch.equal(rois[level], rois_from_boxes(first["boxes_q"]))
    assert (box_iou(rois[3, :, 1:], first["boxes_q"]).diagonal() > 0.5).all()
    # The second process's seeds: rank 1 of a world of one (it writes nothing, as a rank other than 0).
    monkeypatch.setattr(insloc.train, "setup_distributed", lambda cfg: (1, 1, torch.device("cpu")))
    train(tiny(tmp_path / "rank1", anchor_nms_iou=0.7), interrupt_after_step=1)
    assert calls[-1]["seed"] != first["seed"]


def test_a_rank_left_in_the_environment_of_a_one_process_run_is_ignored(tmp_path, monkeypatch):
    # RANK=3 without WORLD_SIZE (a cluster shell, a leftover export) made the run rank 3 of one process, which
    # writes no checkpoint and no log.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert insloc.train.setup_distributed(tiny(tmp_path, device="cpu"))[:2] == (0, 1)
    train(tiny(tmp_path, epochs=1))
    assert find_latest(str(tmp_path)) is not None


def _two_process_resume_worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    try:
        train(tiny(os.path.join(root, "straight"), batch_size=4, samples_per_epoch=16))
        # a checkpoint mid-epoch 2 (steps 1-2 are epoch 1), then a crash after step 3, then --resume auto
        interrupted = tiny(os.path.join(root, "resumed"), batch_size=4, samples_per_epoch=16, checkpoint_every=1)
        train(interrupted, interrupt_after_step=3)
        train(tiny(os.path.join(root, "resumed"), batch_size=4, samples_per_epoch=16, resume="auto"))
    finally:
        dist.barrier()  # both ranks leave together (see test_moco's shuffle-BN test)


@pytest.mark.slow
def test_a_resumed_two_process_run_reproduces_the_uninterrupted_one(tmp_path):
    # Shuffle-BN permutes the key images with torch's generator; the DataLoader must not draw from it (it
    # draws its workers' base seed when an iterator is made, at a different point in a resumed run).
    run_processes(_two_process_resume_worker, (free_port(), str(tmp_path)), nprocs=2, timeout_s=600)
    assert load_checkpoint(find_latest(str(tmp_path / "straight")))["world_size"] == 2
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_resuming_into_another_architecture_is_refused_naming_the_flag(tmp_path):
    train(tiny(tmp_path, epochs=1, fpn_norm="none", nesterov=False))
    saved = load_checkpoint(find_latest(str(tmp_path)))
    assert saved["optimizer"]["param_groups"][0]["nesterov"] is False
    with pytest.raises(ValueError, match=r"--resume.*--fpn-norm \(fpn_norm\): 'none' in the checkpoint, 'bn' here"):
        train(tiny(tmp_path, epochs=2, fpn_norm="bn", resume="auto"))
    with pytest.raises(ValueError, match=r"--queue-size \(queue_size\): 16 in the checkpoint, 32 here"):
        train(tiny(tmp_path, epochs=2, fpn_norm="none", queue_size=32, resume="auto"))
    # a checkpoint written before fpn_norm existed had an FPN without norm
    del saved["config"]["fpn_norm"]
    torch.save(saved, tmp_path / "old.pt")
    summary = train(tiny(tmp_path, epochs=2, fpn_norm="none", nesterov=False, resume=str(tmp_path / "old.pt")))
    assert summary["step"] == 4


def test_fields_that_do_not_shape_the_encoder_do_not_block_a_resume(tmp_path):
    # a C4 run written before fpn_norm existed (so 'none' by ADDED_FIELDS) resumes under today's default 'bn'
    train(tiny(tmp_path, arch="c4", epochs=1, fpn_norm="none"))
    saved = load_checkpoint(find_latest(str(tmp_path)))
    del saved["config"]["fpn_norm"]
    saved["config"]["fpn_channels"] = 999
    torch.save(saved, tmp_path / "checkpoint_00000002.pt")
    assert train(tiny(tmp_path, arch="c4", epochs=2, resume="auto"))["step"] == 4
    with pytest.raises(UsageError, match=r"--c4-roi-size \(c4_roi_size\): 14 in the checkpoint, 7 here"):
        train(tiny(tmp_path, arch="c4", epochs=3, c4_roi_size=7, resume="auto"))
    assert insloc.config.architecture_fields("moco", "fpn") == ("method", "depth", "dim")


def test_an_interrupt_at_the_end_of_an_epoch_stops_there(tmp_path):
    summary = train(tiny(tmp_path), interrupt_after_step=2)  # 2 steps per epoch
    assert summary == {"step": 2, "interrupted": True, "out_dir": str(tmp_path)}
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint_00000002.pt"]


def test_rows_logged_before_a_checkpoint_survive_a_crash_after_it(tmp_path, monkeypatch):
    # log every 4 steps, checkpoint every 3: a crash in step 4 comes before that step's log line
    cfg = tiny(tmp_path, samples_per_epoch=12, epochs=1, log_every=4, checkpoint_every=3)
    real_lr = insloc.train.cosine_lr

    def crash_in_step_4(step, *args):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real_lr(step, *args)

    monkeypatch.setattr(insloc.train, "cosine_lr", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    monkeypatch.setattr(insloc.train, "cosine_lr", real_lr)
    train(tiny(tmp_path, samples_per_epoch=12, epochs=1, log_every=4, checkpoint_every=3, resume="auto"))
    assert losses(tmp_path)[0] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_just_written_is_kept_and_named_latest(tmp_path):
    # checkpoints at higher steps (the run before a run resumed from an older checkpoint) stay, one of the same
    # step is kept aside, and the retention never deletes what it just wrote
    for step in (2, 4, 6, 8):
        save_checkpoint({"step": step}, str(tmp_path), keep=2)
    save_checkpoint({"step": 2, "run": "new"}, str(tmp_path), keep=2)
    assert find_latest(str(tmp_path)).endswith("checkpoint_00000002.pt")
    save_checkpoint({"step": 4, "run": "new"}, str(tmp_path), keep=2)
    with pytest.warns(UserWarning, match="superseded-1"):
        save_checkpoint({"step": 6, "run": "new"}, str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == \
        ["checkpoint_00000004.pt", "checkpoint_00000006.pt", "checkpoint_00000008.pt"]
    latest = load_checkpoint(find_latest(str(tmp_path)))
    assert (latest["step"], latest["run"]) == (6, "new")
    assert load_checkpoint(str(tmp_path / "checkpoint_00000006.superseded-1.pt")) == {"step": 6}
    with pytest.warns(UserWarning, match="superseded-2"):
        save_checkpoint({"step": 6, "run": "newer"}, str(tmp_path), keep=2)
    assert load_checkpoint(str(tmp_path / "checkpoint_00000006.superseded-2.pt"))["run"] == "new"


def test_a_fresh_run_in_a_used_folder_is_refused_and_no_checkpoint_is_ever_overwritten(tmp_path):
    train(tiny(tmp_path, epochs=4))  # checkpoints 6 and 8
    before = {p: open(p, "rb").read() for p in list_checkpoints(str(tmp_path))}
    with pytest.raises(UsageError, match=r"--out-dir .*checkpoint_00000008.pt.*--resume auto"):
        train(tiny(tmp_path, epochs=4, seed=5))
    # Resumed from the older one on purpose: the later one is kept aside when this run reaches its step.
    with pytest.warns(UserWarning, match="past step 6"):
        summary = train(tiny(tmp_path, epochs=4, resume=str(tmp_path / "checkpoint_00000006.pt")))
    assert summary["step"] == 8
    assert open(tmp_path / "checkpoint_00000008.superseded-1.pt", "rb").read() == before[
        str(tmp_path / "checkpoint_00000008.pt")]
    assert find_latest(str(tmp_path)).endswith("checkpoint_00000008.pt")


def test_a_killed_runs_unfinished_checkpoint_file_is_removed_at_the_next_start(tmp_path, capsys):
    train(tiny(tmp_path))
    stale, live = tmp_path / ".tmp_checkpoint_00000006.ptx8a2", tmp_path / ".tmp_checkpoint_00000008.ptq1w9"
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")  # by another process, as far as this run can tell: left alone
    os.utime(stale, (stale.stat().st_atime - 600, stale.stat().st_mtime - 600))
    train(tiny(tmp_path, epochs=3, resume="auto"))
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().out
    assert live.exists()


def test_a_fresh_run_without_out_dir_never_writes_into_a_folder_of_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fresh = config_from_args(build_parser().parse_args(["pretrain", "--preset", "demo"]))
    assert default_out_dir(fresh) == os.path.join("runs", "demo")
    save_checkpoint({"step": 2}, os.path.join("runs", "demo"))
    save_checkpoint({"step": 2}, os.path.join("runs", "demo-2"))
    assert default_out_dir(fresh) == os.path.join("runs", "demo-3")
    resumed = config_from_args(build_parser().parse_args(["pretrain", "--preset", "demo", "--resume", "auto"]))
    assert default_out_dir(resumed) == os.path.join("runs", "demo")

    def resuming(path):
        return default_out_dir(config_from_args(build_parser().parse_args(["pretrain", "--preset", "demo",
                                                                           "--resume", path])))
    # a run's folder, its latest file or one of its checkpoints: that run continues where it is (it went to
    # runs/demo, another run's folder, and pruned its checkpoints)
    other = os.path.join("runs", "demo-2")
    assert resuming(other) == other
    assert resuming(os.path.join(other, "latest")) == other
    assert resuming(os.path.join(other, "checkpoint_00000002.pt")) == other
    # a file of another name (a copy, a download) starts a folder of its own, as a fresh run does
    shutil.copy(os.path.join(other, "checkpoint_00000002.pt"), "copy.pt")
    assert resuming("copy.pt") == os.path.join("runs", "demo-3")


def test_resuming_into_a_folder_of_another_runs_checkpoints_or_from_an_export_is_refused(tmp_path):
    from insloc.export import export
    train(tiny(tmp_path / "a", epochs=1))  # checkpoint_2
    train(tiny(tmp_path / "b", epochs=1))
    before = sorted(os.listdir(tmp_path / "a"))
    with pytest.raises(UsageError, match=r"--out-dir \(out_dir\): .*a holds checkpoints of another run than "
                                         r".*b.checkpoint_00000002.pt .*continue in that checkpoint's folder"):
        train(tiny(tmp_path / "a", epochs=2, resume=str(tmp_path / "b")))
    assert sorted(os.listdir(tmp_path / "a")) == before
    # into its own folder, or an empty one, it continues
    assert train(tiny(tmp_path / "b", epochs=2, resume=str(tmp_path / "b" / "latest")))["step"] == 4
    assert train(tiny(tmp_path / "c", epochs=2, resume=str(tmp_path / "a")))["step"] == 4
    export(tmp_path / "a", "raw", tmp_path / "raw.pt")
    export(tmp_path / "a", "torchvision", tmp_path / "tv.pth")
    for exported, lacking in (("raw.pt", "'model', 'optimizer', 'step_in_epoch', 'rng'"),
                              ("tv.pth", "'model', 'optimizer', 'epoch', 'step_in_epoch', 'step', 'rng'")):
        with pytest.raises(UsageError, match=rf"--resume \(resume\): .*{exported} is not a checkpoint of insloc "
                                             rf"pretrain \(it has no {lacking}\)"):
            train(tiny(tmp_path / "d", epochs=2, resume=str(tmp_path / exported)))
    assert not (tmp_path / "d").exists()


def test_a_printed_config_runs_where_its_preset_would(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--preset", "demo", "--print-config"]) == 0
    (tmp_path / "my.yaml").write_text(capsys.readouterr().out)
    from_yaml = config_from_args(build_parser().parse_args(["pretrain", "--config", "my.yaml"]))
    assert from_yaml.name == "demo" and default_out_dir(from_yaml) == os.path.join("runs", "demo")
    named = config_from_args(build_parser().parse_args(["pretrain", "--preset", "demo", "--name", "r18-try"]))
    assert default_out_dir(named) == os.path.join("runs", "r18-try")
    assert {p().name for p in insloc.config.PRESETS.values()} == set(insloc.config.PRESETS)
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match=r"--name \(name\) must be a folder name"):
            dataclasses.replace(demo(), name=bad).validate()


def test_without_hard_links_a_full_disk_leaves_no_partial_copy_of_the_kept_checkpoint(tmp_path, monkeypatch):
    save_checkpoint({"step": 8, "run": "old", "pad": torch.zeros(1 << 18)}, str(tmp_path))

    def no_link(src, dst):
        raise OSError(1, "Operation not permitted")

    def half_then_full(source, target, length=0):
        target.write(source.read(1000))
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfileobj", half_then_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 8, "run": "new"}, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000008.pt", "latest"]  # no partial superseded-1
    assert load_checkpoint(str(tmp_path / "checkpoint_00000008.pt"))["run"] == "old"
    monkeypatch.undo()
    monkeypatch.setattr(os, "link", no_link)
    with pytest.warns(UserWarning, match="superseded-1"):
        save_checkpoint({"step": 8, "run": "new"}, str(tmp_path))
    assert load_checkpoint(str(tmp_path / "checkpoint_00000008.superseded-1.pt"))["run"] == "old"
    assert load_checkpoint(str(tmp_path / "checkpoint_00000008.pt"))["run"] == "new"


def test_a_checkpoint_is_never_missing_while_its_predecessor_is_kept_aside(tmp_path, monkeypatch):
    save_checkpoint({"step": 8, "run": "old"}, str(tmp_path))

    def full_disk(state, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.warns(UserWarning, match="superseded-1"), pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 8, "run": "new"}, str(tmp_path))
    assert load_checkpoint(str(tmp_path / "checkpoint_00000008.pt"))["run"] == "old"  # still there


def test_an_unreadable_newest_checkpoint_is_named_and_the_one_before_used(tmp_path):
    train(tiny(tmp_path))  # checkpoints 2 and 4
    newest = tmp_path / "checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(UsageError, match="--resume .*cannot read checkpoint .*checkpoint_00000004.pt"):
        train(tiny(tmp_path, epochs=3, resume=str(newest)))
    with pytest.warns(UserWarning, match="cannot read checkpoint .*checkpoint_00000004.pt"):
        summary = train(tiny(tmp_path, epochs=3, resume="auto"))
    assert summary["step"] == 6 and losses(tmp_path)[0] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(UsageError, match="--resume"):
        train(tiny(tmp_path, resume=str(tmp_path / "missing.pt")))


@pytest.mark.parametrize("field, value, message", [
    ("momentum", 1.5, r"--momentum \(momentum\) must be in \[0, 1\]"),
    ("crop_scale", [1.0, 0.2], "--crop-scale"),
    ("log_every", 0, "--log-every"),
    ("batch_size", 0, "--batch-size"),
    ("paste_size", [40], "--paste-size"),
    ("image_size", 16, "--paste-size .* image_size"),
    ("epochs", 1.5, "--epochs .* an integer"),
    ("temperature", 0.0, "--temperature"),
    ("temperature", float("inf"), "--temperature"),
    ("seed", -1, r"--seed \(seed\) must be in \[0, 2\*\*31\)"),
    ("anchor_nms_iou", 2.0, "--anchor-nms-iou"),
    ("arch", "c5", "--arch"),
])
def test_bad_config_values_are_refused_naming_the_flag(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train(tiny(tmp_path, **{field: value}))
    assert not os.path.exists(tmp_path / "metrics.csv")


def test_a_queue_smaller_than_the_global_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--queue-size .* global batch 2"):
        train(tiny(tmp_path, queue_size=1))


def test_yaml_numbers_are_converted_and_bad_values_exit_with_the_flag(tmp_path, capsys):
    # PyYAML reads 1e-4 (no dot) as a string
    (tmp_path / "c.yaml").write_text("weight_decay: 1e-4\nlr: 3e-2\nmomentum: 1\nanchor_nms_iou: none\n")
    cfg = config_from_args(build_parser().parse_args(["pretrain", "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.weight_decay, cfg.lr, cfg.momentum, cfg.anchor_nms_iou) == (1e-4, 0.03, 1.0, None)
    assert isinstance(cfg.momentum, float)
    (tmp_path / "bad.yaml").write_text("shuffle_bn: 'no'\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(tmp_path / "bad.yaml"), "--print-config"])
    assert exit_info.value.code == 2 and "--shuffle-bn (shuffle_bn) must be true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--preset", "demo", "--paste-size", "200", "100", "--print-config"])
    assert "--paste-size" in capsys.readouterr().err


def test_a_missing_or_malformed_config_file_exits_with_an_error_naming_config(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "unknown.yaml").write_text("warp: 3\n")
    for name, message in [("missing.yaml", "cannot read it"), ("broken.yaml", r"not valid YAML \(line 2"),
                          ("list.yaml", "expected a mapping"), ("unknown.yaml", r"unknown config keys: \['warp'\]")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "--config", str(tmp_path / name), "--print-config"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert re.search(rf"error: --config \S*{name}: {message}", err), err


@pytest.mark.slow
def test_demo_setting_learns_loss_falls_once_the_queue_is_full(tmp_path):
    # The demo preset, shortened to 3 epochs of 20 steps: its loss must fall after the queue is full
    # (the failure this guards against is the embedding collapse seen with a normalised box head,
    # where the loss climbs back to log(K + 1)).
    cfg = demo()
    cfg.epochs, cfg.num_workers, cfg.out_dir, cfg.plot, cfg.log_every = 3, 0, str(tmp_path), False, 20
    summary = train(cfg)
    means = list(summary["epoch_mean_loss"].values())  # per epoch, steps after the queue first filled
    assert len(means) == 3
    assert means[-1] < means[0] - 0.2, means


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], r"--device \(device\): cuda asked for, but torch sees no CUDA GPU"),
    (["--device", "foo"], r"--device \(device\) must be auto, cpu, cuda or cuda:N"),
    (["--queue-size", "4"], r"--queue-size \(queue_size\) must be at least the global batch 8"),
    (["--samples-per-epoch", "4"], r"raise --samples-per-epoch"),
    (["--data", "/nonexistent/images"], r"--data \(data\): data source '/nonexistent/images'"),
    (["--data", "EMPTY"], r"--data \(data\): no images found"),
    (["--data", "BINARY"], r"--data \(data\): data source .*image.jpg' is a file but not a UTF-8 text file"),
    (["--resume", "/nonexistent.pt"], r"--resume \(resume\): no checkpoint file /nonexistent.pt"),
])
def test_values_checked_at_the_start_of_a_run_exit_as_bad_flags_before_anything_is_written(tmp_path, capsys,
                                                                                           flags, message):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("checks the message on a machine without a GPU")
    (tmp_path / "empty").mkdir()
    (tmp_path / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0 one image file, not a list of them")
    flags = [str(tmp_path / "empty") if f == "EMPTY" else str(tmp_path / "image.jpg") if f == "BINARY" else f
             for f in flags]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--preset", "demo", "--batch-size", "8", "--samples-per-epoch", "16",
              "--out-dir", str(out)] + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and "usage: insloc pretrain" in err
    assert re.search(message, err), err
    assert not out.exists()


# ---- resuming with another global batch (batch_size x processes) or another number of processes ----

def test_resume_position_renumbers_or_refuses_a_checkpoint_of_another_global_batch():
    from insloc.train import resume_position

    ckpt = {"epoch": 1, "step_in_epoch": 2, "step": 6, "global_batch": 4, "epoch_samples": 16, "world_size": 1,
            "steps_per_epoch": 4}
    assert resume_position(ckpt, 4, 16, 4, "c.pt") == (1, 2, 6, "", None)  # same run shape: as written
    epoch, in_epoch, step, note, renumber = resume_position(ckpt, 8, 16, 2, "c.pt")  # 8 done = 1 batch of 8
    assert (epoch, in_epoch, step) == (1, 1, 3) and "step 6 is step 3 here" in note
    # the checkpoint's metrics rows (step, epoch) in the new numbering: epoch 1 was steps 1-4, now 1-2
    assert [renumber(s, e) for s, e in ((1, 0), (2, 0), (4, 0), (5, 1), (6, 1))] == [0, 1, 2, 2, 3]
    assert resume_position(ckpt, 2, 16, 8, "c.pt")[:3] == (1, 4, 12)  # fewer processes: 8 samples = 4 of 2
    with pytest.raises(UsageError, match=r"--resume .*after 8 of 16 samples at a global batch of 4.* 3 and 16"):
        resume_position(ckpt, 3, 16, 5, "c.pt")  # 8 samples are not whole batches of 3
    with pytest.raises(UsageError, match="stopped mid-epoch"):
        resume_position(ckpt, 4, 20, 5, "c.pt")  # another epoch length: another order of samples
    boundary = {**ckpt, "step_in_epoch": 0, "step": 4}
    assert resume_position(boundary, 3, 20, 6, "c.pt")[:3] == (1, 0, 6)  # an epoch boundary: always
    older = {k: v for k, v in ckpt.items() if k not in ("global_batch", "epoch_samples", "steps_per_epoch")}
    older["config"], older["world_size"] = {"batch_size": 2}, 2  # a checkpoint of before these fields
    assert resume_position(older, 4, 16, 4, "c.pt") == (1, 2, 6, "", None)
    # ... at an epoch boundary with another epoch length: renumbered (its steps per epoch from its step count)
    older_boundary = {**older, "step_in_epoch": 0, "step": 4}
    epoch, in_epoch, step, _, renumber = resume_position(older_boundary, 4, 32, 8, "c.pt")
    assert (epoch, in_epoch, step) == (1, 0, 8) and renumber(4, 0) == 4


def lrs(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def test_a_run_resumed_with_another_batch_size_continues_the_epoch_and_its_schedule(tmp_path):
    interrupted = tiny(tmp_path, batch_size=4, samples_per_epoch=8, checkpoint_every=1)
    train(interrupted, interrupt_after_step=1)  # 4 of epoch 1's 8 samples done
    summary = train(tiny(tmp_path, batch_size=2, samples_per_epoch=8, resume="auto"))
    assert summary["step"] == 8  # 4 steps of 2 an epoch: epoch 1's last 2, then epoch 2's 4
    lr = lrs(tmp_path)
    base = Config().lr * 2 / Config().lr_batch
    assert sorted(lr) == [2, 3, 4, 5, 6, 7, 8]  # the first run's step 1 (4 samples) is step 2 of batch 2
    assert [lr[s] for s in (3, 4)] == pytest.approx([base] * 2, rel=1e-5) and \
        [lr[s] for s in (5, 6, 7, 8)] == pytest.approx([base / 2] * 4, rel=1e-5)  # by epoch: epoch 2 of 2 at half
    ckpt = load_checkpoint(find_latest(str(tmp_path)))
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_batch"], ckpt["epoch_samples"]) == (2, 8, 2, 8)


def test_metrics_rows_of_the_checkpoint_are_kept_in_the_new_numbering_and_undone_ones_dropped(tmp_path):
    # batch 4, 16 samples an epoch: 4 steps an epoch; checkpoint at step 2, a crash after step 3 (undone work)
    train(tiny(tmp_path, batch_size=4, samples_per_epoch=16, checkpoint_every=2), interrupt_after_step=3)
    train(tiny(tmp_path, batch_size=2, samples_per_epoch=16, epochs=1, resume="auto"))  # 8 steps an epoch
    steps, _ = losses(tmp_path)
    # the checkpoint's steps 1-2 (4 and 8 samples) are steps 2 and 4 now; old step 3 is gone; then 5-8
    assert steps == [2, 4, 5, 6, 7, 8]


def test_a_mid_epoch_resume_that_cannot_continue_the_epoch_is_refused_before_anything_is_written(tmp_path):
    train(tiny(tmp_path, batch_size=4, samples_per_epoch=8, checkpoint_every=1), interrupt_after_step=1)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UsageError, match="cannot continue that epoch"):
        train(tiny(tmp_path, batch_size=3, samples_per_epoch=8, resume="auto"))
    assert sorted(os.listdir(tmp_path)) == before


def test_cuda_rng_state_is_this_gpus_and_an_older_checkpoints_list_is_indexed(monkeypatch):
    from insloc import checkpoint

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([int(torch.device("cuda", device)
                                                                                      .index)]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state), device)))
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([1]))  # the current GPU's only
    checkpoint.set_rng_state(state, torch.device("cuda", 3))
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([10]), torch.tensor([11])]})  # older: one per GPU
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([10])]}, torch.device("cuda", 1))  # fewer GPUs then
    assert calls == [(1, 3), (11, 1)]


def _two_process_failed_checkpoint_worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    insloc.train.save_checkpoint = full_disk
    try:
        train(tiny(os.path.join(root, "run"), batch_size=2, samples_per_epoch=8))
        outcome = "finished"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.barrier()


@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_write_stops_every_process_with_its_error(tmp_path):
    run_processes(_two_process_failed_checkpoint_worker, (free_port(), str(tmp_path)), nprocs=2, timeout_s=300)
    assert (tmp_path / "rank0.txt").read_text() == "OSError: [Errno 28] No space left on device"
    assert (tmp_path / "rank1.txt").read_text() == \
        "RuntimeError: rank 0 could not write the checkpoint of step 2: OSError: [Errno 28] No space left on device"


def _two_process_resume_problem_worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    # rank 1 cannot see the checkpoint rank 0 resumes from (as on another machine without a shared folder)
    resume = os.path.join(root, "seed", "checkpoint_00000002.pt") if rank == 0 else os.path.join(root, "nope.pt")
    try:
        train(tiny(os.path.join(root, "run"), batch_size=2, samples_per_epoch=8, resume=resume))
        outcome = "finished"
    except UsageError as e:
        outcome = str(e)
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.barrier()


@pytest.mark.slow
def test_a_resume_problem_of_one_process_stops_every_process_without_a_hang(tmp_path):
    train(tiny(tmp_path / "seed", batch_size=4, samples_per_epoch=8, epochs=1))
    run_processes(_two_process_resume_problem_worker, (free_port(), str(tmp_path)), nprocs=2, timeout_s=300)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == \
            f"--resume (resume): no checkpoint file {tmp_path / 'nope.pt'}" + (" (on rank 1)" if rank == 0 else "")


def _two_process_data_worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    outcomes = []
    # each process lists its own copy of the data (node-local disks): rank 1's copy lacks a file, then
    # has another in its place, then is not there at all
    for copy in ("full", "short", "renamed", "absent"):
        data = os.path.join(root, "full" if rank == 0 else copy)
        try:
            train(tiny(os.path.join(root, f"run_{copy}"), batch_size=2, samples_per_epoch=0, epochs=1, data=data))
            outcomes.append("finished")
        except UsageError as e:
            outcomes.append(str(e))
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(outcomes))
    dist.barrier()


@pytest.mark.slow
def test_processes_that_list_different_images_stop_together_naming_the_flag(tmp_path):
    rng = np.random.default_rng(0)
    # 8 images make 2 steps of 2 x 2 an epoch, 4 make 1: rank 0 would wait forever for rank 1's second step
    for name, files in (("full", "abcdefgh"), ("short", "abcd"), ("renamed", "abcdefgi")):
        (tmp_path / name).mkdir()
        for f in files:
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(tmp_path / name / f"{f}.png")
    run_processes(_two_process_data_worker, (free_port(), str(tmp_path)), nprocs=2, timeout_s=300)
    for rank in (0, 1):
        full, short, renamed, absent = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert full == "finished"  # the same images on both
        assert short == "--data (data): the processes list different images ([8, 4] images, by rank): every " \
            "process must see the same files at the same place (one shared folder, or identical copies)"
        assert renamed == "--data (data): the processes list different images ([8, 8] images, by rank; the " \
            "same number, other files): every process must see the same files at the same place (one shared " \
            "folder, or identical copies)"
        assert absent.startswith("--data (data): data source") and "is not 'builtin', a folder or a list file" in \
            absent and absent.endswith(" (on rank 1)" if rank == 0 else "list file")
    assert (tmp_path / "run_full" / "metrics.csv").exists()


def test_ddp_wrapping_keeps_buffers_per_process_without_a_deprecation_warning(monkeypatch):
    import warnings

    from torch.nn.parallel import DistributedDataParallel
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        module = torch.nn.BatchNorm1d(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = DistributedDataParallel(module, **insloc.train._no_buffer_sync())
        assert not [w for w in caught if "buffers" in str(w.message)], [str(w.message) for w in caught]
        assert ddp.require_forward_param_sync
        # no buffer broadcast at each forward (each process keeps its own BatchNorm statistics)
        sync = getattr(ddp, "forward_sync_buffers", None)
        assert sync is False or (sync is None and ddp.broadcast_buffers is False)
    finally:
        dist.destroy_process_group()


def test_start_problems_are_usage_errors_before_the_output_folder_is_made(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(UsageError, match=r"--out-dir \(out_dir\): .*afile is a file, not a folder"):
        train(tiny(afile))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    (tmp_path / "list.txt").write_text("corrupt.jpg\n")
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"--data \(data\): none of its first 1 images can be read .*corrupt.jpg"):
        train(tiny(out, data=str(tmp_path / "list.txt")))
    for backend, message in [("gpu", "INSLOC_OPS_BACKEND must be one of"), ("cuda", "INSLOC_OPS_BACKEND='cuda' is "
                                                                                   "not available")]:
        monkeypatch.setenv("INSLOC_OPS_BACKEND", backend)
        with pytest.raises(UsageError, match=message):
            train(tiny(out, device="cpu"))
    assert not out.exists()


def test_resume_takes_a_run_folder_or_its_latest_file_and_refuses_fewer_epochs_than_done(tmp_path):
    train(tiny(tmp_path, epochs=2))  # checkpoints at steps 2 and 4 (epochs 1 and 2 done)
    for where in (tmp_path, tmp_path / "latest"):
        summary = train(tiny(tmp_path / "next", epochs=3, resume=str(where), keep_checkpoints=9))
        assert summary["step"] == 6 and os.path.isfile(tmp_path / "next" / "checkpoint_00000006.pt")
        os.remove(tmp_path / "next" / "checkpoint_00000006.pt")
    with pytest.raises(UsageError, match="--epochs \\(epochs\\): .*past the end of a run of 1 epochs \\(it completed 2 "
                                         "epochs\\): resume with at least 2"):
        train(tiny(tmp_path, epochs=1, resume="auto"))
    assert train(tiny(tmp_path, epochs=2, resume="auto"))["step"] == 4  # a finished run: nothing left to do
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="--resume \\(resume\\): .*a folder without checkpoints"):
        train(tiny(tmp_path / "other", resume=str(tmp_path / "empty")))
