import copy
import os

import pytest
import torch
import torch.distributed as dist
from torchvision.ops import box_iou

from insloc.config import Config
from insloc.models import FPNEncoder
from insloc.moco import MoCo, batch_shuffle_ddp, batch_unshuffle_ddp, rois_from_boxes
from insloc.train import build_model
from insloc_ops import grid_anchors, reference, sample_anchor_boxes

from conftest import free_port, run_processes


# a few small ops per step: one thread avoids OpenMP oversubscription on shared CPUs
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw):
    base = dict(depth=18, fpn_channels=16, head_fc_dim=32, dim=8, image_size=64, paste_size=[24, 63],
                anchor_sizes=[16.0, 32.0, 64.0], queue_size=16)
    return Config(**{**base, **kw})


def test_rois_from_boxes_numbers_boxes_by_image():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert rois_from_boxes(boxes).tolist() == [[0, 1, 2, 3, 4], [1, 5, 6, 7, 8]]


def test_momentum_update_is_m_key_plus_one_minus_m_query():
    torch.manual_seed(0)
    moco = MoCo(FPNEncoder(18, fpn_channels=8, fc_dim=8, dim=4), queue_size=8, dim=4, momentum=0.9)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in moco.encoder_k.parameters()]
    query = [p.clone() for p in moco.encoder_q.parameters()]
    moco.momentum_update_key_encoder()
    for k0, q, k1 in zip(before_k, query, moco.encoder_k.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q)
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


def test_queue_wraps_around_and_pointer_is_shared_by_levels():
    moco = MoCo(FPNEncoder(18, fpn_channels=8, fc_dim=8, dim=4), queue_size=10, dim=4)
    batches = [torch.full((4, 4, 4), float(i + 1)) for i in range(3)]  # [G, N, D]
    for keys in batches:
        moco.dequeue_and_enqueue(keys)
    assert int(moco.queue_ptr) == 2  # 12 % 10
    assert moco.queue[:, 0:2].eq(3).all() and moco.queue[:, 2:4].eq(1).all()
    assert moco.queue[:, 4:8].eq(2).all() and moco.queue[:, 8:10].eq(3).all()


def test_fpn_query_jitters_only_p5_to_an_anchor_with_iou_above_half():
    moco = build_model(tiny_config())
    boxes = torch.tensor([[3.0, 5.0, 40.0, 33.0], [10.0, 0.0, 60.0, 64.0], [0.0, 0.0, 30.0, 30.0]])
    rois = moco.query_rois(boxes, torch.Generator().manual_seed(1))  # [4, 3, 5]
    assert rois.shape == (4, 3, 5)
    for level in range(3):
        torch.testing.assert_close(rois[level], rois_from_boxes(boxes))
    assert rois[3, :, 0].tolist() == [0, 1, 2]
    iou = box_iou(rois[3, :, 1:], boxes).diagonal()
    assert (iou > 0.5).all() and (rois[3, :, 1:] != boxes).any()
    assert moco.anchors.shape == (4 * 4 * 3 * 5, 4)  # 64 / 16 = 4x4 grid, 3 sizes x 5 ratios


