"""Shared benchmark machinery: timing (median of many), peak extra memory, environment, CSV rows.

Every op benchmark compares the fused op and its baseline side by side in one run and appends rows
(one per implementation x shape x pass) to a CSV that names the device and the versions.
"""
import contextlib
import csv
import datetime
import os
import platform
import statistics
import time

import torch

FIELDS = ["op", "shape", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb",
          "speedup_vs_baseline", "device", "torch", "triton", "cuda", "date"]


def environment():
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "", "date": datetime.date.today().isoformat()}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps=50, warmup=5, max_seconds=10.0):
    """Median, 20th and 80th percentile wall time of ``fn()`` in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 5:
            break
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else times * 4
    return statistics.median(times), q[0], q[-1], len(times)


def peak_extra_mb(fn, device):
    """Peak memory allocated while ``fn()`` runs, above what was allocated before it, in MB.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events (every tensor
    allocation and free, including those inside C++ kernels), accumulated in time order.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20


class Recorder:
    """Collects rows, prints a compact table and writes them to CSV (appending). Given ``path``, each row
    is appended as it is measured, so a benchmark stopped part-way keeps what it measured."""

    def __init__(self, op, path=None):
        self.op = op
        self.env = environment()
        self.rows = []
        self.path = path
        self.written = 0

    def add(self, shape, impl, pass_, timing, peak_mb=None, baseline_ms=None):
        med, p20, p80, reps = timing
        row = {"op": self.op, "shape": shape, "impl": impl, "pass": pass_, "median_ms": f"{med:.4f}",
               "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}", "reps": reps,
               "peak_extra_mb": "" if peak_mb is None else f"{peak_mb:.3f}",
               "speedup_vs_baseline": "" if baseline_ms is None else f"{baseline_ms / med:.2f}", **self.env}
        self.rows.append(row)
        print(f"{self.op:22s} {shape:18s} {impl:12s} {pass_:9s} {med:10.3f} ms"
              + (f"  x{baseline_ms / med:5.2f}" if baseline_ms is not None else "")
              + (f"  peak {peak_mb:9.3f} MB" if peak_mb is not None else ""), flush=True)
        if self.path:
            self.write(self.path)
        return row

    def write(self, path):
        """Appends the rows not yet written to ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(self.rows[self.written:])
        self.written = len(self.rows)


@contextlib.contextmanager
def environ(changes=None):
    """os.environ updated with ``changes`` for the block (the CUDA kernels read their settings per call)."""
    before = {k: os.environ.get(k) for k in changes or {}}
    os.environ.update(changes or {})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
