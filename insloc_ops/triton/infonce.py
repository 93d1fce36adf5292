"""Queue InfoNCE in Triton: the main GPU path.

Forward: grid (G, N blocks, K splits); each program streams its share of the queue in BLOCK_K tiles,
logits = tl.dot(q_tile, queue_tile^T) / T, keeps an online (max, sum-exp) per row and writes one
partial per (g, n, split); one small kernel merges the [G, N, splits] partials with the positive logit.
Backward: same grid; p is recomputed per tile from the saved lse and tl.dot(p, queue_tile) is
accumulated into dq, either through per-split partials (deterministic mode) or with fp32 atomics into
one [G, N, D] buffer (default: extra memory G x N x D); one small kernel then sums the partials and adds
the positive logit's terms to dq and dk. So a pass is two Triton launches (plus the atomic buffer's
zeroing), not a dozen torch ops each launching its own kernel.
fp32 dots run on tensor cores as TF32x3 (about fp32 accuracy), or TF32 where torch allows it for matmuls
(see _dot_dtype). fp64 inputs are computed in fp32 here (results returned in fp64 as the op's contract
says); they are cast before the launch, since fp64 tiles staged in shared memory would need more of it
than an A100 has (tests/triton_aot.py measures every variant's shared memory against sm_80 and sm_90).
"""

import torch
import triton
import triton.language as tl

from . import interpreted, register_kernel
from ..infonce import MIN_TEMPERATURE

BLOCK_K = 64


