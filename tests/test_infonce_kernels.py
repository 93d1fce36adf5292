"""queue_infonce / enqueue_: every backend against the materialised-logits reference and F.cross_entropy."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import insloc_ops
from insloc_ops import reference
from insloc_ops._backend import is_available

CPU_BACKENDS = [b for b in ("cpu", "triton") if is_available("queue_infonce", b, "cpu")]


def make_inputs(G, N, K, D, dtype=torch.float32, queue_dtype=None, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (G,) if G else ()
    q = F.normalize(torch.randn(*shape, N, D, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(q + 0.5 * torch.randn(*shape, N, D, generator=gen, dtype=torch.float64), dim=-1)
    queue = F.normalize(torch.randn(*shape, K, D, generator=gen, dtype=torch.float64), dim=-1)
    return (q.to(device, dtype), k.to(device, dtype), queue.to(device, queue_dtype or dtype))


def cross_entropy_oracle(q, k, queue, temperature):
    """Per-row loss over explicit logits [q.k, q.queue_j ...] / T with F.cross_entropy, label 0."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, queue = q.to(dt), k.to(dt), queue.detach().to(dt)
    if q.dim() == 2:
        q, k, queue = q[None], k[None], queue[None]
    losses = []
    for g in range(q.shape[0]):
        pos = (q[g] * k[g]).sum(-1, keepdim=True)  # positive logits: N x 1
        neg = q[g] @ queue[g].t()  # negative logits: N x K
        logits = torch.cat([pos, neg], dim=1) / temperature  # N x (1 + K)
        labels = torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
    return torch.stack(losses)  # G x N


# fp16/bf16 values are exact in fp32, and every backend takes their products in fp32 (or exactly, on tensor
# cores) and sums them in fp32: the loss (and lse) of 16-bit inputs matches the float64 reference on the same
# values to fp32 accuracy (errors up to 2e-6 measured on the CPU kernel, the emulated CUDA kernels and the
# Triton interpreter), far inside this bound; a loss whose logits were rounded to 16 bits (about 1e-3 off)
# fails it. The gradients are 16-bit, and the backward rounds p to 16 bits for its dot with a 16-bit queue:
# they keep the loose bound.
LOSS_TOL_16_BIT = dict(rtol=1e-5, atol=1e-5)


def tolerances(q, queue):
    """Tolerances of the gradients (and, for fp32 and fp64 inputs, of the loss: see loss_tolerances)."""
    if q.dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-4, atol=1e-5)


def loss_tolerances(q, queue):
    """Tolerances of the loss and the lse."""
    if q.dtype in (torch.bfloat16, torch.float16):
        return LOSS_TOL_16_BIT
    return tolerances(q, queue)


def cpu_op(onepass):
    """The C++ kernel's training path (one pass over the queue) or its two-pass path (forward; backward
    re-reads the queue), called directly, as a public-API-like fn(q, k, queue, T) -> per-row loss."""
    op = torch.ops.insloc_ops.queue_infonce_onepass if onepass else torch.ops.insloc_ops.queue_infonce

    def fn(q, k, queue, temperature):
        if q.dim() == 2:
            return op(q[None], k[None], queue[None], temperature)[0][0]
        return op(q, k, queue, temperature)[0]

    return fn


CPU_PATHS = {"onepass": cpu_op(True), "twopass": cpu_op(False)}


def check_against_oracles(backend, q, k, queue, temperature, k_grad=True, tol=None, loss_tol=None):
    """Values and gradients of the public API with ``backend`` (or of a callable fn(q, k, queue, T)) vs the
    reference, run in float64 on the same input values (so the oracle's own rounding is not what is measured:
    over K = 20,011 negatives the fp32 reference's gradient is further from the exact one than the kernels'),
    and F.cross_entropy. ``tol`` (default tolerances()) bounds the gradients, and the loss too unless
    ``loss_tol`` is given; with neither, the loss gets loss_tolerances()."""
    grouped = q.dim() == 3
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_(k_grad)
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_(k_grad)
    if callable(backend):
        loss = backend(q1, k1, queue, temperature)
    else:
        loss = insloc_ops.queue_infonce(q1, k1, queue, temperature, reduction="none", backend=backend)
    expected = insloc_ops.queue_infonce(q2, k2, queue.double(), temperature, reduction="none", backend="reference")
    loss_tol = loss_tol or tol or loss_tolerances(q, queue)
    tol = tol or tolerances(q, queue)
    assert loss.shape == expected.shape == (q.shape[:-1])
    assert loss.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, expected.to(loss.dtype), **loss_tol)
    ce = cross_entropy_oracle(q, k, queue, temperature)
    torch.testing.assert_close(loss, ce if grouped else ce[0], **loss_tol)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    (loss * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad.to(q1.grad.dtype), **tol)
    if k_grad:
        torch.testing.assert_close(k1.grad, k2.grad.to(k1.grad.dtype), **tol)
    else:
        assert k1.grad is None
    assert q1.grad.dtype == q.dtype


