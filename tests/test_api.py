"""The public API: argument validation (errors name the argument), backend selection, build info,
empty inputs, and the registrations every op needs (schemas, fake kernels, autograd)."""
import os
import subprocess
import sys

import pytest
import torch

import insloc_ops
from insloc_ops import _backend
from insloc_ops._archs import arch_runs_on

SCALES = [1 / 4, 1 / 8]


def _feats(B=2, C=3, dtype=torch.float32):
    return [torch.randn(B, C, 16, 16, dtype=dtype), torch.randn(B, C, 8, 8, dtype=dtype)]


ROIS = torch.tensor([[0, 1.0, 2.0, 30.0, 40.0], [1, 5.0, 5.0, 20.0, 25.0]])


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("kwargs, match", [
    (dict(features=[]), "features"),
    (dict(features=torch.randn(2, 3, 8, 8)), "features"),
    (dict(features=[torch.randn(3, 8, 8)]), r"features\[0\]"),
    (dict(features=[torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]), r"features\[1\]"),
    (dict(features=[torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4, dtype=torch.float64)]), r"features\[1\]"),
    (dict(features=[torch.randn(2, 3, 8, 8).int()]), r"features\[0\]"),
    (dict(rois=torch.zeros(3, 4)), "rois"),
    (dict(rois=torch.zeros(3, 5, dtype=torch.int64)), "rois"),
    (dict(rois=torch.tensor([[2.0, 0, 0, 4, 4]])), "batch index"),
    (dict(rois=torch.tensor([[-1.0, 0, 0, 4, 4]])), "batch index"),
    (dict(spatial_scales=[0.25]), "spatial_scales"),
    (dict(spatial_scales=[0.25, -1.0]), "spatial_scales"),
    (dict(spatial_scales=[0.25, True]), "spatial_scales"),
    (dict(output_size=0), "output_size"),
    (dict(output_size=(7, -1)), "output_size"),
    (dict(output_size="7"), "output_size"),
    (dict(output_size="77"), "output_size"),
    (dict(output_size=(2.7, 3)), "output_size"),
    (dict(output_size=(True, 2)), "output_size"),
    (dict(output_size=2**32 + 2), "output_size"),  # the kernels' 32-bit int would read 2
    (dict(output_size=(7, 2**15 + 1)), "output_size"),
    (dict(aligned="no"), "aligned"),
    (dict(aligned=None), "aligned"),
    (dict(aligned=1.0), "aligned"),
    (dict(aligned=1), "aligned"),
    # float64 boxes of float32 features: the kernels read 1.99999999999 as 2.0, past the batch
    (dict(rois=torch.tensor([[1.99999999999, 0, 0, 4, 4]], dtype=torch.float64)), "batch index"),
    (dict(sampling_ratio=1.5), "sampling_ratio"),
    (dict(levels=torch.tensor([0, 2])), "levels"),
    (dict(levels=torch.tensor([0, -1])), "levels"),
    (dict(levels=torch.tensor([0])), "levels"),
    (dict(levels=torch.tensor([0.0, 1.0])), "levels"),
])
@pytest.mark.parametrize("backend", [None, "reference"])  # the C++ kernel (default) checks ranges itself too
def test_roi_align_rejects_bad_input_naming_the_argument(kwargs, match, backend):
    args = dict(features=_feats(), rois=ROIS, output_size=7, spatial_scales=SCALES, backend=backend)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        insloc_ops.roi_align_multilevel(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gt_boxes=torch.zeros(3, 5)), "gt_boxes"),
    (dict(gt_boxes=torch.zeros(4)), "gt_boxes"),
    (dict(anchors=torch.zeros(3, 3)), "anchors"),
    (dict(anchors=torch.zeros(0, 4)), "anchors"),
    (dict(gt_boxes=torch.tensor([[0.0, 0, float("nan"), 4]])), "gt_boxes"),
    (dict(gt_boxes=torch.tensor([[0.0, 0, float("inf"), 4]])), "gt_boxes"),
    (dict(gt_boxes=torch.tensor([[5.0, 0, 4, 4]])), "gt_boxes"),
    (dict(gt_boxes=torch.tensor([[0.0, 5, 4, 4]])), "gt_boxes"),
    (dict(iou_threshold=float("nan")), "iou_threshold"),
])
def test_sample_anchor_boxes_rejects_bad_input_naming_the_argument(kwargs, match):
    args = dict(gt_boxes=torch.tensor([[0.0, 0, 10, 10]]), anchors=torch.tensor([[0.0, 0, 8, 8]]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        insloc_ops.sample_anchor_boxes(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=torch.randn(4)), "q"),
    (dict(k=torch.randn(4, 7)), "k"),
    (dict(k=torch.randn(4, 8, dtype=torch.float64)), "k"),
    (dict(queue=torch.randn(10, 7)), "queue"),
    (dict(queue=torch.randn(2, 10, 8)), "queue"),
    (dict(q=torch.randn(2, 4, 8), k=torch.randn(2, 4, 8), queue=torch.randn(3, 10, 8)), "queue"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.2), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=1e-50), "temperature"),  # positive, but 1 / T overflows float32
    (dict(reduction="sum"), "reduction"),
])
def test_queue_infonce_rejects_bad_input_naming_the_argument(kwargs, match):
    args = dict(q=torch.randn(4, 8), k=torch.randn(4, 8), queue=torch.randn(10, 8), temperature=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        insloc_ops.queue_infonce(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(keys=torch.randn(3, 7)), "keys"),
    (dict(keys=torch.randn(6, 8)), "keys"),
    (dict(ptr=5), "ptr"),
    (dict(ptr=-1), "ptr"),
    (dict(ptr=torch.tensor([1])), "ptr"),
    (dict(ptr=torch.tensor(7)), "ptr"),
    (dict(ptr=torch.tensor(-3)), "ptr"),
    (dict(queue=torch.zeros(5, 8, dtype=torch.int64)), "queue"),
    (dict(queue=torch.zeros(5, 8, dtype=torch.bool)), "queue"),
    (dict(keys=torch.randn(3, 8, dtype=torch.complex64)), "keys"),
    (dict(queue=torch.zeros(1, 8).expand(5, 8)), "queue"),
    (dict(queue=torch.zeros(48).as_strided((5, 8), (4, 1))), "queue"),  # rows overlap by half
])
def test_enqueue_rejects_bad_input_naming_the_argument(kwargs, match):
    args = dict(queue=torch.zeros(5, 8), keys=torch.randn(3, 8), ptr=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        insloc_ops.enqueue_(**args)


def test_enqueue_refuses_keys_sharing_the_queues_memory_and_takes_disjoint_views():
    buf = torch.arange(64.0).reshape(8, 8)
    with pytest.raises(ValueError, match="keys must not share memory"):
        insloc_ops.enqueue_(buf[:5], buf[3:6], 0)  # keys are rows 3..5 of the queue itself
    before = buf.clone()
    assert insloc_ops.enqueue_(buf[:5], buf[5:7], 4) == 1  # rows 5, 6 of the buffer: no overlap
    assert torch.equal(buf[4], before[5]) and torch.equal(buf[0], before[6])
    assert torch.equal(buf[1:4], before[1:4]) and torch.equal(buf[5:], before[5:])
    # a queue sliced by columns is a valid strided layout
    queue = torch.zeros(5, 16)[:, ::2]
    assert insloc_ops.enqueue_(queue, torch.ones(2, 8), 4) == 1
    assert queue[4].eq(1).all() and queue[0].eq(1).all() and queue[1:4].eq(0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(feature_size=-1), "feature_size"),
    (dict(stride=0), "stride"),
    (dict(sizes=()), "sizes"),
    (dict(aspect_ratios=(1.0, 0.0)), "aspect_ratios"),
    (dict(stride=float("inf")), "stride"),
    (dict(sizes=(32.0, float("inf"))), "sizes"),
    (dict(aspect_ratios=(float("inf"),)), "aspect_ratios"),
    (dict(offset=float("nan")), "offset"),
    (dict(dtype=torch.int64), "dtype"),
    (dict(feature_size=2.0), "feature_size"),
    (dict(feature_size=(2, True)), "feature_size"),
    (dict(sizes=16), "sizes"),
    (dict(sizes=(True,)), "sizes"),
])
def test_grid_anchors_rejects_bad_input_naming_the_argument(kwargs, match):
    args = dict(feature_size=4, stride=16, sizes=(32,), aspect_ratios=(1.0,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        insloc_ops.grid_anchors(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(canonical_size=float("nan")), "canonical_size"),
    (dict(canonical_size=0), "canonical_size"),
    (dict(canonical_size=True), "canonical_size"),
    (dict(min_level=2.5), "min_level"),
    (dict(max_level="5"), "max_level"),
    (dict(min_level=6), "min_level"),
])
def test_fpn_levels_rejects_bad_input_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        insloc_ops.fpn_levels(ROIS, **kwargs)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu", "triton")
                                     if _backend.is_available("roi_align_multilevel", b, "cpu")])