def test_anchor_nms_iou_selects_the_official_nms_diversified_choice():
    boxes = torch.tensor([[3.0, 5.0, 40.0, 33.0], [10.0, 0.0, 60.0, 64.0], [0.0, 0.0, 30.0, 30.0],
                          [20.0, 16.0, 64.0, 50.0], [8.0, 8.0, 56.0, 56.0], [0.0, 20.0, 48.0, 44.0]])
    uniform = build_model(tiny_config()).query_rois(boxes, torch.Generator().manual_seed(3))[3, :, 1:]
    moco = build_model(tiny_config(anchor_nms_iou=0.7))
    assert moco.anchor_nms_iou == 0.7
    official = moco.query_rois(boxes, torch.Generator().manual_seed(3))[3, :, 1:]  # [N, 4]
    want, _, _ = sample_anchor_boxes(boxes, moco.anchors, 0.5, nms_iou=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(official, want)
    assert not torch.equal(official, uniform), "the two choices must differ on these boxes for this test to tell"
    assert (box_iou(official, boxes).diagonal() > 0.5).all()


def test_forward_takes_query_rois_made_beforehand():
    # The trainer makes the official choice's rois from the loader's CPU boxes before the forward.
    torch.manual_seed(0)
    moco = build_model(tiny_config(anchor_nms_iou=0.7, momentum=1.0))  # m = 1: the forward changes no state
    im_q, im_k = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    boxes = torch.tensor([[3.0, 5.0, 40.0, 33.0], [10.0, 0.0, 60.0, 64.0], [8.0, 8.0, 56.0, 56.0]])
    rois = moco.query_rois(boxes, torch.Generator().manual_seed(5))
    given = moco(im_q, boxes, im_k, boxes, rois_q=rois)[0]
    made = moco(im_q, boxes, im_k, boxes, generator=torch.Generator().manual_seed(5))[0]
    other = moco(im_q, boxes, im_k, boxes, rois_q=moco.query_rois(boxes, torch.Generator().manual_seed(6)))[0]
    assert torch.equal(given, made) and not torch.equal(given, other)
    assert moco.cpu_anchors.device.type == "cpu" and torch.equal(moco.cpu_anchors, moco.anchors.cpu())


def test_anchor_nms_iou_out_of_range_is_an_error_naming_it():
    with pytest.raises(ValueError, match="anchor_nms_iou"):
        build_model(tiny_config(anchor_nms_iou=1.5))


@pytest.mark.parametrize("method, arch, groups", [("insloc", "fpn", 4), ("insloc", "c4", 1), ("moco", "fpn", 1)])
def test_one_step_updates_query_weights_key_weights_and_queue(method, arch, groups):
    torch.manual_seed(0)
    cfg = tiny_config(method=method, arch=arch, momentum=0.5)
    moco = build_model(cfg)
    N = 4
    im_q, im_k = torch.randn(N, 3, 64, 64), torch.randn(N, 3, 64, 64)
    boxes = torch.tensor([[2.0, 4.0, 50.0, 40.0]]).repeat(N, 1)
    opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    q0 = moco.encoder_q.backbone.conv1.weight.clone()
    k0 = moco.encoder_k.backbone.conv1.weight.clone()
    queue0 = moco.queue.clone()
    losses, keys = moco(im_q, boxes, im_k, boxes, generator=torch.Generator().manual_seed(0))
    assert losses.shape == (groups,) and torch.isfinite(losses).all() and (losses > 0).all()
    assert keys.shape == (groups, N, 8) and not keys.requires_grad
    opt.zero_grad()
    losses.sum().backward()
    opt.step()
    moco.dequeue_and_enqueue(keys)
    assert (moco.encoder_q.backbone.conv1.weight - q0).abs().max() > 0
    # momentum update ran before the key forward, with the query weights of that time (= key weights)
    torch.testing.assert_close(moco.encoder_k.backbone.conv1.weight, k0)
    torch.testing.assert_close(moco.queue[:, :N], keys)
    torch.testing.assert_close(moco.queue[:, N:], queue0[:, N:])
    assert int(moco.queue_ptr) == N
    moco(im_q, boxes, im_k, boxes)  # second momentum update now moves the key encoder halfway
    torch.testing.assert_close(moco.encoder_k.backbone.conv1.weight,
                               0.5 * k0 + 0.5 * moco.encoder_q.backbone.conv1.weight)


def test_initial_queue_rows_are_unit_keys():
    # negatives that are not unit vectors would scale the first steps' logits (the keys are L2-normalised)
    torch.manual_seed(0)
    moco = build_model(tiny_config())
    assert moco.queue.shape == (4, 16, 8)
    torch.testing.assert_close(moco.queue.norm(dim=2), torch.ones(4, 16))
    assert moco.queue.std() > 0.1  # random directions, not a constant


def test_build_model_carries_the_configs_moco_and_anchor_settings():
    # numbers of the config that build_model dropped (a default in its place) would go unnoticed in a run
    cfg = tiny_config(momentum=0.75, temperature=0.13, anchor_iou=0.7, anchor_stride=32, anchor_sizes=[24.0, 48.0],
                      anchor_ratios=[0.5, 1.0, 2.0], queue_size=12, dim=6, shuffle_bn=False)
    moco = build_model(cfg)
    assert (moco.momentum, moco.temperature, moco.anchor_iou, moco.shuffle_bn) == (0.75, 0.13, 0.7, False)
    assert moco.queue.shape == (4, 12, 6) and moco.jittered_groups == (3,) and moco.anchor_nms_iou is None
    assert moco.anchors.shape == (2 * 2 * 2 * 3, 4)  # 64 / 32 = 2x2 grid, 2 sizes x 3 ratios
    torch.testing.assert_close(moco.anchors, grid_anchors(2, 32, [24.0, 48.0], [0.5, 1.0, 2.0]))
    # the jitter keeps only anchors above the configured IoU
    boxes = torch.tensor([[8.0, 4.0, 40.0, 36.0], [14.0, 10.0, 60.0, 58.0], [0.0, 16.0, 48.0, 40.0]])
    moco = build_model(tiny_config(anchor_iou=0.3))
    rois = moco.query_rois(boxes, torch.Generator().manual_seed(0))
    assert moco.anchor_iou == 0.3 and (box_iou(rois[3, :, 1:], boxes).diagonal() > 0.3).all()


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_forward_keys_are_the_updated_key_encoder_on_the_key_view_and_losses_the_queue_infonce(arch):
    # Different views and boxes for query and key, and a query encoder away from the key encoder: keys made
    # from the query's image or boxes, or by the key encoder before its momentum update, or losses at another
    # temperature or with q and k swapped, all give other numbers.
    torch.manual_seed(0)
    moco = build_model(tiny_config(arch=arch, momentum=0.5, temperature=0.13))
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    N = 3
    im_q, im_k = torch.randn(N, 3, 64, 64), torch.randn(N, 3, 64, 64)
    boxes_q = torch.tensor([[3.0, 5.0, 40.0, 33.0], [10.0, 0.0, 60.0, 64.0], [8.0, 8.0, 56.0, 56.0]])
    boxes_k = torch.tensor([[20.0, 16.0, 64.0, 50.0], [0.0, 20.0, 48.0, 44.0], [4.0, 2.0, 36.0, 60.0]])
    queue0 = moco.queue.clone()
    key_encoder = copy.deepcopy(moco.encoder_k)
    stale_key_encoder = copy.deepcopy(moco.encoder_k)
    query_encoder = copy.deepcopy(moco.encoder_q)
    with torch.no_grad():
        for k, q in zip(key_encoder.parameters(), moco.encoder_q.parameters()):
            k.mul_(0.5).add_(q, alpha=0.5)  # the momentum update, before the key forward
        want_k = key_encoder(im_k, rois_from_boxes(boxes_k))  # [G, N, D]
        q = query_encoder(im_q, moco.query_rois(boxes_q, torch.Generator().manual_seed(4)))  # [G, N, D]
        want_losses = reference.queue_infonce(q, want_k, queue0, 0.13)[0].mean(1)  # [G]
        others = [key_encoder(im_q, rois_from_boxes(boxes_k)), key_encoder(im_k, rois_from_boxes(boxes_q)),
                  stale_key_encoder(im_k, rois_from_boxes(boxes_k))]
    losses, keys = moco(im_q, boxes_q, im_k, boxes_k, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(keys, want_k)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-5)
    for other in others:  # the test can tell these apart
        assert (other - want_k).abs().max() > 1e-3
    assert (reference.queue_infonce(q, want_k, queue0, 0.2)[0].mean(1) - want_losses).abs().min() > 1e-2
    assert (reference.queue_infonce(want_k, q, queue0, 0.13)[0].mean(1) - want_losses).abs().min() > 1e-3


def _shuffle_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different local RNG on each rank: rank 0's permutation must win
        N = 5
        ids = torch.arange(N) + 100 * rank  # a global id per image
        images = ids.float().view(N, 1, 1, 1).expand(N, 3, 4, 4).clone()  # every pixel = the id
        boxes = torch.stack([ids, ids + 1, ids + 2, ids + 3], 1).float()  # [N, 4], the box encodes the id
        shuffled, shuffled_boxes, idx_unshuffle = batch_shuffle_ddp(images, boxes)
        got = shuffled[:, 0, 0, 0]  # [N] ids now on this rank
        assert torch.equal(shuffled_boxes[:, 0], got), "a box got separated from its image"
        assert torch.equal(shuffled_boxes, torch.stack([got, got + 1, got + 2, got + 3], 1))
        everything = [torch.empty_like(got) for _ in range(world)]
        dist.all_gather(everything, got)
        all_ids = torch.cat(everything).sort().values
        assert torch.equal(all_ids, torch.cat([torch.arange(N) + 100 * r for r in range(world)]).float())
        assert not torch.equal(torch.cat(everything), all_ids)  # it did shuffle (fixed seeds)
        # across processes: some rank holds another rank's images (a shuffle within each process would leave
        # each one's BatchNorm statistics as they were, which is what shuffle-BN is there to change)
        assert any(((g // 100) != r).any() for r, g in enumerate(everything))
        rois = rois_from_boxes(shuffled_boxes)
        assert rois[:, 0].tolist() == list(range(N))  # batch index = new local position
        features = torch.stack([got, -got], 0).unsqueeze(-1)  # [G=2, N, 1], per-image outputs
        restored = batch_unshuffle_ddp(features, idx_unshuffle, dim=1)
        assert torch.equal(restored[0, :, 0], ids.float()) and torch.equal(restored[1, :, 0], -ids.float())
        assert torch.equal(batch_unshuffle_ddp(shuffled, idx_unshuffle), images)
        # the queue update writes the keys of both ranks, so the queues stay identical
        moco = MoCo(FPNEncoder(18, fpn_channels=8, fc_dim=8, dim=2), queue_size=16, dim=2)
        moco.dequeue_and_enqueue(torch.full((4, N, 2), float(rank + 1)))
        assert int(moco.queue_ptr) == 2 * N
        assert moco.queue[:, :N].eq(1).all() and moco.queue[:, N:2 * N].eq(2).all()
    finally:
        # Both ranks leave together, and without destroy_process_group: with torch 2.6, rank 0 (which holds
        # the store) hung in it now and then, before and after a barrier. The process ends here anyway.
        dist.barrier()


def test_shuffle_bn_round_trips_images_and_boxes_across_two_gloo_processes():
    run_processes(_shuffle_worker, (2, free_port()), nprocs=2, timeout_s=300)


def _shuffled_forward_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same model on both ranks
        moco = build_model(tiny_config(momentum=1.0))  # m = 1: the forward leaves the key encoder as it is
        moco.encoder_k.eval()  # BN on running statistics: a key does not depend on the images beside it
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own images and boxes
        N = 3
        im_q, im_k = torch.randn(N, 3, 64, 64, generator=g), torch.randn(N, 3, 64, 64, generator=g)
        xy = torch.randint(0, 24, (N, 2), generator=g).float()
        boxes_q = torch.cat([xy, xy + 36.0], 1)
        boxes_k = torch.cat([xy.flip(1), xy.flip(1) + 40.0], 1)
        torch.manual_seed(7)  # rank 0's permutation is broadcast: the same on both ranks here
        shuffled_losses, shuffled_keys = moco(im_q, boxes_q, im_k, boxes_k, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        assert not torch.equal(torch.randperm(world * N), torch.arange(world * N))  # it did shuffle
        moco.shuffle_bn = False
        losses, keys = moco(im_q, boxes_q, im_k, boxes_k, generator=torch.Generator().manual_seed(1))
        # each key comes back to the rank and position of its image (and was pooled with its own box)
        torch.testing.assert_close(shuffled_keys, keys)
        torch.testing.assert_close(shuffled_losses, losses)
    finally:
        dist.barrier()  # both ranks leave together (see _shuffle_worker)


def test_shuffle_bn_forward_gives_each_rank_the_keys_of_its_own_images_across_two_gloo_processes():
    run_processes(_shuffled_forward_worker, (2, free_port()), nprocs=2, timeout_s=300)


# The trainer's CUDA-only settings (bf16 autocast, channels_last, torch.compile), exercised on the CPU:
# CPU autocast casts the same op classes to bfloat16, so dtype mismatches between the model and the fused
# ops show here too.


@pytest.mark.parametrize("method, arch", [("insloc", "fpn"), ("insloc", "c4"), ("moco", "fpn")])
def test_step_under_bf16_autocast_with_channels_last(method, arch):
    torch.manual_seed(0)
    cfg = tiny_config(method=method, arch=arch)
    moco = build_model(cfg).to(memory_format=torch.channels_last)
    N = 4
    im_q, im_k = (torch.randn(N, 3, 64, 64).contiguous(memory_format=torch.channels_last) for _ in range(2))
    boxes = torch.tensor([[2.0, 4.0, 50.0, 40.0]]).repeat(N, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, keys = moco(im_q, boxes, im_k, boxes, generator=torch.Generator().manual_seed(0))
    assert losses.dtype == keys.dtype == torch.float32 and torch.isfinite(losses).all()
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(keys.shape[:-1]), atol=1e-2, rtol=0)
    losses.sum().backward()
    grads = [p.grad for p in moco.encoder_q.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    moco.dequeue_and_enqueue(keys)
    assert moco.queue.dtype == torch.float32 and int(moco.queue_ptr) == N


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_compiled_encoders_match_eager(arch):
    # What cfg.compile does (Module.compile in place), with fullgraph=True: no graph break around the
    # fused ops. aot_eager traces forward and backward through the fake kernels and autograd formulas
    # without inductor's code generation, which would take minutes here.
    torch.manual_seed(0)
    eager = build_model(tiny_config(arch=arch))
    compiled = build_model(tiny_config(arch=arch))
    compiled.load_state_dict(eager.state_dict())
    compiled.encoder_q.compile(backend="aot_eager", fullgraph=True)
    compiled.encoder_k.compile(backend="aot_eager", fullgraph=True)
    N = 4
    im_q, im_k = torch.randn(N, 3, 64, 64), torch.randn(N, 3, 64, 64)
    boxes = torch.tensor([[2.0, 4.0, 50.0, 40.0], [10.0, 3.0, 60.0, 33.0]]).repeat(N // 2, 1)
    out = []
    for moco in (eager, compiled):
        losses, keys = moco(im_q, boxes, im_k, boxes, generator=torch.Generator().manual_seed(3))
        losses.sum().backward()
        out.append((losses, keys, moco.encoder_q.backbone.conv1.weight.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
