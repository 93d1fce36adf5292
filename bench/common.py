"""Shared benchmark machinery: timing (median of many), peak extra memory, environment, CSV rows.

Every op benchmark compares the fused op and its baseline side by side in one run and appends rows
(one per implementation x shape x pass) to a CSV that names the device and the versions.
"""
import contextlib
import csv
import datetime
import os
import platform
import random
import statistics
import subprocess
import time

import torch

FIELDS = ["op", "shape", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mb",
          "speedup_vs_baseline", "device", "torch", "triton", "cuda", "date", "torchvision", "revision", "time",
          "settings"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _revision():
    """The git commit of this checkout (short), with "-dirty" when tracked files differ from it; "" outside git."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--"], timeout=10).returncode != 0
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device=None):
    """What a row was measured on and with: the device the benchmark ran on (``device``: a GPU's name, a CPU's
    model and threads; None: the first GPU if there is one), versions (torchvision: the baselines' library;
    cuda empty for a CPU row), the commit, the date, and the time the run started (which tells one run's rows
    from another's in an appended file)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except Exception:
        torchvision_version = ""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} {_cpu_model()} x{torch.get_num_threads()} threads"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "cuda": (torch.version.cuda or "") if on_gpu else "", "date": now.date().isoformat(),
            "torchvision": torchvision_version,
            "revision": _revision(), "time": now.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device):
    """Wall time of one ``fn()`` in ms: CUDA events around it on a GPU, perf_counter on a CPU."""
    if torch.device(device).type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(times):
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else times * 4
    return statistics.median(times), q[0], q[-1], len(times)


def time_ms(fn, device, reps=50, warmup=5, max_seconds=10.0):
    """Median, 20th and 80th percentile wall time of ``fn()`` in ms (CUDA events on a GPU), and the count."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        times.append(_time_once(fn, device))
        if time.perf_counter() - start_all > max_seconds and len(times) >= 5:
            break
    return _summary(times)


def time_interleaved(entries, device, reps=50, warmup=5, max_seconds=10.0):
    """Times implementations of one computation in alternation, for side-by-side comparisons.

    ``entries``: [(key, fn, context)], ``context`` None or a callable returning a context manager entered
    around each call (settings an implementation needs, such as environment variables), outside the timed
    region. Each round times every entry once, in an order shuffled per round (seeded: the same in every run),
    so that a drift of the machine during the run (clocks, temperature, other load) falls on all of them alike
    instead of on whichever was timed last, and none always follows the same one. Rounds stop after ``reps``, or
    once ``max_seconds`` have passed and each entry has at least 5 times. Returns {key: (median, p20, p80, count)}
    as time_ms.
    """
    entries = [(key, fn, context or contextlib.nullcontext) for key, fn, context in entries]
    for _, fn, context in entries:
        with context():
            for _ in range(warmup):
                fn()
            _sync(device)
    times = {key: [] for key, _, _ in entries}
    start_all = time.perf_counter()
    order = random.Random(0)
    for r in range(reps):
        for i in order.sample(range(len(entries)), len(entries)):
            key, fn, context = entries[i]
            with context():
                times[key].append(_time_once(fn, device))
        if time.perf_counter() - start_all > max_seconds and r + 1 >= 5:
            break
    return {key: _summary(t) for key, t in times.items()}


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

    def __init__(self, op, path=None, device=None):
        self.op = op
        self.env = environment(device)
        self.rows = []
        self.path = path
        self.written = 0
        self._fields = {}  # path -> the columns of the file, once read or written

    def add(self, shape, impl, pass_, timing, peak_mb=None, baseline_ms=None, settings=""):
        """One row. ``settings``: what the implementation ran with beyond its name (backends, switches)."""
        med, p20, p80, reps = timing
        row = {"op": self.op, "shape": shape, "impl": impl, "pass": pass_, "median_ms": f"{med:.4f}",
               "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}", "reps": reps,
               "peak_extra_mb": "" if peak_mb is None else f"{peak_mb:.3f}",
               "speedup_vs_baseline": "" if baseline_ms is None else f"{baseline_ms / med:.2f}", **self.env,
               "settings": settings}
        self.rows.append(row)
        print(f"{self.op:22s} {shape:18s} {impl:12s} {pass_:9s} {med:10.3f} ms"
              + (f"  x{baseline_ms / med:5.2f}" if baseline_ms is not None else "")
              + (f"  peak {peak_mb:9.3f} MB" if peak_mb is not None else ""), flush=True)
        if self.path:
            self.write(self.path)
        return row

    def write(self, path):
        """Appends the rows not yet written to ``path``. A file whose columns do not start with FIELDS (an older
        version's) is rewritten first with FIELDS, its rows kept (columns it lacks left empty, others kept at
        the end)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fields = self._fields.get(path)  # known once this recorder has written to the file
        if fields is None and os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as fh:
                fields = next(csv.reader(fh), [])
            if fields[:len(FIELDS)] != FIELDS:
                with open(path, newline="") as fh:
                    old_rows = list(csv.DictReader(fh))
                fields = FIELDS + [f for f in fields if f not in FIELDS]
                try:
                    with open(path + ".tmp", "w", newline="") as fh:
                        w = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
                        w.writeheader()  # (a row longer than its header loses its unnamed cells)
                        w.writerows(old_rows)
                    os.replace(path + ".tmp", path)
                finally:
                    if os.path.exists(path + ".tmp"):
                        os.remove(path + ".tmp")
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields or FIELDS, restval="")
            if fields is None:
                w.writeheader()
            w.writerows(self.rows[self.written:])
        self._fields[path] = fields or FIELDS
        self.written = len(self.rows)


@contextlib.contextmanager
def environ(changes=None):
    """os.environ updated with ``changes`` for the block (the CUDA kernels read their settings per call); a value
    None removes the variable for the block."""
    before = {k: os.environ.get(k) for k in changes or {}}
    for k, v in (changes or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