@pytest.mark.parametrize("case", ["no boxes", "no boxes on level 1"])
def test_every_level_gets_a_gradient_where_no_box_reads_it(backend, case):
    """Zeros, as from the fused backends' backward, never a missing gradient or an output cut off from
    autograd (the reference backend's output once was, with no boxes: backward() failed)."""
    feats = [f.requires_grad_() for f in _feats()]
    rois = ROIS[:0] if case == "no boxes" else ROIS
    levels = None if case == "no boxes" else torch.zeros(2, dtype=torch.int64)
    out = insloc_ops.roi_align_multilevel(feats, rois, 2, SCALES, levels=levels, backend=backend)
    grads = torch.autograd.grad((out * 2).sum(), feats)
    assert torch.equal(grads[1], torch.zeros_like(feats[1]))
    assert (grads[0] != 0).any() == (case != "no boxes")


@pytest.mark.parametrize("sampling_ratio", [2**32 + 1, 2**31, 65537, -2**32 + 5])
def test_a_sampling_ratio_a_kernel_cannot_take_is_refused(sampling_ratio):
    # the kernels take a 32-bit int: 2**32 + 1 would run as 1
    with pytest.raises(ValueError, match="sampling_ratio"):
        insloc_ops.roi_align_multilevel(_feats(), ROIS, 7, SCALES, sampling_ratio=sampling_ratio)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_gradient_reaches_the_rois(backend):
    rois = ROIS.clone().requires_grad_()
    feats = [f.requires_grad_() for f in _feats()]
    insloc_ops.roi_align_multilevel(feats, rois, 7, SCALES, backend=backend).sum().backward()
    assert rois.grad is None and feats[0].grad is not None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_call_that_needs_no_gradient_gives_the_same_values_and_no_graph(backend):
    # Fused calls needing no gradient run below autograd (insloc_ops._eager.call_op); their values
    # must be those of a differentiable call, and boxes that require grad alone (no gradient ever reaches
    # them) give an output outside any graph, as the reference's.
    feats = [f.requires_grad_() for f in _feats()]
    graph = insloc_ops.roi_align_multilevel(feats, ROIS, 7, SCALES, backend=backend)
    with torch.no_grad():
        plain = insloc_ops.roi_align_multilevel(feats, ROIS, 7, SCALES, backend=backend)
    rois_only = insloc_ops.roi_align_multilevel([f.detach() for f in feats], ROIS.clone().requires_grad_(), 7,
                                                SCALES, backend=backend)
    assert graph.requires_grad and not plain.requires_grad and not rois_only.requires_grad
    assert torch.equal(graph.detach(), plain) and torch.equal(plain, rois_only)
    g = torch.Generator().manual_seed(3)
    q, k, queue = (torch.randn(*shape, generator=g) for shape in ((2, 5, 16), (2, 5, 16), (2, 40, 16)))
    with torch.no_grad():
        loss = insloc_ops.queue_infonce(q.requires_grad_(), k, queue, 0.2, reduction="none", backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, insloc_ops.reference.queue_infonce(q.detach(), k, queue, 0.2)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_anchor_inputs_are_judged_as_the_kernels_see_them(backend):
    if backend not in insloc_ops.available_backends()["sample_anchor_boxes"].get("cpu", []):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    anchors = torch.tensor([[0.0, 0, 8, 8], [0, 0, 16, 16], [4, 4, 12, 12], [1, 1, 9, 9]])
    with pytest.raises(ValueError, match="gt_boxes must be finite"):  # finite in float64, not in float32
        insloc_ops.sample_anchor_boxes(torch.tensor([[0.0, 0, 1e39, 8]], dtype=torch.float64), anchors,
                                       backend=backend)
    # a threshold no IoU exceeds, however large, gives the argmax on every backend
    _, index, _ = insloc_ops.sample_anchor_boxes(torch.tensor([[1.0, 1, 9, 9]]), anchors, 1e300, seed=0,
                                                 backend=backend)
    assert index.tolist() == [3]


# ------------------------------------------------------------------------------------ empty inputs


@pytest.mark.parametrize("backend", [None, "reference", "cpu", "triton"])
def test_empty_inputs_give_empty_outputs(backend):
    if backend is not None and not all(backend in insloc_ops.available_backends()[op].get("cpu", [])
                                       for op in ("roi_align_multilevel", "sample_anchor_boxes", "queue_infonce")):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    out = insloc_ops.roi_align_multilevel(_feats(), ROIS[:0], 7, SCALES, backend=backend)
    assert out.shape == (2, 0, 3, 7, 7)
    out = insloc_ops.roi_align_multilevel(_feats(), ROIS[:0], 7, SCALES, levels=torch.zeros(0, dtype=torch.int64),
                                          backend=backend)
    assert out.shape == (0, 3, 7, 7)
    boxes, index, iou = insloc_ops.sample_anchor_boxes(torch.zeros(0, 4), torch.tensor([[0.0, 0, 8, 8]]), backend=backend)
    assert boxes.shape == (0, 4) and index.shape == (0,) and index.dtype == torch.int64 and iou.shape == (0,)
    q = torch.zeros(0, 8, requires_grad=True)
    loss = insloc_ops.queue_infonce(q, torch.zeros(0, 8), torch.randn(10, 8), 0.2, backend=backend)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert q.grad.shape == (0, 8)
    assert insloc_ops.queue_infonce(q, torch.zeros(0, 8), torch.randn(10, 8), 0.2, reduction="none",
                                    backend=backend).shape == (0,)
    queue = torch.zeros(5, 8)
    assert insloc_ops.enqueue_(queue, torch.zeros(0, 8), 3) == 3
    assert insloc_ops.grid_anchors((0, 4), 16, (32,), (1.0,)).shape == (0, 4)


# ------------------------------------------------------------------------------------ dispatch


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        insloc_ops.roi_align_multilevel(_feats(), ROIS, 7, SCALES, backend="fast")


def test_unavailable_backend_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        insloc_ops.queue_infonce(torch.randn(2, 8), torch.randn(2, 8), torch.randn(5, 8), 0.2, backend="cuda")


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("INSLOC_OPS_BACKEND", "reference")
    assert _backend.select("roi_align_multilevel", "cpu") == "reference"
    monkeypatch.setenv("INSLOC_OPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="INSLOC_OPS_BACKEND"):
        _backend.select("roi_align_multilevel", "cpu")
    assert _backend.select("roi_align_multilevel", "cpu", backend="reference") == "reference"  # per call wins


def test_selected_backends_names_what_runs_when_a_call_names_none(monkeypatch):
    from insloc.train import ops_line

    monkeypatch.delenv("INSLOC_OPS_BACKEND", raising=False)
    on_cpu = "cpu" if insloc_ops.build_info()["extension_loaded"] else "reference"
    assert insloc_ops.selected_backends("cpu") == {op: on_cpu for op in _backend.OPS}
    on_cuda = {op: _backend._default_for(op, "cuda") for op in _backend.OPS}
    on_cuda = {op: b if _backend.is_available(op, b, "cuda") else "reference" for op, b in on_cuda.items()}
    assert insloc_ops.selected_backends("cuda") == on_cuda
    assert ops_line("cpu") == "ops: " + ", ".join(f"{op}={on_cpu}" for op in _backend.OPS)
    if "reference" in on_cuda.values():  # the hint while CUDA runs the reference
        assert "INSLOC_OPS_BACKEND=cuda" in ops_line("cuda")
    assert "sample_anchor_boxes=reference on the CPU (official NMS choice at IoU 0.7)" in ops_line("cpu", 0.7)
    assert ops_line("cpu", method="moco") == f"ops: queue_infonce={on_cpu}"  # image-level MoCo: the loss alone
    monkeypatch.setenv("INSLOC_OPS_BACKEND", "reference")
    assert set(insloc_ops.selected_backends("cpu").values()) == {"reference"}
    monkeypatch.setenv("INSLOC_OPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="INSLOC_OPS_BACKEND"):
        insloc_ops.selected_backends("cpu")


def test_default_table_never_picks_an_unverified_gpu_kernel():
    # CUDA defaults name only the kernels BENCHMARKS.md has a GPU measurement of (the CUDA C++ ones; the
    # Triton kernels did not win), and apply only on the GPUs they were verified on.
    assert set(_backend.DEFAULTS["cuda"].values()) <= {"reference", "cuda"}
    assert _backend.VERIFIED_CUDA_CAPABILITIES == ((9, 0),)
    bench = open(os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md")).read()
    for op, backend in _backend.DEFAULTS["cuda"].items():
        assert backend == "reference" or f"`{op}` -> `{backend}`" in bench
    for op in _backend.OPS:
        assert _backend.select(op, "cpu") in ("cpu", "reference")


@pytest.mark.parametrize("capability, verified", [((9, 0), True), ((8, 0), False), ((10, 0), False)])
def test_cuda_defaults_apply_on_verified_gpus_only(capability, verified, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_backend, "_VERIFIED_GPU", {})
    for op in _backend.OPS:
        for device in ("cuda:0", "cuda", torch.device("cuda", 0)):
            assert _backend._default_for(op, device) == (_backend.DEFAULTS["cuda"][op] if verified else "reference")
        assert _backend._default_for(op, "cpu") == _backend.DEFAULTS["cpu"][op]


def test_available_backends_and_build_info_describe_this_install():
    avail = insloc_ops.available_backends()
    assert set(avail) == set(_backend.OPS)
    for op, per_device in avail.items():
        assert "reference" in per_device["cpu"]
        assert "cuda" not in per_device["cpu"]
    info = insloc_ops.build_info()
    assert info["torch"] == torch.__version__
    assert info["extension_loaded"] is insloc_ops._ext.HAS_EXTENSION
    if info["cuda_kernels_compiled"]:
        assert info["cuda_archs"] and info["nvcc"]


@pytest.mark.parametrize("arch, capability, runs", [
    ("8.0", (8, 0), True), ("8.0", (8, 6), True), ("8.0", (8, 9), True),  # machine code: same major, newer minor
    ("8.6", (8, 0), False), ("8.0", (9, 0), False), ("8.0", (7, 5), False),
    ("9.0+PTX", (9, 0), True), ("9.0+PTX", (10, 0), True), ("9.0+PTX", (12, 0), True),  # PTX: any newer GPU
    ("9.0+PTX", (8, 9), False), ("7.5", (7, 5), True),
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("10.0f", (10, 3), True), ("10.0f", (12, 0), False),
    ("sm_90", (9, 0), False),  # not a TORCH_CUDA_ARCH_LIST entry
])
def test_which_gpus_an_architecture_runs_on(arch, capability, runs):
    assert arch_runs_on(arch, capability) is runs


def test_a_gpu_the_kernels_were_not_built_for_gets_a_clear_error(monkeypatch):
    # A T4 (7.5) with kernels built for 8.0;9.0+PTX: the CUDA backend is unavailable, and asking for it
    # says how to rebuild instead of failing at launch with "no kernel image is available".
    if not insloc_ops.build_info()["cuda_kernels_compiled"]:
        pytest.skip("CUDA kernels not compiled")
    from insloc_ops import _build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(_build, "cuda_archs", lambda: ["8.0", "9.0+PTX"])
    _build.cuda_kernels_run_on.cache_clear()
    try:
        assert not _backend.is_available("roi_align_multilevel", "cuda", "cuda")
        with pytest.raises(RuntimeError, match=r"compiled for 8\.0;9\.0\+PTX.*TORCH_CUDA_ARCH_LIST=7\.5"):
            _backend.select("roi_align_multilevel", "cuda", "cuda")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # an L4 / RTX 4090
        _build.cuda_kernels_run_on.cache_clear()
        assert _backend.is_available("roi_align_multilevel", "cuda", "cuda")
        # A machine with an H100 as GPU 0 and a T4 as GPU 1: each tensor's own GPU decides.
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None: (7, 5) if torch.device("cuda", 0 if device is None else device)
                            .index == 1 else (9, 0))
        _build.cuda_kernels_run_on.cache_clear()
        assert _backend.is_available("roi_align_multilevel", "cuda", "cuda", 0)
        assert not _backend.is_available("roi_align_multilevel", "cuda", "cuda", 1)
        assert _backend.select("roi_align_multilevel", "cuda:0", "cuda") == "cuda"
        with pytest.raises(RuntimeError, match=r"compute capability 7\.5"):
            _backend.select("roi_align_multilevel", "cuda:1", "cuda")
    finally:
        _build.cuda_kernels_run_on.cache_clear()


def _fake_toolkit(root, version):
    """A folder with a toolkit's layout whose bin/nvcc prints ``version`` as nvcc --version does."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version[:4]}, V{version}'\n")
    nvcc.chmod(0o755)
    return str(root)


def test_the_build_picks_a_toolkit_that_matches_torchs_cuda(tmp_path):
    from insloc_ops import _toolkit

    cuda13 = _fake_toolkit(tmp_path / "cuda-13.0", "13.0.88")
    cuda12 = _fake_toolkit(tmp_path / "cuda-12.4", "12.4.131")
    not_a_toolkit = str(tmp_path / "empty")
    assert _toolkit.nvcc_version(cuda12) == "12.4.131"
    assert _toolkit.nvcc_version(not_a_toolkit) is None
    found = [not_a_toolkit, cuda13, cuda12]
    assert _toolkit.find_cuda_home("12", explicit=[], candidates=found) == cuda12
    assert _toolkit.find_cuda_home("13", explicit=[], candidates=found) == cuda13
    assert _toolkit.find_cuda_home("11", explicit=[], candidates=found) == cuda13  # none matches: the first
    assert _toolkit.find_cuda_home(None, explicit=[], candidates=[not_a_toolkit]) is None
    assert _toolkit.find_cuda_home("12", explicit=[None, cuda13], candidates=found) == cuda13  # CUDA_HOME wins
    # A toolkit of another major version than torch's CUDA: torch would refuse it, so the build says why.
    why = _toolkit.mismatch(cuda13, "13.0.88", "2.6.0+cu124", "12.4")
    assert "13.0.88" in why and "12.4" in why and "CUDA_HOME" in why
    assert _toolkit.mismatch(cuda13, "13.0.88", "2.11.0+cu130", "13.0") is None
    assert _toolkit.mismatch(cuda13, "13.2.10", "2.11.0+cu130", "13.0") is None  # minor versions may differ


@pytest.mark.parametrize("version, parsed", [("3.6.0", (3, 6)), ("3.7.1", (3, 7)), ("3.10.0+git5a1b", (3, 10)),
                                             ("", None), ("dev", None)])
def test_triton_version_parsing(version, parsed):
    assert _backend._version_tuple(version) == parsed


def test_a_triton_whose_interpreter_cannot_run_the_kernels_gets_a_clear_error(monkeypatch):
    # Triton 3.6's interpreter fails on a loop bound computed from tl.program_id; on CPU tensors the
    # triton backend is then unavailable, and asking for it names the Triton version needed.
    if not _backend._has_kernel("insloc_ops::queue_infonce_triton", "CPU"):
        pytest.skip("Triton kernels not registered")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_triton_version", lambda: (3, 6))
    assert not _backend.is_available("queue_infonce", "triton", "cpu")
    with pytest.raises(RuntimeError, match=r"Triton 3\.6 cannot run these kernels.*Triton >= 3\.7"):
        _backend.select("queue_infonce", "cpu", "triton")
    monkeypatch.setattr(_backend, "_triton_version", lambda: (3, 7))
    assert _backend.is_available("queue_infonce", "triton", "cpu")
    assert _backend.select("queue_infonce", "cpu", "triton") == "triton"


def test_every_schema_is_registered_once_with_its_triton_twin():
    if not insloc_ops._ext.HAS_EXTENSION:
        pytest.skip("extension not built")
    for name in ("roi_align_multilevel", "roi_align_multilevel_backward", "sample_anchor_boxes",
                 "queue_infonce", "queue_infonce_backward"):
        a = getattr(torch.ops.insloc_ops, name).default._schema
        b = getattr(torch.ops.insloc_ops, name + "_triton").default._schema
        assert [str(x.type) for x in a.arguments] == [str(x.type) for x in b.arguments]
        assert [str(x.type) for x in a.returns] == [str(x.type) for x in b.returns]


def test_triton_kernels_run_with_their_tensors_device_current(monkeypatch):
    # Triton launches on the current CUDA device, not on its pointers' device, so every Triton op makes its
    # tensors' device current first (as the CUDA C++ kernels do with a device guard).
    from insloc_ops import triton as triton_ops

    x = torch.zeros(2)
    assert triton_ops.tensor_device((3, [], [1.0, (x,)])) == x.device
    assert triton_ops.tensor_device((3, "a", [])) is None
    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    run = triton_ops.on_tensor_device(lambda features, n: ("ran", n))
    assert run([x], 3) == ("ran", 3) and entered == []  # CPU tensors: no device to make current
    monkeypatch.setattr(triton_ops, "tensor_device", lambda args: torch.device("cuda", 1))
    assert run([x], 4) == ("ran", 4) and entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
def test_gpu_triton_ops_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    ops = ("roi_align_multilevel", "sample_anchor_boxes", "queue_infonce")
    if not all(_backend.is_available(op, "triton", "cuda") for op in ops):
        pytest.skip("Triton kernels not available on CUDA")
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    feats, rois = [f.to(dev) for f in _feats()], ROIS.to(dev)
    want = insloc_ops.roi_align_multilevel(feats, rois, 7, SCALES, backend="reference")
    got = insloc_ops.roi_align_multilevel(feats, rois, 7, SCALES, backend="triton")
    torch.testing.assert_close(got, want)
    anchors = insloc_ops.grid_anchors(4, 4, (8, 16), (0.5, 1.0, 2.0)).to(dev)
    gt = ROIS[:, 1:].to(dev) / 4
    want = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, seed=5, backend="reference")
    got = insloc_ops.sample_anchor_boxes(gt, anchors, 0.5, seed=5, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    q = torch.nn.functional.normalize(torch.randn(2, 5, 16, device=dev), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(2, 5, 16, device=dev), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(2, 300, 16, device=dev), dim=-1)
    losses = [insloc_ops.queue_infonce(q, k, queue, 0.2, backend=b) for b in ("reference", "triton")]
    grads = [torch.autograd.grad(loss.sum(), q)[0] for loss in losses]
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert torch.cuda.current_device() == 0 and all(loss.device == dev for loss in losses)


def test_reference_backend_compiles_fullgraph():
    def step(q, k, queue):
        return insloc_ops.queue_infonce(q, k, queue, 0.2, backend="reference")

    q = torch.randn(4, 8, requires_grad=True)
    k, queue = torch.randn(4, 8), torch.randn(10, 8)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, queue), step(q, k, queue))


def test_fullgraph_compile_takes_a_float_argument_that_changes_between_calls():
    # The second value of a float makes torch.compile trace it as a symbol: the argument checks must trace too.
    torch._dynamo.reset()
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(20, 8)
    feats, rois = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)], torch.tensor([[0.0, 0, 0, 6, 6]])
    gt, anchors = torch.tensor([[0.0, 0, 50, 50]]), insloc_ops.grid_anchors(4, 16, [32.0, 64.0], [1.0])
    calls = {
        "temperature": lambda t: insloc_ops.queue_infonce(q, k, queue, t),
        "spatial_scales": lambda s: insloc_ops.roi_align_multilevel(feats, rois, 2, [1.0, s]),
        "iou_threshold": lambda t: insloc_ops.sample_anchor_boxes(gt, anchors, t, seed=3),
    }
    for name, call in calls.items():
        compiled = torch.compile(call, fullgraph=True, backend="eager")
        for value in (0.5, 0.25, 0.4):
            want, got = call(value), compiled(value)
            for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
                torch.testing.assert_close(g, w, msg=f"{name}={value}")


def test_a_bad_argument_under_compile_carries_the_message_that_names_it():
    # What the README says a user sees: with fullgraph, dynamo's Unsupported with our message in it; without,
    # the eager call's ValueError.
    torch._dynamo.reset()
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(20, 8)

    def call(t):
        return insloc_ops.queue_infonce(q, k, queue, t)

    with pytest.raises(torch._dynamo.exc.Unsupported, match="temperature must be a finite number"):
        torch.compile(call, fullgraph=True, backend="eager")(-1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        torch.compile(call, backend="eager")(-1.0)


def test_a_direct_op_call_mixing_meta_and_cpu_tensors_is_an_error():
    # Such a call reaches the fake kernels, which would allocate an uninitialised CPU result.
    ops, meta = torch.ops.insloc_ops, torch.device("meta")
    q = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="sample_anchor_boxes: anchors is on meta but gt_boxes is on cpu"):
        ops.sample_anchor_boxes(torch.ones(2, 4), torch.ones(3, 4, device=meta), 0.5, 0)
    with pytest.raises(RuntimeError, match=r"roi_align_multilevel: rois is on meta but features\[0\] is on cpu"):
        ops.roi_align_multilevel([torch.ones(1, 2, 4, 4)], torch.ones(1, 5, device=meta), None, [1.0], 2, 2, 0, True)
    with pytest.raises(RuntimeError, match="queue_infonce: queue is on meta but q is on cpu"):
        ops.queue_infonce(q, q, torch.randn(1, 3, 4, device=meta), 0.2)
    with pytest.raises(RuntimeError, match="queue_infonce_backward: lse is on meta"):
        ops.queue_infonce_backward(torch.ones(1, 2), q, q, torch.randn(1, 3, 4), torch.ones(1, 2, device=meta), 0.2)
    assert ops.queue_infonce(q.to(meta), q.to(meta), torch.randn(1, 3, 4, device=meta), 0.2)[0].shape == (1, 2)


def test_reference_roi_align_traces_as_one_op_under_fullgraph_compile_and_export():
    # The reference reads its sample grid's size and the images from the boxes' values: traced, it is one
    # opaque op (insloc_ops/_traceable.py) whose forward and backward are the eager reference's.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    scales = [1 / 4, 1 / 8, 1 / 16]
    feats = [torch.randn(2, 3, s, s, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
             for s in (16, 8, 4)]
    rois = torch.tensor([[0, 1., 2., 30., 40.], [1, 5., 5., 20., 25.], [1, 0., 0., 63., 63.]])
    levels = torch.tensor([0, 2, 0])  # no box on level 1: its gradient is zeros
    for kwargs in ({}, {"levels": levels}, {"sampling_ratio": 2, "aligned": False}):
        def call(a, b, c, r, kwargs=kwargs):
            return insloc_ops.roi_align_multilevel([a, b, c], r, (2, 3), scales, backend="reference", **kwargs)

        want = call(*feats, rois)
        got = torch.compile(call, fullgraph=True, backend="eager")(*feats, rois)
        torch.testing.assert_close(got, want)
        weights = torch.randn(want.shape, generator=g)
        want_grads = torch.autograd.grad((want * weights).sum(), feats)
        got_grads = torch.autograd.grad((got * weights).sum(), feats)
        for w, gg in zip(want_grads, got_grads):
            torch.testing.assert_close(gg, w)
            assert gg.is_contiguous(memory_format=torch.channels_last)
        if "levels" in kwargs:
            assert got_grads[1].abs().sum() == 0 and got_grads[0].abs().sum() > 0
    empty = torch.compile(lambda a, b, c, r: insloc_ops.roi_align_multilevel([a, b, c], r, 2, scales,
                                                                           backend="reference"), fullgraph=True,
                          backend="eager")(*feats, rois[:0])
    assert empty.shape == (3, 0, 3, 2, 2)

    class Pool(torch.nn.Module):
        def forward(self, a, b, c, r):
            return insloc_ops.roi_align_multilevel([a, b, c], r, 2, scales, backend="reference")

    plain = [f.detach() for f in feats]
    exported = torch.export.export(Pool(), (*plain, rois))
    assert "insloc_ops.roi_align_multilevel_reference" in exported.graph_module.code
    torch.testing.assert_close(exported.module()(*plain, rois), Pool()(*plain, rois))
    ops = torch.ops.insloc_ops
    torch.library.opcheck(ops.roi_align_multilevel_reference, (feats, rois, None, scales, 2, 2, 0, True))
    grad = torch.randn(3, 3, 3, 2, 2, generator=g)
    torch.library.opcheck(ops.roi_align_multilevel_backward_reference,
                          (grad, rois, None, scales, 0, True, 2, 3, [16, 8, 4], [16, 8, 4], True))


def test_enqueue_traces_under_fullgraph_compile_and_export():
    torch._dynamo.reset()

    def push(queue, keys, ptr):
        return insloc_ops.enqueue_(queue, keys, ptr)

    keys = torch.randn(3, 2)
    want, got = torch.zeros(5, 2), torch.zeros(5, 2)
    want_ptr = push(want, keys, torch.tensor(4))
    got_ptr = torch.compile(push, fullgraph=True, backend="eager")(got, keys, torch.tensor(4))
    assert torch.equal(got, want) and int(got_ptr) == int(want_ptr) == 2

    class Queue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("queue", torch.zeros(5, 2))
            self.register_buffer("ptr", torch.tensor(4))

        def forward(self, k):
            self.ptr.copy_(insloc_ops.enqueue_(self.queue, k, self.ptr))
            return self.queue.sum()

    exported = torch.export.export(Queue(), (keys,)).module()
    exported(keys)
    assert torch.equal(exported.queue, want) and int(exported.ptr) == 2


def test_fpn_levels_of_16bit_boxes_match_torchvision():
    tv_poolers = pytest.importorskip("torchvision.ops.poolers")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2000, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + torch.rand(2000, 2, generator=g) * 700 + 1], 1)
    mapper = tv_poolers.LevelMapper(2, 5)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        b = boxes.to(dtype)
        assert torch.equal(insloc_ops.fpn_levels(b), mapper([b]).to(torch.int64)), dtype
    assert insloc_ops.fpn_levels(torch.tensor([[0., 0., 387., 306.]]).half()).item() == 2  # area 118422 > 65504


def test_sample_anchor_boxes_without_a_seed_exports():
    class Jitter(torch.nn.Module):
        def forward(self, gt, anchors):
            return insloc_ops.sample_anchor_boxes(gt, anchors, 0.5)

    gt, anchors = torch.tensor([[0.0, 0, 50, 50]]), insloc_ops.grid_anchors(4, 16, [32.0, 64.0], [1.0])
    exported = torch.export.export(Jitter(), (gt, anchors)).module()
    boxes, index, iou = exported(gt, anchors)
    assert boxes.shape == (1, 4) and torch.equal(boxes[0], anchors[index[0]]) and iou[0] > 0.5


def test_triton_on_cpu_follows_how_the_kernels_were_defined_not_the_variable_now():
    pytest.importorskip("triton")
    script = """
import os, torch, insloc_ops
os.environ["TRITON_INTERPRET"] = "1"  # after the import: the kernels were compiled ones
print("triton" in insloc_ops.available_backends()["queue_infonce"]["cpu"])
try:
    insloc_ops.queue_infonce(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), 0.2, backend="triton")
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "False" and "backend='triton' is not available for queue_infonce on cpu" in lines[1], out.stdout
    if insloc_ops.available_backends()["queue_infonce"]["cpu"].count("triton"):  # interpreted kernels here
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            assert "triton" in insloc_ops.available_backends()["queue_infonce"]["cpu"]
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


def _package_copy(tmp_path):
    """The Python files of insloc_ops in tmp_path (no compiled extension)."""
    import shutil

    src = os.path.dirname(insloc_ops.__file__)
    shutil.copytree(src, tmp_path / "insloc_ops", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return tmp_path / "insloc_ops"


@pytest.mark.parametrize("extension", ["absent", "broken"])
def test_an_extension_that_is_there_and_does_not_load_is_said(tmp_path, extension):
    # A build for another torch fails at import; without a word every op ran the reference. Not built at all
    # (a pure-Python install) stays silent.
    package = _package_copy(tmp_path)
    if extension == "broken":
        (package / "_C.abi3.so").write_bytes(b"not a shared object")
    code = ("import sys, warnings; warnings.simplefilter('error', RuntimeWarning)\n"
            # an editable install's finder would find the repository's _C for the copy's missing one
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
            "try:\n    import insloc_ops\nexcept RuntimeWarning as w:\n    print('WARNED', w)\n"
            "else:\n    print('LOADED', insloc_ops.build_info()['extension_loaded'])")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if extension == "broken":
        assert out.stdout.startswith("WARNED insloc_ops: the compiled extension did not load (ImportError")
        assert "pip install --no-build-isolation -e ." in out.stdout
    else:
        assert out.stdout.strip() == "LOADED False"


def test_the_source_distribution_holds_every_file_the_build_needs(tmp_path):
    # Without a MANIFEST.in the sdist lacked csrc's headers (and its .cu files unless the machine making it
    # built CUDA): building from it failed at the first #include.
    import tarfile

    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # from a copy without the build's leftovers: an egg-info's SOURCES.txt would list the files again
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "runs",
                                                             "__pycache__", "*.so", ".pytest_cache"))
    env = {**os.environ, "INSLOC_OPS_CUDA": "0"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=src, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (tarball,) = tmp_path.glob("insloc-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(os.path.join(root, "csrc"))
              for f in files if f.endswith((".h", ".cpp", ".cu"))}
    assert needed and sorted(needed - names) == []
    assert {"setup.py", "pyproject.toml", "insloc_ops/_toolkit.py", "insloc_ops/triton/infonce.py"} <= names
    assert not any(n.endswith(".so") for n in names)