@triton.jit
def _program(q_ptr, N, D, stride_qg, stride_qn,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A program's group, split, rows and columns, and its q tile [BLOCK_N, BLOCK_D]."""
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    q = tl.load(q_ptr + g.to(tl.int64) * stride_qg + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
    return g, split, rows, cols, row_ok, col_ok, q


P_SCALE = tl.constexpr(32768.0)


@triton.jit
def _logits(q, queue_ptr, g, k0, k_end, cols, col_ok, scale, stride_kg, stride_kk,
            BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Queue rows k0 .. k0 + BLOCK_K: (in range [BLOCK_K], the tile [BLOCK_K, BLOCK_D], q.tile^T / T)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < k_end
    neg = tl.load(queue_ptr + g.to(tl.int64) * stride_kg + ks.to(tl.int64)[:, None] * stride_kk + cols[None, :],
                  mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
    return k_ok, neg, tl.dot(q, tl.trans(neg), input_precision=PRECISION) * scale


@triton.jit
def _forward_partials(q_ptr, queue_ptr, m_ptr, s_ptr, N, K, D, per_split, splits, scale,
                      stride_qg, stride_qn, stride_kg, stride_kk,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    g, split, rows, cols, row_ok, col_ok, q = _program(q_ptr, N, D, stride_qg, stride_qn, BLOCK_N, BLOCK_D, DOT_DTYPE)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    k_begin = split * per_split
    k_end = tl.minimum(K, k_begin + per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok, neg, logits = _logits(q, queue_ptr, g, k0, k_end, cols, col_ok, scale, stride_kg, stride_kk,
                                    BLOCK_K, DOT_DTYPE, PRECISION)  # logits [BLOCK_N, BLOCK_K]
        logits = tl.where(k_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        # While every logit is -inf (overflowed), shift by 0: exp(-inf - -inf) would be NaN, exp(-inf) is 0.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        m = m_new
    out = (g.to(tl.int64) * N + rows) * splits + split  # (64-bit offsets: any size that fits in memory)
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)


@triton.jit
def _backward_dq(q_ptr, queue_ptr, lse_ptr, grad_ptr, dq_ptr, N, K, D, per_split, scale,
                 stride_qg, stride_qn, stride_kg, stride_kk, stride_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr):
    g, split, rows, cols, row_ok, col_ok, q = _program(q_ptr, N, D, stride_qg, stride_qn, BLOCK_N, BLOCK_D, DOT_DTYPE)
    row_offs = g.to(tl.int64) * N + rows
    lse = tl.load(lse_ptr + row_offs, mask=row_ok, other=0.0)  # [BLOCK_N]
    coef = tl.load(grad_ptr + row_offs, mask=row_ok, other=0.0).to(tl.float32) * scale  # g_i / T
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    k_begin = split * per_split
    k_end = tl.minimum(K, k_begin + per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok, neg, logits = _logits(q, queue_ptr, g, k0, k_end, cols, col_ok, scale, stride_kg, stride_kk,
                                    BLOCK_K, DOT_DTYPE, PRECISION)
        # p in [0, 1] times 2^15: in the normal range of a 16-bit dot operand down to p ~ 2e-9, and no
        # overflow (p * g / T, the scaled form, overflows fp16 once g / T > 65504, e.g. under loss scaling).
        p = tl.exp(logits - lse[:, None]) * P_SCALE
        p = tl.where(k_ok[None, :], p, 0.0)
        acc += tl.dot(p.to(DOT_DTYPE), neg, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
    acc = acc * (coef * (1.0 / P_SCALE))[:, None]  # (an exact power of two, then g_i / T once per row)
    out = dq_ptr + split.to(tl.int64) * stride_split + row_offs[:, None] * D + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def _rows(q_ptr, k_ptr, rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of q and k ([BLOCK_R, BLOCK_D], fp32) and their offsets and masks."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    cols = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (cols < D)[None, :]
    offs = r.to(tl.int64)[:, None] * D + cols[None, :]
    qv = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kv = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return r, r_ok, offs, mask, qv, kv


@triton.jit
def _forward_combine(q_ptr, k_ptr, m_ptr, s_ptr, loss_ptr, lse_ptr, rows, D, splits, scale,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per row: the positive logit q.k / T, merged with the splits' (max, sum-exp) partials into the
    log-sum-exp, and the loss lse - positive. Empty splits hold (-inf, 0) and add nothing."""
    r, r_ok, offs, mask, qv, kv = _rows(q_ptr, k_ptr, rows, D, BLOCK_R, BLOCK_D)
    pos = tl.sum(qv * kv, 1) * scale
    c = tl.arange(0, BLOCK_S)
    s_mask = r_ok[:, None] & (c < splits)[None, :]
    s_offs = r.to(tl.int64)[:, None] * splits + c[None, :]
    m = tl.load(m_ptr + s_offs, mask=s_mask, other=float("-inf"))
    s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
    top = tl.maximum(tl.max(m, 1), pos)
    top = tl.where(top == float("-inf"), 0.0, top)  # every logit -inf: lse -inf, not NaN
    total = tl.sum(s * tl.exp(m - top[:, None]), 1) + tl.exp(pos - top)
    lse = top + tl.log(total)
    tl.store(lse_ptr + r, lse, mask=r_ok)
    tl.store(loss_ptr + r, lse - pos, mask=r_ok)


@triton.jit
def _backward_finish(q_ptr, k_ptr, lse_ptr, grad_ptr, acc_ptr, dq_ptr, dk_ptr, rows, D, slots, slot_stride, scale,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq = sum of the dq slots + a k and dk = a q, with a = g / T (p_positive - 1) per row."""
    r, r_ok, offs, mask, qv, kv = _rows(q_ptr, k_ptr, rows, D, BLOCK_R, BLOCK_D)
    pos = tl.sum(qv * kv, 1) * scale
    lse = tl.load(lse_ptr + r, mask=r_ok, other=0.0)
    coef = tl.load(grad_ptr + r, mask=r_ok, other=0.0).to(tl.float32) * scale  # g / T
    a = coef * (tl.exp(pos - lse) - 1.0)
    dq = a[:, None] * kv
    p = acc_ptr + offs
    for _ in range(slots):  # slot_stride = rows * D, 64-bit when it needs to be
        dq += tl.load(p, mask=mask, other=0.0)
        p += slot_stride
    tl.store(dq_ptr + offs, dq, mask=mask)
    tl.store(dk_ptr + offs, a[:, None] * qv, mask=mask)


def _row_blocks(rows, D, splits=1):
    """(BLOCK_R, BLOCK_D, BLOCK_S, programs) of the per-row kernels: at most 4,096 elements per tile."""
    block_d = max(16, triton.next_power_of_2(D))
    block_s = max(16, triton.next_power_of_2(splits))
    block_r = max(1, min(16, 4096 // max(block_d, block_s)))
    return block_r, block_d, block_s, triton.cdiv(rows, block_r)


def _dot_dtype(q, queue):
    """(operand dtype, tl.dot input_precision) of the two dots.

    16-bit q and queue: native tensor-core dot (fp32 accumulation). Anything with fp32 (an fp32 q with a
    bf16 queue included): fp32 operands. On a GPU those go to tensor cores too: "tf32" where torch itself
    allows TF32 for matmuls (tf32_matmuls_allowed), otherwise "tf32x3" (each operand split into a TF32
    high and low part, three TF32 products: about fp32 accuracy). An "ieee" fp32 dot would run on CUDA
    cores, where the ~6 GFLOP of an InsLoc step's loss (forward and backward) take longer than reading the
    queue twice. The interpreter (CPU) computes "ieee" dots, bfloat16 ones with fp32 operands: Triton 3.8's
    interpreter multiplies a bfloat16 dot's bit patterns instead of its values (triton-lang/triton#11584)."""
    if q.dtype in (torch.float16, torch.bfloat16) and queue.dtype == q.dtype and \
            (q.dtype == torch.float16 or q.is_cuda or not interpreted()):
        return (tl.float16 if q.dtype == torch.float16 else tl.bfloat16), "ieee"
    if not q.is_cuda:
        return tl.float32, "ieee"
    return tl.float32, ("tf32" if tf32_matmuls_allowed() else "tf32x3")


def tf32_matmuls_allowed():
    """Whether torch runs fp32 CUDA matmuls in TF32, however that was asked for: the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``, or the newer
    ``torch.backends[.cuda.matmul].fp32_precision = "tf32"`` (torch 2.11 and 2.14 have it, 2.6 does not),
    after which reading ``allow_tf32`` raises instead of answering."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision  # "tf32", "ieee", or "none" (the legacy flag decides)
    except (AttributeError, RuntimeError):  # older torch: no such setting
        precision = "none"
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


MAX_GRID_Y = 65535


def _geometry(q, queue):
    G, N, D = q.shape
    K = queue.shape[1]
    block_n = max(16, min(64, triton.next_power_of_2(max(N, 1))))
    block_d = max(16, triton.next_power_of_2(D))
    n_blocks = triton.cdiv(N, block_n)
    if n_blocks > MAX_GRID_Y:  # the grid's second dimension (a GPU's limit; kept on CPU tensors alike)
        raise ValueError(f"queue_infonce (Triton): N = {N} rows is more than the grid takes ({MAX_GRID_Y} blocks "
                         f"of {block_n}); split the batch")
    # Enough programs to fill the GPU (N = 32 gives one N block per group), each a whole number of tiles.
    target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    tiles = max(1, triton.cdiv(K, BLOCK_K))
    splits = min(tiles, max(1, triton.cdiv(target, max(1, G * n_blocks))))  # G * N = 0: one
    per_split = triton.cdiv(tiles, splits) * BLOCK_K
    splits = max(1, triton.cdiv(K, per_split))
    return G, N, K, D, block_n, block_d, n_blocks, splits, per_split


def _check(q, k, queue, temperature, rows=()):
    """As the C++ ops check a direct torch.ops call; ``rows``: the backward's (name, tensor) of shape [G, N]."""
    if not (MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE} (1 / temperature must be a "
                         f"finite float32), got {temperature!r}")
    if q.dim() != 3 or k.shape != q.shape or queue.dim() != 3 or queue.shape[0] != q.shape[0] \
            or queue.shape[2] != q.shape[2]:
        raise ValueError(f"q, k must be [G, N, D] and queue [G, K, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(queue.shape)}")
    if not (q.is_floating_point() and k.dtype == q.dtype and queue.is_floating_point()):
        raise ValueError(f"q, k must be floating point of one dtype and queue floating point, got {q.dtype}, "
                         f"{k.dtype}, {queue.dtype}")
    for name, t in (("k", k), ("queue", queue)) + tuple(rows):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in rows:
        if tuple(t.shape) != tuple(q.shape[:2]):
            raise ValueError(f"{name} must be [G, N] = {list(q.shape[:2])}, got {list(t.shape)}")


def _launch_dtype(t):
    return t.float() if t.dtype == torch.float64 else t


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def queue_infonce(q, k, queue, temperature):
    _check(q, k, queue, temperature)
    G, N, K, D, block_n, block_d, n_blocks, splits, per_split = _geometry(q, queue)
    if G * N == 0:
        return q.new_empty((G, N), dtype=_acc(q)), q.new_empty((G, N), dtype=_acc(q))
    q_c, queue_c = _launch_dtype(q).contiguous(), _launch_dtype(queue.detach()).contiguous()
    m = torch.empty((G, N, splits), device=q.device, dtype=torch.float32)
    s = torch.empty_like(m)
    dot_dtype, precision = _dot_dtype(q, queue)
    _forward_partials[(G, n_blocks, splits)](
        q_c, queue_c, m, s, N, K, D, per_split, splits, 1.0 / temperature,
        q_c.stride(0), q_c.stride(1), queue_c.stride(0), queue_c.stride(1),
        BLOCK_N=block_n, BLOCK_K=BLOCK_K, BLOCK_D=block_d, DOT_DTYPE=dot_dtype, PRECISION=precision)
    # One small launch merges the partials with the positive logit (instead of a dozen torch ops, each a
    # launch of its own).
    k_c = _launch_dtype(k.detach()).contiguous()
    loss = torch.empty((G, N), device=q.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    block_r, block_d, block_s, programs = _row_blocks(G * N, D, splits)
    _forward_combine[(programs,)](q_c, k_c, m, s, loss, lse, G * N, D, splits, 1.0 / temperature,
                                  BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_S=block_s)
    return loss.to(_acc(q)), lse.to(_acc(q))


def queue_infonce_backward(grad_loss, q, k, queue, lse, temperature):
    _check(q, k, queue, temperature, (("grad_loss", grad_loss), ("lse", lse)))
    G, N, K, D, block_n, block_d, n_blocks, splits, per_split = _geometry(q, queue)
    if q.numel() == 0:
        return q.new_empty(q.shape), k.new_empty(k.shape)
    q_c, queue_c = _launch_dtype(q.detach()).contiguous(), _launch_dtype(queue.detach()).contiguous()
    lse32 = lse.detach().float().contiguous()  # G x N
    grad = grad_loss.detach().contiguous()  # G x N; the kernels scale it by 1 / T
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        dq_acc = torch.empty((splits, G, N, D), device=q.device, dtype=torch.float32)  # per-split partials
    else:
        dq_acc = torch.zeros((1, G, N, D), device=q.device, dtype=torch.float32)
    dot_dtype, precision = _dot_dtype(q, queue)
    if K > 0:
        _backward_dq[(G, n_blocks, splits)](
            q_c, queue_c, lse32, grad, dq_acc, N, K, D, per_split, 1.0 / temperature,
            q_c.stride(0), q_c.stride(1), queue_c.stride(0), queue_c.stride(1),
            dq_acc.stride(0) if deterministic else 0,
            BLOCK_N=block_n, BLOCK_K=BLOCK_K, BLOCK_D=block_d, DOT_DTYPE=dot_dtype, PRECISION=precision,
            ATOMIC=not deterministic)
    else:
        dq_acc.zero_()
    # One small launch adds the slots and the positive logit's terms and writes dq and dk in their dtypes.
    k_c = _launch_dtype(k.detach()).contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    block_r, block_d, _, programs = _row_blocks(G * N, D)
    _backward_finish[(programs,)](q_c, k_c, lse32, grad, dq_acc, dq, dk, G * N, D, dq_acc.shape[0], G * N * D,
                                  1.0 / temperature, BLOCK_R=block_r, BLOCK_D=block_d)
    return dq, dk


def register():
    register_kernel("queue_infonce_triton", queue_infonce)
    register_kernel("queue_infonce_backward_triton", queue_infonce_backward)
