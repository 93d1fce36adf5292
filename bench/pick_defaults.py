"""Which GPU backend each op should default to, from one GPU check's results.

    python bench/pick_defaults.py OUTDIR        # OUTDIR as written by bench/device_check.sh

Reads OUTDIR/gpu_tests.xml (the `gpu`-marked tests, JUnit XML), OUTDIR/gpu_tests.rc (pytest's exit status,
when device_check.sh wrote it) and OUTDIR/ops.csv (bench/run_all.py). When the tests did not run to the end
(an exit status other than 0 or 1: interrupted or stopped at their time limit), no backend qualifies. A
backend qualifies for an op when every GPU test of that op that concerns it passed (at least one ran)
and its fused forward+backward (forward for the anchor op) is at least as fast as the baseline at every
benchmarked shape; among those, the highest geometric-mean speed-up wins, otherwise the reference stays.
Prints a markdown table and the proposed `DEFAULTS["cuda"]` entries with the rows they rest on; it does
not edit `insloc_ops/_backend.py`: a person copies the result there and into BENCHMARKS.md.
"""
import argparse
import csv
import math
import os
import re
import sys
import xml.etree.ElementTree as ET

GPU_BACKENDS = ("cuda", "triton")
# op -> (test module, the benchmark passes that decide)
OPS = {
    "roi_align_multilevel": ("test_roi_align_kernels", ("fwd+bwd",)),
    "sample_anchor_boxes": ("test_anchor_kernels", ("forward",)),
    "queue_infonce": ("test_infonce_kernels", ("both",)),
}


def backends_named(test_name):
    """The GPU backends a test concerns: those named in its function name or parameter id; all if none."""
    func, _, params = test_name.partition("[")
    tokens = set(func.split("_")) | set(re.split(r"[-\[\]_,]", params))
    named = [b for b in GPU_BACKENDS if b in tokens]
    return named or list(GPU_BACKENDS)


def read_tests(path):
    """{(module, backend): {"passed": n, "failed": n, "skipped": n, "failures": [names]}}"""
    results = {}
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
        for backend in backends_named(name):
            entry = results.setdefault((module, backend), {"passed": 0, "failed": 0, "skipped": 0, "failures": []})
            entry[status] += 1
            if status == "failed":
                entry["failures"].append(name)
    return results


def read_speedups(path):
    """{(op, impl): [(shape, pass, speed-up, median ms, device)]} from ops.csv."""
    rows = {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if not r.get("speedup_vs_baseline"):
                continue
            rows.setdefault((r["op"], r["impl"]), []).append(
                (r["shape"], r["pass"], float(r["speedup_vs_baseline"]), float(r["median_ms"]), r.get("device", "")))
    return rows


def tests_finished(outdir):
    """(finished, note): whether the GPU test run went to the end, by the exit status in gpu_tests.rc."""
    path = os.path.join(outdir, "gpu_tests.rc")
    if not os.path.exists(path):
        return True, "gpu_tests.rc missing: taking the test run as finished"
    with open(path) as fh:
        status = fh.read().strip()
    if status in ("0", "1"):
        return True, None
    return False, f"the GPU tests did not finish (pytest exit status {status}): no backend qualifies"


def decide(tests, speedups, finished=True):
    """[(op, backend, verdict dict)] and {op: chosen backend}."""
    table, chosen = [], {}
    for op, (module, passes) in OPS.items():
        best, best_score = "reference", None
        for backend in GPU_BACKENDS:
            t = tests.get((module, backend), {"passed": 0, "failed": 0, "skipped": 0, "failures": []})
            rows = [r for r in speedups.get((op, backend), []) if r[1] in passes]
            verified = finished and t["passed"] > 0 and t["failed"] == 0
            wins = bool(rows) and all(s >= 1.0 for _, _, s, _, _ in rows)
            score = math.exp(sum(math.log(s) for _, _, s, _, _ in rows) / len(rows)) if rows else None
            if verified and wins and (best_score is None or score > best_score):
                best, best_score = backend, score
            table.append((op, backend, t, rows, verified, wins, score))
        chosen[op] = best
    return table, chosen


def render(table, chosen):
    lines = ["| op | backend | gpu tests passed / failed / skipped | speed-up vs baseline per shape | qualifies |",
             "|---|---|---|---|---|"]
    for op, backend, t, rows, verified, wins, score in table:
        speeds = ", ".join(f"{shape} {s:.2f}x" for shape, _, s, _, _ in rows) or "no benchmark row"
        why = "yes" if verified and wins else ("tests" if not verified else "") + (
            " and " if not verified and not wins else "") + ("speed" if not wins else "")
        lines.append(f"| {op} | {backend} | {t['passed']} / {t['failed']} / {t['skipped']} | {speeds} | "
                     f"{why if why == 'yes' else 'no (' + why + ')'} |")
    lines += ["", "Proposed DEFAULTS[\"cuda\"]:", ""]
    for op, backend in chosen.items():
        rows = next((r for o, b, _, r, _, _, _ in table if o == op and b == backend), [])
        cite = "; ".join(f"{shape} {p} {ms:.3f} ms = {s:.2f}x on {dev}" for shape, p, s, ms, dev in rows)
        lines.append(f"    \"{op}\": \"{backend}\",  # " + (cite or "no GPU backend qualified"))
    failures = [(op, b, name) for op, b, t, *_ in table for name in t["failures"]]
    if failures:
        lines += ["", "Failed GPU tests:"] + [f"- {op} / {b}: {name}" for op, b, name in failures]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir")
    args = p.parse_args(argv)
    tests_xml, ops_csv = os.path.join(args.outdir, "gpu_tests.xml"), os.path.join(args.outdir, "ops.csv")
    missing = [f for f in (tests_xml, ops_csv) if not os.path.exists(f)]
    if missing:
        print(f"pick_defaults: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    finished, note = tests_finished(args.outdir)
    table, chosen = decide(read_tests(tests_xml), read_speedups(ops_csv), finished)
    if note:
        print(f"Note: {note}.\n")
    print(render(table, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
