import csv
import os

import pytest
import torch
import yaml

from insloc.checkpoint import find_latest, list_checkpoints, load_checkpoint, save_checkpoint
from insloc.cli import build_parser, config_from_args
from insloc.config import Config, demo
from insloc.train import cosine_lr, train


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


def test_cosine_lr_decays_per_step_to_zero_without_warmup():
    assert cosine_lr(0, 100, 0.03) == 0.03
    assert cosine_lr(50, 100, 0.03) == pytest.approx(0.015)
    assert cosine_lr(100, 100, 0.03) == pytest.approx(0.0)


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
    steps_a, loss_a = losses(tmp_path / "straight")
    steps_b, loss_b = losses(tmp_path / "resumed")
    assert steps_a == steps_b == [1, 2, 3, 4]
    assert loss_a == loss_b
    a = load_checkpoint(find_latest(str(tmp_path / "straight")))["model"]
    b = load_checkpoint(find_latest(str(tmp_path / "resumed")))["model"]
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


def test_cli_flags_override_yaml_which_overrides_the_preset(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"queue_size": 128, "epochs": 3, "bf16": False}))
    args = build_parser().parse_args(["pretrain", "--preset", "demo", "--config", str(tmp_path / "c.yaml"),
                                      "--epochs", "7", "--anchor-ratios", "1", "2", "--no-shuffle-bn"])
    cfg = config_from_args(args)
    assert (cfg.queue_size, cfg.epochs, cfg.bf16, cfg.shuffle_bn) == (128, 7, False, False)
    assert cfg.anchor_ratios == [1.0, 2.0] and cfg.depth == demo().depth == 18
    assert cfg.out_dir == os.path.join("runs", "demo")
    recipe = config_from_args(build_parser().parse_args(["pretrain", "--preset", "insloc-r50-fpn"]))
    assert (recipe.queue_size, recipe.momentum, recipe.temperature, recipe.image_size) == (65536, 0.999, 0.2, 256)
    assert (recipe.batch_size, recipe.epochs, recipe.lr, recipe.lr_batch) == (32, 200, 0.03, 256)
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
