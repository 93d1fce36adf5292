"""Runs every op benchmark (fused vs baseline side by side) into one CSV and a markdown table.

    python bench/run_all.py --device cpu --out bench/results/cpu [--quick]
    python bench/run_all.py --device cuda --out OUTDIR

Each bench/bench_<op>.py is run as its own process (so one failing benchmark does not hide the others)
and appends its rows to OUT/ops.csv; the table goes to OUT/ops.md and to stdout. How each one ended goes to
OUT/bench_status.json ({"bench_roi_align.py": "ok" | "exit N" | "timed out" | "did not end" | "not run"}), written
as each starts and ends, so a run cut short leaves the unfinished ones unfinished there.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OP_BENCHMARKS = ["bench_roi_align.py", "bench_anchors.py", "bench_infonce.py"]


def markdown_table(rows):
    """One line per (op, shape, pass): each implementation's median, its speed-up over the baseline
    and its peak extra memory."""
    lines = ["| op | shape | pass | impl | median ms | speed-up vs baseline | peak extra MB | device |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['pass']} | {r['impl']} | {float(r['median_ms']):.3f} | "
                     f"{r['speedup_vs_baseline'] or '-'} | {r['peak_extra_mb'] or '-'} | {r['device']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--only", nargs="*", default=None, help="benchmark files to run (default: all)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds each benchmark may run; one that runs longer is stopped and counted as failed, "
                        "keeping the rows it measured (default: no limit)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "ops.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    names = args.only or OP_BENCHMARKS
    status = dict.fromkeys([os.path.basename(name) for name in names], "not run")

    def record(name, how):
        status[os.path.basename(name)] = how
        with open(os.path.join(args.out, "bench_status.json"), "w") as fh:
            json.dump(status, fh, indent=1)

    failures = []
    for name in names:
        record(name, "did not end")  # until it does: run_all.py itself may be stopped
        cmd = [sys.executable, os.path.join(HERE, name), "--out", csv_path]
        if args.device:
            cmd += ["--device", args.device]
        if args.quick:
            cmd.append("--quick")
        print("+", " ".join(cmd), flush=True)
        t0 = time.time()
        try:
            rc = subprocess.call(cmd, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"  {name}: stopped after {args.timeout:.0f} s (--timeout); its rows so far are kept", flush=True)
            failures.append(f"{name} (timed out)")
            record(name, "timed out")
            continue
        print(f"  {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        record(name, f"exit {rc}" if rc else "ok")
        if rc:
            failures.append(name)
    rows = []
    if os.path.exists(csv_path):
        with open(csv_path) as fh:
            rows = list(csv.DictReader(fh))
    table = markdown_table(rows)
    with open(os.path.join(args.out, "ops.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    if failures:
        print("FAILED:", ", ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
