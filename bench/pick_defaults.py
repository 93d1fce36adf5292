"""Which GPU backend each op should default to, from one GPU check's results.

    python bench/pick_defaults.py OUTDIR        # OUTDIR as written by bench/device_check.sh
    python bench/pick_defaults.py --selections  # the gpu tests' pytest processes: "NAME<tab>-k EXPRESSION" lines

Reads, in OUTDIR: gpu_tests/MODULE.SELECTION.xml and .rc (the `gpu`-marked tests, one pytest process per test
module and selection in TEST_SELECTIONS: its JUnit XML and exit status), ops.csv and bench_status.json
(bench/run_all.py). A backend qualifies for an op when
- every pytest process that ran tests concerning it (of its op's test module, and of any other module, whose gpu
  tests concern every op) finished (exit 0, 1 or 5; not stopped at its time limit, interrupted or crashed), all
  those tests passed, and at least one of its op's tests ran;
- the op's benchmark ended by itself ("ok" in bench_status.json), wrote every row a full run on CUDA writes
  (each shape and pass listed by the benchmark module's SHAPES and PASSES) for the backend and the baseline,
  and the backend's median is below the baseline's at every shape in the op's deciding pass (the one training
  runs: forward+backward; forward for the anchor op), beyond the spread at one shape at least (its 80th
  percentile below the baseline's 20th), each of those rows timed at least MIN_REPS times. Rows of the other
  passes (forward or backward alone) where it is slower are listed beside the verdict; they do not disqualify it.
Among those, the highest geometric-mean speed-up of the op's deciding pass (fused forward+backward; forward for
the anchor op) wins, unless the current default qualifies within TIE of it (then it stays); otherwise the
reference stays. Prints a markdown table and the proposed `DEFAULTS["cuda"]`
entries with the rows they rest on; it does not edit `insloc_ops/_backend.py`: a person copies the result there
and into BENCHMARKS.md. Then a table of the benchmarks' variants of a backend (impls named BACKEND-SETTING, such as
cuda-separable) against that backend's own rows, which informs and decides nothing.
"""
import argparse
import csv
import importlib
import json
import math
import os
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GPU_BACKENDS = ("cuda", "triton")
SETTINGS = "settings"  # read_tests' key for the tests of opt-in settings (concerning no backend)
# op -> (its benchmark, the baseline impl there, the deciding pass, its test module)
OPS = {
    "roi_align_multilevel": ("bench_roi_align.py", "torchvision", "fwd+bwd", "test_roi_align_kernels"),
    "sample_anchor_boxes": ("bench_anchors.py", "baseline", "forward", "test_anchor_kernels"),
    "queue_infonce": ("bench_infonce.py", "baseline", "both", "test_infonce_kernels"),
}
# A CUDA error is sticky (every later CUDA call in the process fails), so device_check.sh runs each test module's
# gpu tests as one pytest process per selection, in parallel: a faulting kernel fails only its own backend's
# tests. name -> (pytest -k expression, the backends its tests concern). -k matches case-insensitive substrings
# of the test's name (and its module's, and its markers'), as backends_named does of the name: tests of opt-in
# settings of a backend's kernels (names holding one of SETTING_WORDS: they concern no backend's default, their
# results are listed, never held against a backend), and of the others those naming only cuda, only triton, and
# the rest (naming both or neither), so each test runs in exactly one process.
SETTING_WORDS = ("separable", "pipelined")
_NOT_SETTINGS = " and ".join(f"not {w}" for w in SETTING_WORDS)
TEST_SELECTIONS = {
    "cuda": (f"cuda and not triton and {_NOT_SETTINGS}", ("cuda",)),
    "triton": (f"triton and not cuda and {_NOT_SETTINGS}", ("triton",)),
    "common": (f"((cuda and triton) or (not cuda and not triton)) and {_NOT_SETTINGS}", GPU_BACKENDS),
    "settings": (" or ".join(SETTING_WORDS), ()),
}
# A deciding row needs this many repetitions on both sides (a --quick run's 5 decide nothing), and two qualifying
# backends whose geometric-mean speed-ups are within TIE of each other leave the current default in place.
MIN_REPS = 10
TIE = 1.05
FINISHED = ("0", "1", "5")  # pytest's exit status: all passed, some failed, no test selected