SHAPES = [  # (G, N, K, D); G = 0 means ungrouped [N, D]
    (4, 5, 1007, 16),
    (0, 5, 1007, 16),
    (2, 1, 33, 8),
    (3, 130, 1543, 24),  # more rows than one row block, several K splits
    (2, 9, 20011, 8),  # several 512-row blocks per K split: the one-pass running max is rescaled
]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_cpu_kernel_matches_reference_and_cross_entropy(path, shape, temperature):
    q, k, queue = make_inputs(*shape)
    if path == "onepass" and shape[2] > 10000:
        # Growing norms along the queue: the running max grows block after block.
        queue = queue * torch.linspace(0.2, 3.0, shape[2], dtype=queue.dtype)[:, None]
    check_against_oracles(CPU_PATHS[path], q, k, queue, temperature)


def autograd_node_names(t):
    names, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(node.name())
            stack.extend(fn for fn, _ in node.next_functions)
    return " ".join(names)


def test_public_api_trains_with_the_one_pass_kernel_and_infers_with_the_forward_only_one():
    q, k, queue = make_inputs(2, 5, 300, 16)
    loss = insloc_ops.queue_infonce(q.clone().requires_grad_(), k, queue, 0.2, backend="cpu")
    assert "queue_infonce_onepass" in autograd_node_names(loss)
    with torch.no_grad():
        no_grad = insloc_ops.queue_infonce(q.clone().requires_grad_(), k, queue, 0.2, backend="cpu")
    torch.testing.assert_close(no_grad, loss.detach(), rtol=1e-6, atol=1e-6)
    # k alone requiring grad: the two-pass kernel (dk needs only the lse).
    loss = insloc_ops.queue_infonce(q, k.clone().requires_grad_(), queue, 0.2, backend="cpu")
    names = autograd_node_names(loss)
    assert "queue_infonce" in names and "queue_infonce_onepass" not in names


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("wants", ["q and k", "q", "k"])
def test_public_api_values_and_gradients_of_every_autograd_path(backend, wants):
    # Through insloc_ops.queue_infonce as the trainer calls it: on "cpu", q requiring grad takes the one-pass
    # kernel's autograd, k alone the two-pass one (each its own backward formula).
    G, N, K, D = (2, 5, 600, 16) if backend != "triton" else (2, 3, 70, 8)
    q, k, queue = make_inputs(G, N, K, D)
    q1, k1 = q.clone().requires_grad_("q" in wants), k.clone().requires_grad_("k" in wants)
    q2, k2 = q.double().requires_grad_("q" in wants), k.double().requires_grad_("k" in wants)
    loss = insloc_ops.queue_infonce(q1, k1, queue, 0.2, backend=backend)  # reduction="mean": [G]
    want = cross_entropy_oracle(q2, k2, queue.double(), 0.2).mean(-1)
    assert loss.shape == (G,)
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.3, 1.7])
    (loss * weights).sum().backward()
    (want * weights.double()).sum().backward()
    for got, exact, wanted in ((q1.grad, q2.grad, "q" in wants), (k1.grad, k2.grad, "k" in wants)):
        if wanted:
            torch.testing.assert_close(got, exact.float(), rtol=1e-4, atol=1e-5)
        else:
            assert got is None
    none = insloc_ops.queue_infonce(q, k, queue, 0.2, reduction="none", backend=backend)
    torch.testing.assert_close(loss.detach(), none.mean(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("queue_dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_low_precision_queue_with_fp32_queries(path, queue_dtype):
    q, k, queue = make_inputs(4, 5, 1007, 16, queue_dtype=queue_dtype)
    # The queue is upcast exactly, so fp32 tolerances hold against the reference on the same values.
    check_against_oracles(CPU_PATHS[path], q, k, queue, 0.07, tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_low_precision_everything(path, dtype):
    q, k, queue = make_inputs(2, 7, 600, 32, dtype=dtype)
    check_against_oracles(CPU_PATHS[path], q, k, queue, 0.2)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("k_grad", [True, False])
def test_cpu_kernel_gradients_with_and_without_k_grad(path, k_grad):
    q, k, queue = make_inputs(2, 5, 300, 16)
    check_against_oracles(CPU_PATHS[path], q, k, queue, 0.07, k_grad=k_grad)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_kernel_empty_queue_gives_zero_loss_and_gradient(path):
    q, k, queue = make_inputs(2, 3, 0, 8)
    q.requires_grad_()
    loss = CPU_PATHS[path](q, k, queue, 0.2)
    torch.testing.assert_close(loss, torch.zeros(2, 3))
    loss.sum().backward()
    torch.testing.assert_close(q.grad, torch.zeros_like(q))


def test_cpu_kernel_empty_batch():
    q, k, queue = make_inputs(2, 0, 50, 8)
    loss = insloc_ops.queue_infonce(q, k, queue, 0.2, backend="cpu")
    torch.testing.assert_close(loss, torch.zeros(2))
    out, lse = torch.ops.insloc_ops.queue_infonce(q, k, queue, 0.2)
    assert out.shape == lse.shape == (2, 0)
    q.requires_grad_()
    out, lse, neg_mean = torch.ops.insloc_ops.queue_infonce_onepass(q, k, queue, 0.2)
    assert out.shape == lse.shape == (2, 0) and neg_mean.shape == (2, 0, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_cpu_kernel_does_not_depend_on_thread_count():
    q, k, queue = make_inputs(3, 40, 20000, 16)
    q.requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            two = torch.ops.insloc_ops.queue_infonce(q, k, queue, 0.1)
            one = torch.ops.insloc_ops.queue_infonce_onepass(q, k, queue, 0.1)
            grads = [torch.autograd.grad(out[0].sum(), q)[0] for out in (two, one)]
            results.append([t.detach() for t in (*two, *one, *grads)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lse_output_is_the_log_sum_exp_of_all_logits():
    q, k, queue = make_inputs(2, 4, 700, 8)
    for op in [torch.ops.insloc_ops.queue_infonce] + (
            [torch.ops.insloc_ops.queue_infonce_triton] if "triton" in CPU_BACKENDS else []):
        loss, lse = op(q, k, queue, 0.07)
        ref_loss, ref_lse = reference.queue_infonce(q, k, queue, 0.07)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_fp64_gradcheck_cpu_kernel(path):
    q, k, queue = make_inputs(2, 3, 1100, 5, dtype=torch.float64)  # 3 K splits
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: CPU_PATHS[path](a, b, queue, 0.2), (q, k))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("nan_row", [0, 17])  # 0: the NaN logit comes before any finite negative one
def test_non_finite_input_gives_non_finite_loss(backend, nan_row):
    q, k, queue = make_inputs(2, 3, 100, 8)
    q[0, 1, 2] = float("nan")
    k[0, 2, 0] = float("inf")  # positive logit +-inf: loss NaN or inf
    queue[1, nan_row, 3] = float("nan")  # poisons every row of group 1
    for requires_grad in (False, True):  # on CPU: the forward-only and the one-pass training kernels
        q1 = q.clone().requires_grad_(requires_grad)
        loss = insloc_ops.queue_infonce(q1, k, queue, 0.2, reduction="none", backend=backend)
        assert not torch.isfinite(loss[0, 1]) and not torch.isfinite(loss[0, 2])
        assert not torch.isfinite(loss[1]).any()
        assert torch.isfinite(loss[0, 0])
        if requires_grad:
            loss[0, 0].backward()  # no crash; the clean row keeps a finite gradient
            assert torch.isfinite(q1.grad[0, 0]).all()


def overflow_inputs(case, N=3, K=1100, D=16):
    """Finite fp32 inputs (grouped, G = 1) whose scaled negative logits overflow to -inf in float32, which
    exp turns into 0 as exactly as in float64: "all" every negative of every row (loss 0), "first" the
    queue's first row only, for every query (the rest finite). K = 1100: several K splits on the CPU."""
    gen = torch.Generator().manual_seed(5)
    if case == "all":
        q, k, queue = torch.zeros(1, N, D), torch.zeros(1, N, D), torch.zeros(1, K, D)
        q[..., 0], k[..., 0], queue[..., 0] = 1e20, 1.0, -1e20  # q.k / T = 5e20; q.queue_j = -1e40 -> -inf
        return q, k, queue
    base = F.normalize(torch.randn(D, generator=gen), dim=0)
    q = F.normalize(base + 0.3 * torch.randn(1, N, D, generator=gen), dim=-1)  # all close to base
    k = F.normalize(q + 0.5 * torch.randn(1, N, D, generator=gen), dim=-1)
    queue = F.normalize(torch.randn(1, K, D, generator=gen), dim=-1)
    queue[0, 0] = -3e38 * base  # q.queue_0 ~ -2.7e38, finite; / 0.2 overflows
    assert bool(((q[0] @ queue[0, 0]) / 0.2 == float("-inf")).all())
    return q, k, queue


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("case", ["all", "first"])
def test_negatives_that_overflow_to_minus_inf_add_nothing(backend, case):
    # A logit of -inf adds exp(-inf) = 0: the loss stays finite and equals the float64 oracle's (once, the
    # C++ and Triton kernels' partial log-sum-exps turned a block of -inf logits into NaN).
    q, k, queue = overflow_inputs(case)
    check_against_oracles(backend, q, k, queue, 0.2)
    loss = insloc_ops.queue_infonce(q, k, queue, 0.2, reduction="none", backend=backend)
    assert torch.isfinite(loss).all() and (case != "all" or bool((loss == 0).all()))


# 1e-50: positive and finite, but the kernels scale by 1 / T in float32, where it overflows
@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf"), 1e-50])
def test_bad_temperature_is_an_error_naming_it(temperature):
    q, k, queue = make_inputs(1, 2, 10, 4)
    with pytest.raises(ValueError, match="temperature"):
        insloc_ops.queue_infonce(q, k, queue, temperature)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.insloc_ops.queue_infonce(q, k, queue, temperature)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.insloc_ops.queue_infonce_onepass(q, k, queue, temperature)
    if "triton" in CPU_BACKENDS:
        with pytest.raises(ValueError, match="temperature"):
            torch.ops.insloc_ops.queue_infonce_triton(q, k, queue, temperature)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
def test_triton_refuses_more_rows_than_its_grid_takes():
    # 65,535 blocks of 64 rows in the grid's second dimension (a GPU's limit, checked before any launch);
    # expanded views: no memory
    q = torch.zeros(1, 1, 16).expand(1, 65535 * 64 + 1, 16)
    queue = torch.zeros(1, 8, 16)
    with pytest.raises(ValueError, match="N = 4194241 rows"):
        torch.ops.insloc_ops.queue_infonce_triton(q, q, queue, 0.2)
    with pytest.raises(ValueError, match="N = 4194241 rows"):
        torch.ops.insloc_ops.queue_infonce_backward_triton(q[..., 0], q, q, queue, q[..., 0], 0.2)


def test_bad_shapes_are_errors_naming_the_argument():
    q, k, queue = make_inputs(2, 3, 10, 4)
    with pytest.raises(RuntimeError, match="queue"):
        torch.ops.insloc_ops.queue_infonce(q, k, queue[:, :, :3], 0.2)
    with pytest.raises(RuntimeError, match="k must"):
        torch.ops.insloc_ops.queue_infonce(q, k[:, :2], queue, 0.2)
    with pytest.raises(RuntimeError, match="grad_loss"):
        torch.ops.insloc_ops.queue_infonce_backward(torch.ones(2, 2), q, k, queue, torch.ones(2, 3), 0.2)
    with pytest.raises(RuntimeError, match="queue must"):
        torch.ops.insloc_ops.queue_infonce_onepass(q, k, queue[:1], 0.2)
    lse, neg_mean = torch.ones(2, 3), torch.ones(2, 3, 4)
    with pytest.raises(RuntimeError, match="neg_mean"):
        torch.ops.insloc_ops.queue_infonce_onepass_backward(torch.ones(2, 3), q, k, lse, neg_mean[:, :2], 0.2)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.insloc_ops.queue_infonce_onepass_backward(torch.ones(2, 3), q, k, lse[:1], neg_mean, 0.2)



@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_direct_op_call_checks_every_argument(backend):
    # torch.ops calls skip the Python API's checks: a backward's per-row tensors of another shape would be read
    # out of bounds, integer inputs would be computed on as floats
    fwd, bwd = (torch.ops.insloc_ops.queue_infonce_triton, torch.ops.insloc_ops.queue_infonce_backward_triton) \
        if backend == "triton" else (torch.ops.insloc_ops.queue_infonce, torch.ops.insloc_ops.queue_infonce_backward)
    q, k, queue = make_inputs(1, 64, 16, 8)
    rows = torch.zeros(1, 128)[:, :1]  # [1, 1] where [1, 64] is needed
    with pytest.raises((RuntimeError, ValueError), match="grad_loss must be \\[G, N\\]"):
        bwd(rows, q, k, queue, torch.zeros(1, 64), 0.2)
    with pytest.raises((RuntimeError, ValueError), match="lse must be \\[G, N\\]"):
        bwd(torch.ones(1, 64), q, k, queue, rows, 0.2)
    with pytest.raises((RuntimeError, ValueError), match="floating point"):
        fwd(q.long(), k.long(), queue, 0.2)
    with pytest.raises((RuntimeError, ValueError), match="dtype"):
        fwd(q, k.double(), queue, 0.2)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_queue_never_receives_a_gradient(backend):
    q, k, queue = make_inputs(2, 3, 100, 8)
    q.requires_grad_()
    queue.requires_grad_()
    insloc_ops.queue_infonce(q, k, queue, 0.2, backend=backend).sum().backward()
    assert queue.grad is None and q.grad is not None


@pytest.mark.parametrize("ptr_as_tensor", [False, True])
def test_enqueue_wraps_around(ptr_as_tensor):
    K, D = 10, 3
    queue = torch.zeros(2, K, D)
    keys = torch.arange(2 * 4 * D, dtype=torch.float32).view(2, 4, D)
    ptr = torch.tensor(8) if ptr_as_tensor else 8
    new_ptr = insloc_ops.enqueue_(queue, keys, ptr)
    assert int(new_ptr) == 2 and torch.is_tensor(new_ptr) == ptr_as_tensor
    torch.testing.assert_close(queue[:, 8:10], keys[:, :2])
    torch.testing.assert_close(queue[:, 0:2], keys[:, 2:4])
    assert (queue[:, 2:8] == 0).all()
    # Then an ungrouped queue with a batch that does not divide K, three times around.
    flat = torch.zeros(K, D)
    ptr = 0
    for step in range(5):
        batch = torch.full((7, D), float(step))
        ptr = insloc_ops.enqueue_(flat, batch, ptr)
        assert ptr == (step + 1) * 7 % K
    # After 35 writes, row j holds the step that last wrote it: writes 28..34 (step 4) hit rows 8, 9, 0..4.
    expected = torch.tensor([4, 4, 4, 4, 4, 3, 3, 3, 4, 4], dtype=torch.float32)
    torch.testing.assert_close(flat[:, 0], expected)
    # No keys: the same pointer, as a new tensor (not the caller's, which it may update in place).
    ptr = torch.tensor(3)
    same = insloc_ops.enqueue_(flat, flat[:0].clone(), ptr)
    assert int(same) == 3 and same is not ptr and same.data_ptr() != ptr.data_ptr()


def test_enqueue_rejects_a_batch_larger_than_the_queue():
    with pytest.raises(ValueError, match="keys"):
        insloc_ops.enqueue_(torch.zeros(4, 2), torch.zeros(5, 2), 0)


def test_opcheck_cpp_op():
    q, k, queue = make_inputs(2, 3, 70, 8)
    q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(torch.ops.insloc_ops.queue_infonce.default, (q, k, queue, 0.2))
    lse = torch.ops.insloc_ops.queue_infonce(q, k, queue, 0.2)[1].detach()
    torch.library.opcheck(torch.ops.insloc_ops.queue_infonce_backward.default,
                          (torch.rand(2, 3), q.detach(), k.detach(), queue, lse, 0.2))
    torch.library.opcheck(torch.ops.insloc_ops.queue_infonce_onepass.default, (q, k, queue, 0.2))
    _, lse, neg_mean = torch.ops.insloc_ops.queue_infonce_onepass(q.detach(), k.detach(), queue, 0.2)
    torch.library.opcheck(torch.ops.insloc_ops.queue_infonce_onepass_backward.default,
                          (torch.rand(2, 3), q.detach(), k.detach(), lse, neg_mean, 0.2))


@pytest.mark.parametrize("N", [3, 0])
def test_backward_fakes_give_the_kernels_contiguous_gradients_for_a_permuted_q(N):
    # q dense but permuted ([N, G, D] transposed): every kernel returns dq, dk contiguous, and so must the fake
    # kernels, or inductor asserts (or reads) the wrong strides.
    q, k, queue = make_inputs(2, N, 40, 8)
    q, k = q.transpose(0, 1).contiguous().transpose(0, 1), k.transpose(0, 1).contiguous().transpose(0, 1)
    assert N == 0 or not q.is_contiguous()  # (an empty tensor counts as contiguous whatever its strides)
    lse = torch.ops.insloc_ops.queue_infonce(q, k, queue, 0.2)[1]
    grad = torch.rand(2, N)
    cases = [(torch.ops.insloc_ops.queue_infonce_backward.default, (grad, q, k, queue, lse, 0.2))]
    _, lse1, neg_mean = torch.ops.insloc_ops.queue_infonce_onepass(q, k, queue, 0.2)
    cases.append((torch.ops.insloc_ops.queue_infonce_onepass_backward.default, (grad, q, k, lse1, neg_mean, 0.2)))
    if "triton" in CPU_BACKENDS:
        cases.append((torch.ops.insloc_ops.queue_infonce_backward_triton.default, (grad, q, k, queue, lse, 0.2)))
    for op, args in cases:
        dq, dk = op(*args)
        assert dq.is_contiguous() and dk.is_contiguous(), op
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
def test_opcheck_triton_op():
    q, k, queue = make_inputs(2, 3, 40, 8)
    q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(torch.ops.insloc_ops.queue_infonce_triton.default, (q, k, queue, 0.2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_with_backward():
    q, k, queue = make_inputs(4, 5, 200, 16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k):
        return insloc_ops.queue_infonce(q, k, queue, 0.2, backend="cpu").sum()

    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    out = step(q1, k)
    out.backward()
    ref = insloc_ops.queue_infonce(q2, k, queue, 0.2, backend="reference").sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(q1.grad, q2.grad)


# Triton through the interpreter: tiny shapes.
TRITON_SHAPES = [(4, 5, 207, 16), (0, 5, 207, 16), (2, 1, 33, 8), (1, 3, 0, 8), (2, 20, 150, 24)]


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_triton_interpreter_matches_reference(shape, temperature):
    q, k, queue = make_inputs(*shape)
    check_against_oracles("triton", q, k, queue, temperature)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_interpreter_backward_modes_and_bf16_queue(deterministic):
    q, k, queue = make_inputs(2, 5, 150, 16, queue_dtype=torch.bfloat16)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_oracles("triton", q, k, queue, 0.07, k_grad=deterministic, tol=dict(rtol=1e-4, atol=1e-5))
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_16_bit_inputs(dtype):
    # q, k and queue all 16-bit: the kernels' native 16-bit dots (fp32 accumulation), p cast to 16 bits
    # for the dq dot; bfloat16 on the CPU with fp32 operands, as Triton 3.8's interpreter gets a bfloat16
    # tl.dot wrong (triton-lang/triton#11584; the gpu tests run the native bfloat16 dots compiled).
    for shape in [(2, 5, 150, 16), (0, 3, 70, 24)]:
        q, k, queue = make_inputs(*shape, dtype=dtype)
        check_against_oracles("triton", q, k, queue, 0.2)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
def test_triton_16_bit_backward_takes_a_large_gradient_scale():
    # g / T > 65504 (a loss scaled for fp16 training, or a tiny temperature): the dq dot's 16-bit operand
    # must not be p * g / T, which overflowed to inf where p > 65504 T / g, while dq itself is finite. Here
    # g = 8192, T = 0.1 and each query's hardest negative is itself (p ~ 0.9).
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1, 2, 16, generator=gen), dim=-1)
    k = F.normalize(q + 0.7 * torch.randn(1, 2, 16, generator=gen), dim=-1)
    queue = F.normalize(torch.randn(1, 8, 16, generator=gen), dim=-1)
    queue[0, :2] = q[0]
    q, k, queue = q.half(), k.half(), queue.half()
    grads = {}
    for backend in ("triton", "cpu", "reference"):
        q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
        (insloc_ops.queue_infonce(q1, k1, queue, 0.1, reduction="none", backend=backend) * 8192).sum().backward()
        grads[backend] = (q1.grad.float(), k1.grad.float())
    for got, want in zip(grads["triton"], grads["cpu"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    torch.testing.assert_close(grads["cpu"][0], grads["reference"][0], rtol=2e-2, atol=20.0)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
@pytest.mark.parametrize("dtype,queue_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float64, torch.bfloat16), (torch.float32, torch.float64)])
def test_triton_interpreter_mixed_dtypes(dtype, queue_dtype):
    # q and queue of different dtypes: fp32 dots, each operand cast as it is loaded (fp64 before the launch).
    q, k, queue = make_inputs(2, 5, 150, 16, dtype=dtype, queue_dtype=queue_dtype)
    check_against_oracles("triton", q, k, queue, 0.2)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
def test_triton_interpreter_fresh_inputs():
    # A new shape and seed every run (in the failure message, to reproduce it): the partials, the merge
    # and the finish kernels against the reference.
    seed = int.from_bytes(os.urandom(4), "little") % 100000
    shape = (seed % 4, 1 + seed % 23, seed % 300, 8 * (1 + seed % 4))  # G = 0: ungrouped
    q, k, queue = make_inputs(*shape, seed=seed)
    try:
        check_against_oracles("triton", q, k, queue, (0.07, 0.2)[seed % 2])
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, shape {shape}: {e}") from e


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter not available")
def test_the_mean_loss_hands_the_backward_op_a_contiguous_gradient(monkeypatch):
    # The GPU backends' backward ops take the per-row gradient as a contiguous [G, N] tensor; the mean's
    # gradient is one (an expanded one, as sum / N gave, costs a copy kernel per step before the op).
    from insloc_ops import _eager

    seen = []

    def grads(suffix, grad_loss, *args):
        seen.append(grad_loss.is_contiguous())
        return infonce_grads(suffix, grad_loss, *args)

    infonce_grads = _eager.infonce_grads
    monkeypatch.setattr(_eager, "infonce_grads", grads)
    q, k, queue = make_inputs(2, 5, 40, 16, seed=0)
    q.requires_grad_()
    insloc_ops.queue_infonce(q, k, queue, 0.2, backend="triton").sum().backward()
    assert seen == [True] and q.grad is not None


# GPU: fresh random inputs; the caching allocator is first filled with NaN so that an output element a
# kernel forgets to write shows up (the ops allocate their own outputs).
def _poison_cuda_cache():
    junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del junk


GPU_CASES = [  # (G, N, K, D, dtype, queue dtype)
    (4, 32, 65536, 128, torch.float32, torch.float32),
    (4, 32, 65536, 128, torch.float32, torch.bfloat16),
    (1, 256, 8192, 128, torch.bfloat16, torch.bfloat16),
    (4, 5, 1007, 16, torch.float32, torch.float32),
    (0, 1, 33, 40, torch.float32, torch.float16),
    (2, 130, 3000, 64, torch.float16, torch.float16),
    (2, 3, 0, 8, torch.float32, torch.float32),
    (2, 7, 500, 32, torch.float64, torch.float64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_gpu_backends_match_reference(backend, case, temperature):
    G, N, K, D, dtype, queue_dtype = case
    for seed in range(2):
        q, k, queue = make_inputs(G, N, K, D, dtype=dtype, queue_dtype=queue_dtype, device="cuda", seed=seed)
        _poison_cuda_cache()
        low = torch.bfloat16 in (dtype, queue_dtype) or torch.float16 in (dtype, queue_dtype)
        tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-4, atol=1e-4)
        # The loss of 16-bit q: tensor cores multiply the fp16/bf16 operands (TF32-exact in the CUDA kernels)
        # exactly and add in fp32, so it keeps fp32 accuracy: the vectors are unit, each logit is off by a
        # few fp32 roundings of at most 1 / T (under 2e-5 even at D = 128, T = 0.07, if every MMA step
        # truncated). Not yet seen on a GPU, so 1e-4 here (10x under the ~1e-3 of logits rounded to 16 bits)
        # rather than the CPU's 1e-5: a tolerance too tight would disqualify a correct kernel. Gradients
        # stay loose.
        loss_tol = dict(rtol=1e-4, atol=1e-4) if dtype in (torch.bfloat16, torch.float16) else tol
        check_against_oracles(backend, q, k, queue, temperature, tol=tol, loss_tol=loss_tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_non_finite_and_k_without_grad(backend):
    q, k, queue = make_inputs(2, 3, 100, 8, device="cuda")
    check_against_oracles(backend, q, k, queue, 0.2, k_grad=False, tol=dict(rtol=1e-4, atol=1e-4))
    q[0, 1, 2] = float("nan")
    loss = insloc_ops.queue_infonce(q, k, queue, 0.2, reduction="none", backend=backend)
    assert not torch.isfinite(loss[0, 1]) and torch.isfinite(loss[1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_backward_matches_atomic(backend):
    # The default backward adds split partials with atomics; the deterministic one sums them in order,
    # and is bitwise repeatable.
    q, k, queue = make_inputs(4, 32, 20000, 128, device="cuda")
    q.requires_grad_()
    loss = insloc_ops.queue_infonce(q, k, queue, 0.07, backend=backend)
    (atomic,) = torch.autograd.grad(loss.sum(), q)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            loss = insloc_ops.queue_infonce(q, k, queue, 0.07, backend=backend)
            runs.append(torch.autograd.grad(loss.sum(), q)[0])
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(atomic, runs[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_gpu_triton_fp32_dot_precision(allow_tf32, queue_dtype):
    """fp32 q on tensor cores: TF32x3 (the default) is as accurate as an fp32 matmul; TF32, where torch
    allows it, within TF32's rounding. On these inputs, with the dots' operands rounded on the CPU and
    summed in fp64, the largest loss error against fp64 is 1.3e-4 for TF32 and 3e-8 for TF32x3 (1.5e-8
    for fp32), so the TF32x3 bound below (2e-5, room for fp32 sums) fails if plain TF32 ran instead.
    Plain TF32 on the tensor cores cuts the operands' mantissas (round toward zero) rather than rounding
    them: emulated so on the CPU, the loss error is 1.27e-3 with an fp32 queue (7.2e-4 with bf16) and the
    dq error 8.6e-4; an H200 gave 1.27e-3 (2026-11-27). The TF32 bounds leave twice that."""
    q, k, queue = make_inputs(4, 32, 65536, 128, queue_dtype=queue_dtype, device="cuda")
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    exact = insloc_ops.queue_infonce(q64, k64, queue.double(), 0.07, reduction="none", backend="reference")
    (exact_dq,) = torch.autograd.grad(exact.sum(), q64)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        q1 = q.clone().requires_grad_()
        loss = insloc_ops.queue_infonce(q1, k, queue, 0.07, reduction="none", backend="triton")
        (dq,) = torch.autograd.grad(loss.sum(), q1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    loss_tol = dict(rtol=0, atol=2.5e-3) if allow_tf32 else dict(rtol=0, atol=2e-5)
    torch.testing.assert_close(loss.double(), exact.detach(), **loss_tol)
    dq_tol = dict(rtol=2e-2, atol=2e-3) if allow_tf32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dq.double(), exact_dq, **dq_tol)


@pytest.mark.gpu
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tc", ["1", "0"], ids=["tc", "cudacores"])
def test_gpu_cuda_fp32_precision(tc, queue_dtype, monkeypatch):
    """The CUDA C++ kernels with fp32 q: on tensor cores (WMMA TF32x3, the default on sm_80+ for D % 16 ==
    0) as on CUDA cores (INSLOC_OPS_CUDA_INFONCE_TC=0), as accurate as fp32; plain TF32 would fail the
    loss bound (see test_gpu_triton_fp32_dot_precision)."""
    monkeypatch.setenv("INSLOC_OPS_CUDA_INFONCE_TC", tc)
    q, k, queue = make_inputs(4, 32, 65536, 128, queue_dtype=queue_dtype, device="cuda")
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    exact = insloc_ops.queue_infonce(q64, k64, queue.double(), 0.07, reduction="none", backend="reference")
    exact_dq, exact_dk = torch.autograd.grad(exact.sum(), (q64, k64))
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = insloc_ops.queue_infonce(q1, k1, queue, 0.07, reduction="none", backend="cuda")
    dq, dk = torch.autograd.grad(loss.sum(), (q1, k1))
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(dq.double(), exact_dq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk.double(), exact_dk, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_pipelined_tiles_give_the_same_bits(queue_dtype, monkeypatch):
    """INSLOC_OPS_CUDA_INFONCE_PIPELINE=1 (opt-in): the tensor-core kernels with register-prefetched queue
    tiles compute the same products in the same order, so loss and gradients (deterministic backward) equal
    the default kernels' bitwise, at the InsLoc shape."""
    if not is_available("queue_infonce", "cuda", "cuda"):
        pytest.skip("cuda kernel not available")
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs each run
    q, k, queue = make_inputs(4, 32, 65536, 128, queue_dtype=queue_dtype, device="cuda", seed=seed)
    results = []
    for pipeline in ("0", "1"):
        monkeypatch.setenv("INSLOC_OPS_CUDA_INFONCE_PIPELINE", pipeline)
        q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
        torch.use_deterministic_algorithms(True)
        try:
            loss = insloc_ops.queue_infonce(q1, k1, queue, 0.07, reduction="none", backend="cuda")
            results.append((loss.detach(), *torch.autograd.grad(loss.sum(), (q1, k1))))
        finally:
            torch.use_deterministic_algorithms(False)
    for a, b in zip(*results):
        assert torch.equal(a, b), f"seed {seed}"


# Each way torch has of asking for TF32 matmuls (set in a fresh process: these are process-wide settings,
# and mixing the legacy and newer APIs makes torch refuse to read the legacy flag), and whether the Triton
# InfoNCE then takes TF32 (True) or TF32x3 (False) for fp32 dots.
TF32_SETTINGS = {
    "default": ("", False),
    "allow_tf32": ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    "float32_matmul_precision": ("torch.set_float32_matmul_precision('high')", True),
    "matmul_fp32_precision_tf32": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    "backends_fp32_precision_tf32": ("torch.backends.fp32_precision = 'tf32'", True),
    "matmul_fp32_precision_ieee": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
                                   "torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
}


@pytest.mark.slow  # a fresh process per setting
@pytest.mark.parametrize("setting", TF32_SETTINGS)
def test_triton_reads_every_tf32_setting(setting):
    pytest.importorskip("triton")
    code, expected = TF32_SETTINGS[setting]
    if "fp32_precision" in code and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision setting")
    script = "\n".join(["import torch", code, "from insloc_ops.triton.infonce import tf32_matmuls_allowed",
                        "print(tf32_matmuls_allowed())"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(expected)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grad_loss", "lse"])
def test_gpu_backward_refuses_rows_on_another_device(name):
    # A direct call: the dispatcher picks the CUDA kernel, which would read a CPU pointer on the GPU.
    q, k, queue = make_inputs(2, 3, 100, 8, device="cuda")
    args = dict(grad_loss=torch.ones(2, 3, device="cuda"), q=q, k=k, queue=queue,
                lse=torch.ops.insloc_ops.queue_infonce(q, k, queue, 0.2)[1])
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} must be on q's device"):
        torch.ops.insloc_ops.queue_infonce_backward(*args.values(), 0.2)


@pytest.mark.gpu
def test_gpu_enqueue_wraps_around():
    queue = torch.zeros(2, 10, 3, device="cuda")
    keys = torch.randn(2, 4, 3, device="cuda")
    ptr = insloc_ops.enqueue_(queue, keys, torch.tensor(8, device="cuda"))
    assert int(ptr) == 2
    torch.testing.assert_close(queue[:, [8, 9, 0, 1]], keys)


@pytest.mark.parametrize("which", ["q", "k"])
def test_fused_backward_refuses_second_order_gradients(which):
    """create_graph=True through a fused backend raises instead of returning detached gradients (a gradient
    penalty would silently lose its second-order term); the reference differentiates twice."""
    q, k, queue = make_inputs(2, 5, 300, 16, dtype=torch.float64)
    x = (q if which == "q" else k).clone().requires_grad_()
    args = (x, k, queue) if which == "q" else (q, x, queue)
    loss = insloc_ops.queue_infonce(*args, 0.2, backend="reference").sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad
    public = lambda *a: insloc_ops.queue_infonce(*a, reduction="none", backend="cpu")  # noqa: E731
    for path in (*CPU_PATHS.values(), public):  # the registered ops' autograd, and the public API's (eager)
        with pytest.raises(RuntimeError, match="no second-order gradients"):
            torch.autograd.grad(path(*args, 0.2).sum(), x, create_graph=True)
    # Without create_graph the fused gradient is the reference's.
    (fused,) = torch.autograd.grad(insloc_ops.queue_infonce(*args, 0.2, backend="cpu").sum(), x)
    torch.testing.assert_close(fused, g.detach())
