"""Forward-mode AD, higher-order gradients and torch.func transforms through the public functions.

Every fused backend must give the reference backend's derivatives (the reference is plain PyTorch, so torch
differentiates it in every mode), or refuse with a clear error: never a silently zero or constant term.
"""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import insloc_ops
from insloc_ops._backend import is_available

ROI_BACKENDS = [b for b in ("cpu", "triton") if is_available("roi_align_multilevel", b, "cpu")]
NCE_BACKENDS = [b for b in ("cpu", "triton") if is_available("queue_infonce", b, "cpu")]
SCALES = [1.0, 0.5]
LEVELS = torch.tensor([0, 1, 1])


def roi_problem(dtype=torch.float64, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype), torch.randn(2, 3, 4, 4, generator=gen, dtype=dtype)]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0], [1, 0.0, 2.5, 5.0, 7.5], [1, 2.0, 0.5, 7.5, 4.0]], dtype=dtype)
    return feats, rois


def nce_problem(dtype=torch.float64, G=2, N=3, K=11, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(G, N, D, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    k = F.normalize(torch.randn(G, N, D, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    queue = F.normalize(torch.randn(G, K, D, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    return q, k, queue


def pool(backend, levels=None, rois=None, size=2):
    def fn(*feats):
        return insloc_ops.roi_align_multilevel(list(feats), rois, size, SCALES, sampling_ratio=2, levels=levels,
                                               backend=backend)
    return fn


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", ROI_BACKENDS)
@pytest.mark.parametrize("levels", [None, LEVELS])
def test_roi_align_forward_mode_gives_the_references_tangent(backend, levels):
    """fwAD dual tensors and torch.func.jvp: the fused op used to give no tangent (or zeros) here."""
    feats, rois = roi_problem()
    tangents = [torch.randn_like(f) for f in feats]
    want = torch.func.jvp(pool("reference", levels, rois), tuple(feats), tuple(tangents))
    got = torch.func.jvp(pool(backend, levels, rois), tuple(feats), tuple(tangents))
    close(got[0], want[0])
    close(got[1], want[1])
    assert got[1].abs().sum() > 0
    with fwAD.dual_level():  # a tangent on one level only: the other level counts as zero
        dual = [fwAD.make_dual(feats[0], tangents[0]), feats[1]]
        out = fwAD.unpack_dual(pool(backend, levels, rois)(*dual))
    close(out.tangent, torch.func.jvp(lambda f0: pool("reference", levels, rois)(f0, feats[1]),
                                      (feats[0],), (tangents[0],))[1])


@pytest.mark.parametrize("backend", ROI_BACKENDS)
def test_roi_align_second_order_gradients_match_the_reference(backend):
    """The backward is linear in the output's gradient, so it is differentiable too: double backward
    (create_graph=True) and grad-of-grad through the public function and through the registered op."""
    feats, rois = roi_problem(channels_last=True)

    def penalty(fn):
        f = [x.detach().requires_grad_() for x in feats]
        out = fn(*f)
        g = torch.autograd.grad((out * out.detach().cos()).square().sum(), f, create_graph=True)
        return torch.autograd.grad(sum((x.sin() * x).sum() for x in g), f)

    want = penalty(pool("reference", rois=rois))
    suffix = "_triton" if backend == "triton" else ""
    raw = getattr(torch.ops.insloc_ops, "roi_align_multilevel" + suffix)
    for fn in (pool(backend, rois=rois), lambda *f: raw(list(f), rois, None, SCALES, 2, 2, 2, True)):
        got = penalty(fn)
        for a, b in zip(got, want):
            close(a, b)
    assert want[0].abs().sum() > 0


@pytest.mark.parametrize("transform", ["grad_of_grad", "jacrev", "jacfwd", "hessian", "jvp_of_grad", "jvp_of_jvp"])
def test_roi_align_under_torch_func_transforms(transform):
    feats, rois = roi_problem()
    x = feats[0]

    def run(backend):
        def scalar(f0):
            return pool(backend, LEVELS, rois)(f0, feats[1]).square().sum()

        def vector(f0):
            return pool(backend, None, rois)(f0, feats[1])
        if transform == "grad_of_grad":
            return torch.func.grad(lambda f0: torch.func.grad(scalar)(f0).cos().sum())(x)
        if transform == "jacrev":
            return torch.func.jacrev(vector)(x)
        if transform == "jacfwd":
            return torch.func.jacfwd(vector)(x)
        if transform == "hessian":
            return torch.func.hessian(lambda f0: scalar(f0).sin())(x)
        if transform == "jvp_of_grad":
            return torch.func.jvp(torch.func.grad(scalar), (x,), (torch.ones_like(x),))[1]
        return torch.func.jvp(lambda f0: torch.func.jvp(scalar, (f0,), (f0.cos(),))[1], (x,), (torch.ones_like(x),))[1]

    want = run("reference")
    with no_vmap_fallback():  # the fused ops have vmap rules
        close(run("cpu"), want)
    assert want.abs().sum() > 0


@pytest.mark.parametrize("backend", ROI_BACKENDS)
def test_roi_align_vmap_folds_the_batch_into_channels(backend):
    """vmap over the features (at any dim, mapped or not per level) and a gradient through it."""
    feats, rois = roi_problem()
    stacked = torch.stack([feats[0], 2 * feats[0] + 1, -feats[0]], dim=2)  # vmapped dim 2

    def fn(b):
        return torch.func.vmap(lambda f0: pool(b, LEVELS, rois)(f0, feats[1]), in_dims=2)(stacked)
    want = fn("reference")
    close(fn(backend), want)
    loop = torch.stack([pool(backend, LEVELS, rois)(stacked.select(2, i), feats[1]) for i in range(3)])
    close(fn(backend), loop)
    gw = torch.func.grad(lambda s: torch.func.vmap(lambda f0: pool("reference", None, rois)(f0, feats[1]), 2)(s)
                         .square().sum())(stacked)
    gg = torch.func.grad(lambda s: torch.func.vmap(lambda f0: pool(backend, None, rois)(f0, feats[1]), 2)(s)
                         .square().sum())(stacked)
    close(gg, gw)


def nce(backend, reduction="none", k=None, queue=None, q=None):
    def fn(*args):
        a = dict(q=q, k=k, queue=queue)
        names = [n for n in ("q", "k", "queue") if a[n] is None]
        a.update(zip(names, args))
        return insloc_ops.queue_infonce(a["q"], a["k"], a["queue"], 0.2, reduction=reduction, backend=backend)
    return fn


@pytest.mark.parametrize("backend", NCE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_queue_infonce_forward_mode_gives_the_references_tangent(backend, dtype, reduction):
    q, k, queue = nce_problem(dtype)
    tq, tk = torch.randn_like(q), torch.randn_like(k)
    want = torch.func.jvp(nce("reference", reduction, queue=queue), (q, k), (tq, tk))
    got = torch.func.jvp(nce(backend, reduction, queue=queue), (q, k), (tq, tk))
    # (the Triton kernels take fp64 inputs through fp32 dot products)
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 and backend != "triton" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[1].abs().sum() > 0
    x = q.clone().requires_grad_()
    with fwAD.dual_level():  # q alone carries a tangent, and q requires grad too (the CPU training path)
        out = fwAD.unpack_dual(insloc_ops.queue_infonce(fwAD.make_dual(x, tq), k, queue, 0.2, reduction=reduction,
                                                        backend=backend))
    torch.testing.assert_close(out.tangent, torch.func.jvp(nce("reference", reduction, k=k, queue=queue),
                                                           (q,), (tq,))[1], **tol)
    # The primal's gradient is there; the tangent's would be second order and refuses (when it is used).
    (g,) = torch.autograd.grad(out.primal.sum(), x, retain_graph=True)
    torch.testing.assert_close(g, torch.func.grad(lambda y: nce("reference", reduction, k=k, queue=queue)(y)
                                                  .sum())(q), **tol)
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        torch.autograd.grad(out.tangent.sum(), x)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "vmap_k", "vmap_queue", "grad_of_vmap"])
def test_queue_infonce_under_torch_func_transforms(transform):
    q, k, queue = nce_problem()
    ks = torch.stack([k, k.flip(1), -k], dim=1)

    def run(backend):
        if transform == "grad":
            return torch.func.grad(lambda x: nce(backend, "mean", k=k, queue=queue)(x).sum())(q)
        if transform == "jacrev":
            return torch.func.jacrev(nce(backend, k=k, queue=queue))(q)
        if transform == "jacfwd":
            return torch.func.jacfwd(nce(backend, q=q, queue=queue))(k)
        if transform == "vmap_k":
            return torch.func.vmap(nce(backend, q=q, queue=queue), in_dims=1)(ks)
        if transform == "vmap_queue":
            return torch.func.vmap(nce(backend, q=q, k=k))(torch.stack([queue, queue.flip(1)]))
        return torch.func.grad(lambda x: torch.func.vmap(nce(backend, q=x, queue=queue), in_dims=1)(ks).sum())(q)

    want = run("reference")
    with no_vmap_fallback():  # the fused ops have vmap rules
        close(run("cpu"), want)
    assert want.abs().sum() > 0


@contextlib.contextmanager
def no_vmap_fallback():
    """vmap raises where an op has no batching rule, instead of looping per element (with a warning that may
    go to stderr rather than Python's warnings)."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(before)


RAW_ROI_OPS = [(b, "roi_align_multilevel" + s) for b, s in (("cpu", ""), ("triton", "_triton"))]


@pytest.mark.parametrize("backend,name", [b for b in RAW_ROI_OPS if b[0] in ROI_BACKENDS])
@pytest.mark.parametrize("vmapped", ["level0", "levels01", "boxes", "grad", "grad_boxes"])
@pytest.mark.parametrize("levels", [None, LEVELS])
def test_raw_roi_align_ops_have_a_vmap_rule(backend, name, vmapped, levels):
    """vmap over the raw RoIAlign ops (a list argument, which torch's fallback cannot take): vmapped features or
    output gradients join the channels, vmapped boxes loop; the result equals one call per element."""
    V = 3
    feats, rois = roi_problem()
    fwd = getattr(torch.ops.insloc_ops, name)
    bwd = getattr(torch.ops.insloc_ops, name.replace("multilevel", "multilevel_backward"))
    B, C = feats[0].shape[:2]
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]

    def forward(fs, r):
        return fwd(fs, r, levels, SCALES, 2, 2, 2, True)

    def backward(g, r):
        return bwd(g, r, levels, SCALES, 2, True, B, C, hs, ws, False)

    def stack(t, d):
        return torch.stack([t * (1 + 0.1 * v) if t.is_floating_point() else t for v in range(V)], dim=d)

    rois_v = torch.stack([rois, rois.flip(0), rois + 0.5])
    grad = torch.randn_like(forward(feats, rois))
    if vmapped.startswith("grad"):
        args, dims, fn = (stack(grad, 1), rois_v if vmapped == "grad_boxes" else rois), \
            (1, 0 if vmapped == "grad_boxes" else None), backward
    else:
        fs = [stack(feats[0], 0), stack(feats[1], 1) if vmapped == "levels01" else feats[1]]
        fdims = [0, 1 if vmapped == "levels01" else None]
        if vmapped == "boxes":
            fs, fdims = feats, [None, None]
        args, dims, fn = (fs, rois_v if vmapped == "boxes" else rois), (fdims, 0 if vmapped == "boxes" else None), \
            forward
    with no_vmap_fallback():
        got = torch.func.vmap(fn, in_dims=dims)(*args)

    def pick(a, d, v):
        if isinstance(a, list):
            return [x if e is None else x.select(e, v) for x, e in zip(a, d)]
        return a if d is None else a.select(d, v)

    loop = [fn(*[pick(a, d, v) for a, d in zip(args, dims)]) for v in range(V)]
    if isinstance(got, torch.Tensor):
        got, loop = [got], [[o] for o in loop]
    assert len(got) == len(loop[0])
    for i, g in enumerate(got):
        close(g, torch.stack([o[i] for o in loop]))
    assert sum(g.abs().sum() for g in got) > 0


RAW_NCE_OPS = [(backend, name + suffix) for backend, suffix in (("cpu", ""), ("triton", "_triton"))
               for name in ("queue_infonce", "queue_infonce_backward")] + \
    [("cpu", "queue_infonce_onepass"), ("cpu", "queue_infonce_onepass_backward")]


def raw_nce_args(name, dtype):
    """(argument names, arguments) of a raw InfoNCE op, without the temperature (0.2)."""
    q, k, queue = nce_problem(dtype)
    if "backward" not in name:
        return ["q", "k", "queue"], [q, k, queue]
    forward = getattr(torch.ops.insloc_ops, name.replace("_backward", ""))(q, k, queue, 0.2)
    grad = torch.randn(q.shape[:2], generator=torch.Generator().manual_seed(1), dtype=forward[1].dtype)
    if "onepass" in name:
        return ["grad", "q", "k", "lse", "neg_mean"], [grad, q, k, *forward[1:]]
    return ["grad", "q", "k", "queue", "lse"], [grad, q, k, queue, forward[1]]


@pytest.mark.parametrize("backend,name", [b for b in RAW_NCE_OPS if b[0] in NCE_BACKENDS])
@pytest.mark.parametrize("vmapped", ["grad", "q", "rows", "queue"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_raw_queue_infonce_ops_have_a_vmap_rule(backend, name, vmapped, dtype):
    """The raw forward and backward ops under vmap (jacrev's vjp of many cotangents, per-sample gradients,
    one queue per vmapped element): the rule's result equals one call per vmapped element, and torch's
    per-element fallback is never taken."""
    if dtype == torch.bfloat16 and (backend == "triton" or vmapped in ("q", "queue")):
        pytest.skip("bf16 covers the linear (cotangents only) and folded rules on the C++ kernels")
    names, args = raw_nce_args(name, dtype)
    chosen = {"grad": ["grad"], "q": ["q"], "rows": [n for n in names if n != "queue"], "queue": ["queue", "grad"]}
    if not set(chosen[vmapped]) & set(names) or (vmapped == "queue" and "queue" not in names):
        pytest.skip(f"{name} takes no {vmapped}")
    V = 3
    in_dims = tuple(1 if n in chosen[vmapped] else None for n in names)
    batched = [a if d is None else torch.stack([a * (1 + 0.1 * v) for v in range(V)], dim=d)
               for a, d in zip(args, in_dims)]
    op = getattr(torch.ops.insloc_ops, name)
    with no_vmap_fallback():
        got = torch.func.vmap(lambda *a: op(*a, 0.2), in_dims=in_dims)(*batched)
    loop = [op(*[a if d is None else a.select(d, v) for a, d in zip(batched, in_dims)], 0.2) for v in range(V)]
    # (the Triton kernels compute in fp32 whatever the inputs; g * J(1) and J(g) round differently there)
    tol = dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6) \
        if backend == "triton" else dict(rtol=1e-7, atol=1e-9)
    assert len(got) == len(loop[0])
    for i, g in enumerate(got):
        assert g.dtype == loop[0][i].dtype
        torch.testing.assert_close(g, torch.stack([o[i] for o in loop]), **tol)
    assert got[0].abs().sum() > 0


@pytest.mark.parametrize("transform", ["hessian", "jvp_of_grad", "grad_of_jvp", "jvp_of_jvp", "jacfwd_of_jacfwd",
                                       "fwad_over_create_graph"])
def test_queue_infonce_refuses_second_order_derivatives_it_cannot_give(transform):
    """The fused InfoNCE backward is not differentiable; each of these once returned a silently wrong value."""
    q, k, queue = nce_problem()

    def run(backend):
        scalar = nce(backend, "mean", k=k, queue=queue)
        if transform == "hessian":
            return torch.func.hessian(lambda x: scalar(x).sum())(q)
        if transform == "jvp_of_grad":
            return torch.func.jvp(torch.func.grad(lambda x: scalar(x).sum()), (q,), (q,))[1]
        if transform == "grad_of_jvp":
            return torch.func.grad(lambda x: torch.func.jvp(lambda y: scalar(y).sum(), (x,), (x.cos(),))[1])(q)
        if transform == "jvp_of_jvp":
            return torch.func.jvp(lambda x: torch.func.jvp(lambda y: scalar(y).sum(), (x,), (x.cos(),))[1],
                                  (q,), (q,))[1]
        if transform == "jacfwd_of_jacfwd":
            return torch.func.jacfwd(torch.func.jacfwd(lambda x: scalar(x).sum()))(q)
        x = q.clone().requires_grad_()
        with fwAD.dual_level():
            (g,) = torch.autograd.grad(scalar(x).sum(), x, create_graph=True)
            return fwAD.unpack_dual(fwAD.make_dual(g, torch.ones_like(g))).tangent

    assert run("reference").abs().sum() > 0
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        run("cpu")


def test_first_order_calls_keep_the_fast_path():
    """What the transforms need costs plain calls nothing: no graph without a gradient, and the eager
    autograd node (not torch.library's) with one."""
    feats, rois = roi_problem()
    out = pool("cpu", rois=rois)(*feats)
    assert out.grad_fn is None
    f = [x.clone().requires_grad_() for x in feats]
    assert type(pool("cpu", rois=rois)(*f).grad_fn).__name__ == "roi_align_multilevelBackward"
    q, k, queue = nce_problem()
    assert insloc_ops.queue_infonce(q.requires_grad_(), k, queue, 0.2, backend="cpu").grad_fn is not None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_boxes_and_queue_get_zero_derivatives_in_every_mode(backend):
    """No derivative reaches RoIAlign's boxes or InfoNCE's queue (documented): zeros from grad and jvp,
    and the features' and q's derivatives unchanged when they are taken together."""
    feats, rois = roi_problem()
    q, k, queue = nce_problem()

    def roi(r, f0):
        return pool(backend, LEVELS, r)(f0, feats[1]).square().sum()

    def loss(qq, qu):
        return insloc_ops.queue_infonce(qq, k, qu, 0.2, backend=backend)

    g_rois, g_feat = torch.func.grad(roi, argnums=(0, 1))(rois, feats[0])
    assert g_rois.abs().sum() == 0 and g_feat.abs().sum() > 0
    close(g_feat, torch.func.grad(roi, argnums=1)(rois, feats[0]))
    assert torch.func.jvp(lambda r: roi(r, feats[0]), (rois,), (torch.ones_like(rois),))[1] == 0
    g_q, g_queue = torch.func.grad(lambda a, b: loss(a, b).sum(), argnums=(0, 1))(q, queue)
    assert g_queue.abs().sum() == 0 and g_q.abs().sum() > 0
    assert torch.func.jvp(lambda b: loss(q, b), (queue,), (torch.ones_like(queue),))[1].abs().sum() == 0


def _mixed_second_orders(backend):
    """Plain autograd and torch.func mixed: each asks for a derivative of the fused InfoNCE backward or of
    its forward-mode rule (each once gave a silently wrong value or a missing tangent)."""
    q, k, queue = nce_problem()

    def loss(x, red="none"):
        return insloc_ops.queue_infonce(x, k, queue, 0.2, reduction=red, backend=backend)

    def autograd_over_jvp():
        x = q.clone().requires_grad_()
        t = torch.func.jvp(loss, (x,), (torch.ones_like(x),))[1]
        return torch.autograd.grad(t.sum() + x.sum(), x)[0]

    def grad_over_create_graph():
        def inner(y):
            (g,) = torch.autograd.grad(loss(y, "mean").sum(), y, create_graph=True)
            return g.sin().sum()
        return torch.func.grad(inner)(q)

    def fwad_over_grad():
        with fwAD.dual_level():
            g = torch.func.grad(lambda y: loss(y, "mean").sum())(fwAD.make_dual(q, torch.ones_like(q)))
            return fwAD.unpack_dual(g).tangent

    return [autograd_over_jvp, grad_over_create_graph, fwad_over_grad]


@pytest.mark.parametrize("case", range(3))
def test_queue_infonce_refuses_mixed_autograd_and_torch_func_second_orders(case):
    want = _mixed_second_orders("reference")[case]()
    assert want is not None and want.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        _mixed_second_orders("cpu")[case]()


def test_first_order_torch_func_grad_over_parameters_that_require_grad():
    """torch.func.grad over parameters that also require grad in plain autograd is first order: it works."""
    q, k, queue = nce_problem()
    lin = torch.nn.Linear(q.shape[-1], q.shape[-1]).double()

    def grads(backend):
        return torch.func.grad(lambda p: insloc_ops.queue_infonce(
            torch.func.functional_call(lin, p, (q,)), k, queue, 0.2, backend=backend).sum())(
            dict(lin.named_parameters()))
    want, got = grads("reference"), grads("cpu")
    for name in want:
        close(got[name], want[name])


def test_vmap_over_boxes_and_empty_vmaps():
    feats, rois = roi_problem()
    boxes = torch.stack([rois, rois + 0.5])
    got = torch.func.vmap(lambda r: pool("cpu", None, r)(*feats))(boxes)
    close(got, torch.stack([pool("cpu", None, r)(*feats) for r in boxes]))
    lv = torch.stack([LEVELS, 1 - LEVELS])
    got = torch.func.vmap(lambda lev: pool("cpu", lev, rois)(*feats))(lv)
    close(got, torch.stack([pool("cpu", lev, rois)(*feats) for lev in lv]))
    # boxes mapped at an outer level, features at an inner one (forward, and backward through vjp)
    f0s = torch.stack([feats[0], -2 * feats[0]])
    got = torch.func.vmap(lambda r: torch.func.vmap(lambda f: pool("cpu", LEVELS, r)(f, feats[1]))(f0s))(boxes)
    close(got, torch.stack([torch.stack([pool("cpu", LEVELS, r)(f, feats[1]) for f in f0s]) for r in boxes]))
    ct = torch.randn(3, 3, 2, 2, dtype=feats[0].dtype)  # [R, C, 2, 2]

    def vjp_of(backend, r):
        fn = torch.func.vjp(lambda f: pool(backend, LEVELS, r)(f, feats[1]), feats[0])[1]
        return torch.func.vmap(fn)(torch.stack([ct, 2 * ct]))[0]
    close(torch.func.vmap(lambda r: vjp_of("cpu", r))(boxes), torch.stack([vjp_of("reference", r) for r in boxes]))
    q, k, queue = nce_problem()
    for backend in ("reference", "cpu"):  # empty mapped dimension, empty rows
        assert torch.func.vmap(lambda f: pool(backend, None, rois)(f, feats[1]))(feats[0][None][:0]).shape == \
            (0, 2, 3, 3, 2, 2)
        assert torch.func.vmap(nce(backend, k=k[:, :0], queue=queue))(torch.stack([q[:, :0]] * 2)).shape == (2, 2, 0)
        assert torch.func.vmap(nce(backend, k=k, queue=queue))(q[None][:0]).shape == (0, 2, 3)


@pytest.mark.parametrize("name", [n for n, b in (("sample_anchor_boxes", "cpu"), ("sample_anchor_boxes_triton", "triton"))
                                  if is_available("sample_anchor_boxes", b, "cpu")])
def test_raw_anchor_op_vmaps_by_a_loop(name):
    op = getattr(torch.ops.insloc_ops, name)
    anchors = insloc_ops.grid_anchors(4, 16, (32, 64), (0.5, 1.0, 2.0))
    gt = torch.tensor([[[0.0, 0, 30, 30], [10, 20, 50, 60]], [[5.0, 5, 40, 25], [0, 0, 64, 64]]])
    with no_vmap_fallback():
        got = torch.func.vmap(lambda g: op(g, anchors, 0.3, 7))(gt)
    want = [op(g, anchors, 0.3, 7) for g in gt]
    assert len(got) == len(want[0])
    for i, g in enumerate(got):
        assert torch.equal(g, torch.stack([w[i] for w in want]))
    # and through the Python API, whose eager box checks step aside for vmapped boxes
    got = torch.func.vmap(lambda g: insloc_ops.sample_anchor_boxes(g, anchors, 0.3, seed=7))(gt)
    want = [insloc_ops.sample_anchor_boxes(g, anchors, 0.3, seed=7) for g in gt]
    for i, g in enumerate(got):
        assert torch.equal(g, torch.stack([w[i] for w in want]))
