"""MoCo's InfoNCE against a queue of negatives, without materialising the N x K logits, and the queue."""
import math
from numbers import Real

import torch

from . import reference
from ._backend import select
from . import _eager

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The smallest temperature: the kernels scale by 1 / temperature in float32, which must stay finite
# (csrc/common/infonce_args.h has the same bound).
MIN_TEMPERATURE = 1e-38


def _check(q, k, queue, temperature):
    for name, t in (("q", q), ("k", k), ("queue", queue)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
            raise ValueError(f"{name} must be a 2-D or 3-D (grouped) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if queue.dim() != q.dim():
        raise ValueError(f"queue must be {'[G, K, D]' if q.dim() == 3 else '[K, D]'} to match q "
                         f"{tuple(q.shape)}, got {tuple(queue.shape)}")
    if queue.shape[-1] != q.shape[-1]:
        raise ValueError(f"queue feature dim must be q's D={q.shape[-1]}, got {queue.shape[-1]}")
    if q.dim() == 3 and queue.shape[0] != q.shape[0]:
        raise ValueError(f"queue must have q's G={q.shape[0]} groups, got {queue.shape[0]}")
    if k.device != q.device or queue.device != q.device:
        raise ValueError(f"q, k and queue must be on one device, got {q.device}, {k.device}, {queue.device}")
    if not isinstance(temperature, Real) or isinstance(temperature, bool) or \
            not MIN_TEMPERATURE <= temperature < math.inf:
        # (compares, not math.isfinite: torch.compile traces a changing float as a symbol, which only compares)
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE} (1 / temperature must be a "
                         f"finite float32), got {temperature!r}")


def queue_infonce(q, k, queue, temperature, *, reduction="mean", backend=None):
    """InfoNCE of queries against their positive keys and a queue of negatives.

    q, k: [N, D] or grouped [G, N, D]; queue: [K, D] or [G, K, D] (one row per negative, each group its
    own queue). loss_i = logsumexp([q_i.k_i, q_i.queue_j ...] / T) - q_i.k_i / T, accumulated in fp32.
    reduction "mean" -> [] or [G] (an empty batch gives 0); "none" -> [N] or [G, N]. Gradients flow to q
    and k (where they require grad), never to the queue.

    Nothing of size N x K is allocated by the fused backends. The C++ CPU kernel, when q requires grad,
    also accumulates sum_j p_ij queue_j (G x N x D) in the same pass over the queue, so its backward does
    not read the queue again; otherwise (and on the GPU backends) the backward recomputes the logits from
    the saved log-sum-exp.
    """
    _check(q, k, queue, temperature)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    grouped = q.dim() == 3
    if not grouped:
        q, k, queue = q.unsqueeze(0), k.unsqueeze(0), queue.unsqueeze(0)
    which = select("queue_infonce", q.device, backend)
    if which == "reference":
        loss, _ = reference.queue_infonce(q, k, queue.detach(), float(temperature))
    elif which == "cpu" and q.requires_grad and torch.is_grad_enabled() and not _eager.has_tangent(q, k):
        # Training on CPU: one pass over the queue yields the loss and what dq needs (see the C++ kernel);
        # torch.compile traces the op through its registered autograd.
        args = (q, k, queue.detach(), float(temperature))
        if torch.compiler.is_compiling():
            loss = torch.ops.insloc_ops.queue_infonce_onepass(*args)[0]
        else:
            loss = _eager.apply(_eager.queue_infonce_onepass, *args)[0]
    else:
        suffix = "_triton" if which == "triton" else ""
        if _eager.use_eager_autograd(q, k):
            loss, _ = _eager.apply(_eager.queue_infonce, suffix, q, k, queue.detach(), float(temperature))
        else:
            op = getattr(torch.ops.insloc_ops, "queue_infonce" + suffix)
            loss, _ = _eager.call_op(op, q, k, queue.detach(), float(temperature))
    if reduction == "mean":
        # [G]. mean: one kernel each way, and its gradient comes back contiguous, so the backward op gets it
        # without a copy (sum / N took two kernels forward, and handed back an expanded gradient).
        loss = loss.mean(-1) if q.shape[1] else loss.sum(-1)  # an empty batch gives 0, not nan
    return loss if grouped else loss.squeeze(0)


def _may_self_overlap(t):
    """False when no two elements of t share memory: sorted by stride, each dimension steps past the whole
    extent of the smaller ones (every dense or sliced layout); True otherwise (then it may overlap)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    extent = 0  # elements spanned by the dimensions so far, minus one
    for st, n in dims:
        if st <= extent:
            return True
        extent += st * (n - 1)
    return False


def _may_share_memory(a, b):
    """True when a and b lie in one storage with intersecting byte ranges."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or \
            a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.storage_offset() * t.element_size()
        last = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape))
        return lo, lo + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def enqueue_(queue, keys, ptr):
    """Writes ``keys`` ([N, D] or [G, N, D]) into the ring buffer ``queue`` ([K, D] or [G, K, D]) in
    place, starting at row ``ptr`` and wrapping around; returns the new pointer ``(ptr + N) % K`` (an int,
    or a tensor if ``ptr`` is one, so that no device sync is needed)."""
    if not isinstance(queue, torch.Tensor) or queue.dim() not in (2, 3):
        raise ValueError(f"queue must be [K, D] or [G, K, D], got {getattr(queue, 'shape', queue)!r}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != queue.dim():
        raise ValueError(f"keys must have queue's rank {queue.dim()}, got {getattr(keys, 'shape', keys)!r}")
    if keys.shape[-1] != queue.shape[-1] or keys.shape[:-2] != queue.shape[:-2]:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queue {tuple(queue.shape)}")
    if keys.shape[-2] > queue.shape[-2]:
        raise ValueError(f"keys holds {keys.shape[-2]} rows, more than the queue's K={queue.shape[-2]}")
    if keys.device != queue.device:
        raise ValueError(f"keys is on {keys.device} but queue is on {queue.device}")
    if queue.dtype not in _FLOATS or keys.dtype not in _FLOATS:
        raise ValueError(f"queue and keys must be float32, float16, bfloat16 or float64, got {queue.dtype} and "
                         f"{keys.dtype}")
    if any(st == 0 and n > 1 for st, n in zip(queue.stride(), queue.shape)):
        raise ValueError("queue must not be an expanded view (a stride of 0): its rows would share memory")
    if _may_self_overlap(queue):
        raise ValueError(f"queue's elements must not overlap in memory, got strides {tuple(queue.stride())} for "
                         f"shape {tuple(queue.shape)}")
    if not torch.compiler.is_compiling() and _may_share_memory(queue, keys):  # (a tracer has no storage address)
        raise ValueError("keys must not share memory with queue (pass a copy: keys.clone())")
    if torch.is_tensor(ptr):
        if ptr.dim() != 0 or ptr.dtype != torch.int64:
            raise ValueError(f"ptr must be an int or a 0-dim int64 tensor, got {ptr!r}")
        if ptr.device.type == "cpu" and not torch.compiler.is_compiling() and \
                not 0 <= int(ptr) < max(queue.shape[-2], 1):  # (a CPU value: no device sync)
            raise ValueError(f"ptr must lie in [0, {queue.shape[-2]}), got {int(ptr)}")
    elif not isinstance(ptr, int) or isinstance(ptr, bool) or not 0 <= ptr < max(queue.shape[-2], 1):
        raise ValueError(f"ptr must be an int in [0, {queue.shape[-2]}), got {ptr!r}")
    return reference.enqueue_(queue, keys, ptr)