def backends_named(test_name):
    """The GPU backends a test concerns: those its name (function and parameter id) contains; all if none;
    none for a test of an opt-in setting (SETTING_WORDS)."""
    if any(w in test_name.lower() for w in SETTING_WORDS):
        return []
    return named_in(test_name) or list(GPU_BACKENDS)


def named_in(test_name):
    """The GPU backends a test's name (function and parameter id) contains."""
    return [b for b in GPU_BACKENDS if b in test_name.lower()]


def read_tests(paths, results=None):
    """{(module, backend): {"passed": n, "failed": n, "skipped": n, "failures": [names], "named_passed": n}} from
    JUnit XML files; named_passed: the passed tests whose name names that backend (not tests of every backend)."""
    results = {} if results is None else results
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            module = case.get("classname", "").split(".")[-1]
            name = case.get("name", "")
            if not module:  # a module that failed to import: pytest names the module, with no class
                module = name.split(".")[-1]
            if case.find("failure") is not None or case.find("error") is not None:
                status = "failed"
            elif case.find("skipped") is not None:
                status = "skipped"
            else:
                status = "passed"
            named = named_in(name)
            for backend in backends_named(name) or [SETTINGS]:
                entry = results.setdefault((module, backend), {"passed": 0, "failed": 0, "skipped": 0, "failures": [],
                                                               "named_passed": 0})
                entry[status] += 1
                entry["named_passed"] += status == "passed" and backend in named
                if status == "failed":
                    entry["failures"].append(name)
    return results


def test_modules(folder):
    """The test modules of a gpu_tests folder: those with files there, and every op's own module."""
    found = {f.split(".")[0] for f in os.listdir(folder)} if os.path.isdir(folder) else set()
    return sorted(found | {m for *_, m in OPS.values()})


def exit_status(stem):
    """The exit status in STEM.rc (as written), or None when there is none."""
    if not os.path.exists(stem + ".rc"):
        return None
    with open(stem + ".rc") as fh:
        return fh.read().strip()


def read_test_runs(outdir):
    """(tests as read_tests, {(module, backend): [why its tests did not all finish]}) from OUTDIR/gpu_tests: each
    op's test module and every other module found there must have a finished process for every selection."""
    folder = os.path.join(outdir, "gpu_tests")
    tests, unfinished = {}, {}
    for module in test_modules(folder):
        for selection, (_, backends) in TEST_SELECTIONS.items():
            stem = os.path.join(folder, f"{module}.{selection}")
            status, why = exit_status(stem), None
            if status is None:
                why = "no exit status"
            elif status not in FINISHED:
                why = f"exit {status}" + (" (stopped at its time limit)" if status in ("124", "137") else "")
            else:
                try:
                    read_tests([stem + ".xml"], tests)
                except (OSError, ET.ParseError) as e:
                    why = f"no JUnit XML ({type(e).__name__})"
            for backend in backends if why else ():
                unfinished.setdefault((module, backend), []).append(f"{module} [{selection}] {why}")
    return tests, unfinished


def read_bench(path):
    """{(op, impl, shape, pass): (median ms, device, p20 ms, p80 ms, repetitions)} from ops.csv (the raw medians,
    not the rounded ratios). A file without the percentiles gives the median for both; without the repetitions,
    None (not checked)."""
    rows = {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if r.get("median_ms"):
                med = float(r["median_ms"])
                rows[(r["op"], r["impl"], r["shape"], r["pass"])] = (
                    med, r.get("device", ""), float(r.get("p20_ms") or med), float(r.get("p80_ms") or med),
                    int(r["reps"]) if r.get("reps") else None)
    return rows


def read_bench_status(outdir):
    """{benchmark file: how it ended, as bench/run_all.py records it ("ok" when by itself)} from
    bench_status.json ({} when absent)."""
    path = os.path.join(outdir, "bench_status.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def expected_rows(op):
    """The (shape, pass) rows a full run of the op's benchmark on CUDA writes for every implementation, in order:
    read from the benchmark module itself, whose loops run over the same SHAPES and PASSES."""
    bench = importlib.import_module("bench." + OPS[op][0][:-3])
    return [(shape, pass_) for shape in bench.SHAPES for pass_ in bench.PASSES]


def decide(tests, unfinished, bench, status):
    """[(op, backend, tests, [(shape, pass, speed-up, median ms, device)] of the deciding pass, [why not],
    [slower rows of the other passes])] and {op: chosen backend}."""
    from insloc_ops._backend import DEFAULTS  # the current defaults (a tie keeps them)

    table, chosen = [], {}
    op_modules = {m for *_, m in OPS.values()}
    for op, (bench_file, base_impl, deciding, module) in OPS.items():
        expected = expected_rows(op)
        best, scores = "reference", {}
        for backend in GPU_BACKENDS:
            # Its op's tests and those of modules that are no op's own (they concern every op).
            mods = sorted({m for m, b in [*tests, *unfinished]
                           if b == backend and (m == module or m not in op_modules)})
            t = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "named_passed": 0}
            for m in mods:
                for key, value in tests.get((m, backend), {}).items():
                    t[key] += value
            why = [r for m in mods for r in unfinished.get((m, backend), [])]
            if t["failed"]:
                why.append(f"{t['failed']} tests failed")
            # A test of its own: one that names it (a test naming no backend passes for every one alike).
            if not tests.get((module, backend), {}).get("named_passed"):
                why.append(f"no {module} test naming {backend} passed")
            if status.get(bench_file) != "ok":
                why.append(f"{bench_file} {status.get(bench_file, 'has no status')}")
            have = [r for r in expected if (op, backend, *r) in bench and (op, base_impl, *r) in bench]
            if len(have) < len(expected):
                why.append(f"{len(expected) - len(have)} of {len(expected)} benchmark rows missing")
            slower = [(s, p) for s, p in have if bench[(op, backend, s, p)][0] >= bench[(op, base_impl, s, p)][0]]
            if any(p == deciding for _, p in slower):
                why.append("not faster at " + ", ".join(f"{s} {p}" for s, p in slower if p == deciding))
            decisive = [(s, p) for s, p in have if p == deciding]
            few = [f"{s} {p}" for s, p in decisive for impl in (backend, base_impl)
                   if (bench[(op, impl, s, p)][4] or MIN_REPS) < MIN_REPS]
            if few:
                why.append(f"fewer than {MIN_REPS} repetitions at " + ", ".join(dict.fromkeys(few)) + " (--quick?)")
            # Faster beyond the noise somewhere: its 80th percentile below the baseline's 20th at one shape at
            # least (medians a hair apart at every shape, within the spread, are a tie, not a win).
            if decisive and not any(bench[(op, backend, s, p)][3] < bench[(op, base_impl, s, p)][2]
                                    for s, p in decisive):
                why.append("faster beyond the spread (p80 below the baseline's p20) at no shape")
            # Slower rows of the other passes (forward or backward alone) are reported, not disqualifying.
            elsewhere = [f"{s} {p}" for s, p in slower if p != deciding]
            rows = [(s, p, bench[(op, base_impl, s, p)][0] / bench[(op, backend, s, p)][0],
                     *bench[(op, backend, s, p)][:2]) for s, p in have if p == deciding]
            score = math.exp(sum(math.log(r[2]) for r in rows) / len(rows)) if rows else None
            if not why:
                scores[backend] = score
            table.append((op, backend, t, rows, why, elsewhere))
        if scores:
            best = max(scores, key=scores.get)
            # Backends within TIE of each other: the current default stays (one run's medians decide no switch).
            current = DEFAULTS["cuda"].get(op)
            if current in scores and scores[current] * TIE >= scores[best]:
                best = current
        chosen[op] = best
    return table, chosen


def render(table, chosen):
    lines = ["| op | backend | gpu tests passed / failed / skipped | deciding pass: speed-up vs baseline per shape "
             "| qualifies |", "|---|---|---|---|---|"]
    for op, backend, t, rows, why, elsewhere in table:
        speeds = ", ".join(f"{shape} {s:.2f}x" for shape, _, s, _, _ in rows) or "no benchmark row"
        note = f" (not faster at {', '.join(elsewhere)}: not the deciding pass)" if elsewhere else ""
        lines.append(f"| {op} | {backend} | {t['passed']} / {t['failed']} / {t['skipped']} | {speeds} | "
                     + ("yes" if not why else "no: " + "; ".join(why)) + note + " |")
    lines += ["", "Proposed DEFAULTS[\"cuda\"]:", ""]
    for op, backend in chosen.items():
        rows = next((r for o, b, _, r, *_ in table if o == op and b == backend), [])
        cite = "; ".join(f"{shape} {p} {ms:.3f} ms = {s:.2f}x on {dev}" for shape, p, s, ms, dev in rows)
        lines.append(f"    \"{op}\": \"{backend}\",  # " + (cite or "no GPU backend qualified"))
    failures = [(op, b, name) for op, b, t, *_ in table for name in t["failures"]]
    if failures:
        lines += ["", "Failed GPU tests:"] + [f"- {op} / {b}: {name}" for op, b, name in failures]
    return "\n".join(lines)


def variants(bench):
    """[(op, variant, shape, pass, backend ms, variant ms)]: the benchmarks' settings of a backend's kernels
    (impls named BACKEND-SETTING, e.g. cuda-separable, cuda-pipelined), beside the backend's own row."""
    out = []
    for (op, impl, shape, pass_), (ms, *_) in sorted(bench.items()):
        backend = impl.split("-")[0]
        # A deterministic setting (NAME-determ) against the backend's deterministic row.
        base = f"{backend}-determ" if impl.endswith("-determ") and impl != f"{backend}-determ" else backend
        if "-" in impl and backend in GPU_BACKENDS and (op, base, shape, pass_) in bench:
            out.append((op, impl, shape, pass_, bench[(op, base, shape, pass_)][0], ms))
    return out


def render_variants(rows):
    """Markdown: each variant against its backend's default settings (informs; decides nothing)."""
    if not rows:
        return ""
    lines = ["", "Settings of a backend's kernels against its defaults (speed-up > 1: the setting is faster):", "",
             "| op | variant | shape | pass | default ms | variant ms | speed-up |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {op} | {v} | {shape} | {p} | {base:.3f} | {ms:.3f} | {base / ms:.2f}x |"
              for op, v, shape, p, base, ms in rows]
    return "\n".join(lines)


def render_settings(outdir):
    """Markdown: per test module, its settings process (tests of opt-in settings): how it ended, and the tests
    its JUnit XML holds (passed / failed / skipped, failures by name; what ran before a stop included)."""
    folder = os.path.join(outdir, "gpu_tests")
    lines = []
    for module in test_modules(folder):
        stem = os.path.join(folder, f"{module}.{SETTINGS}")
        status = exit_status(stem)
        try:
            t = read_tests([stem + ".xml"]).get((module, SETTINGS))
        except (OSError, ET.ParseError) as e:
            t, why = None, f"no JUnit XML ({type(e).__name__})"
        else:
            why = None
        if status is None:
            lines.append(f"- {module}: no exit status")
        elif status not in FINISHED:
            lines.append(f"- {module}: did not finish (exit {status})")
        elif why:
            lines.append(f"- {module}: {why}")
        if t:
            lines.append(f"- {module}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped")
            lines += [f"  - failed: {name}" for name in t["failures"]]
    if not lines:
        return ""
    return "\n\nTests of opt-in settings (they decide no default):\n" + "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", nargs="?")
    p.add_argument("--selections", action="store_true", help="print the test selections and exit")
    args = p.parse_args(argv)
    if args.selections:
        print("\n".join(f"{name}\t{expr}" for name, (expr, _) in TEST_SELECTIONS.items()))
        return 0
    if not args.outdir:
        p.error("OUTDIR is required")
    tests_dir, ops_csv = os.path.join(args.outdir, "gpu_tests"), os.path.join(args.outdir, "ops.csv")
    missing = [f for f in (tests_dir, ops_csv) if not os.path.exists(f)]
    if missing:
        print(f"pick_defaults: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    tests, unfinished = read_test_runs(args.outdir)
    bench = read_bench(ops_csv)
    table, chosen = decide(tests, unfinished, bench, read_bench_status(args.outdir))
    print(render(table, chosen) + render_variants(variants(bench)) + render_settings(args.outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
