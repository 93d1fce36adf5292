"""The benchmark scripts still run (tiny shapes): a benchmark that rots is found here, not on a GPU."""
import contextlib
import csv
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import insloc_ops
from bench import pick_defaults, run_all

ROOT = os.path.dirname(run_all.HERE)


def test_training_step_benchmark_runs_fused_and_baseline(tmp_path):
    import bench.bench_train_step as step  # noqa: F401  (imports the trainer and the baselines)

    out = tmp_path / "step.csv"
    torch.manual_seed(0)
    step.main(["--device", "cpu", "--arch", "fpn", "c4", "--depth", "18", "--batch", "2", "--image-size", "64",
               "--queue", "16", "--steps", "1", "--warmup", "0", "--data-samples", "2",
               "--out", str(out)])
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["impl"], r["pass"]) for r in rows] == [("baseline", "step"), ("fused", "step")] * 2 + [("data", "sample")]
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert rows[1]["speedup_vs_baseline"] and rows[3]["speedup_vs_baseline"]
    # The FLOP count (torch.utils.flop_counter, through the fused ops too) that the GPU's MFU is computed from.
    assert all("TFLOP/s" in r["settings"] for r in rows[:4])
    # Every implementation's row names the same shape (rows join on it); the fused row names its backends.
    assert rows[0]["shape"] == rows[1]["shape"] == "R18-FPN b2 64px" and rows[2]["shape"] == rows[3]["shape"]
    assert "roi_align_multilevel=cpu" in rows[1]["settings"] and "=" not in rows[0]["settings"]


def test_data_pipeline_benchmark_on_imagenet_like_jpegs(tmp_path):
    import bench.bench_train_step as step
    from PIL import Image

    folder = step.imagenet_like_folder(str(tmp_path / "jpg"))
    files = sorted(os.listdir(folder))
    assert len(files) >= 20 and all(f.endswith(".jpg") for f in files)
    with Image.open(os.path.join(folder, files[0])) as im:
        assert im.format == "JPEG" and max(im.size) == 500
    out = tmp_path / "data.csv"
    step.main(["--data-only", "--data", "imagenet-like", "--image-size", "64", "--data-samples", "2", "--out", str(out)])
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["shape"], r["impl"]) for r in rows] == [("64px composite (imagenet-like)", "data")]
    assert float(rows[0]["median_ms"]) > 0


def test_markdown_table_has_a_line_per_row():
    rows = [{"op": "queue_infonce", "shape": "insloc", "pass": "both", "impl": "cpu", "median_ms": "1.5",
             "speedup_vs_baseline": "2.00", "peak_extra_mb": "0.5", "device": "CPU"}]
    table = run_all.markdown_table(rows).splitlines()
    assert len(table) == 3 and table[2] == "| queue_infonce | insloc | both | cpu | 1.500 | 2.00 | 0.5 | CPU |"


def test_a_benchmark_past_its_time_is_stopped_and_keeps_its_rows(tmp_path, capsys):
    # Rows are appended as they are measured, so a benchmark stopped by --timeout leaves what it measured.
    script = tmp_path / "bench_slow.py"
    script.write_text(
        "import argparse, sys, time\n"
        f"sys.path.insert(0, {run_all.HERE + '/..'!r})\n"
        "from bench.common import Recorder\n"
        "p = argparse.ArgumentParser(); p.add_argument('--out'); p.add_argument('--device'); p.add_argument('--quick',"
        " action='store_true')\n"
        "args = p.parse_args()\n"
        "rec = Recorder('slow_op', path=args.out)\n"
        "rec.add('tiny', 'fused', 'forward', (1.0, 0.9, 1.1, 3))\n"
        "time.sleep(60)\n"
        "rec.add('tiny', 'fused', 'backward', (2.0, 1.9, 2.1, 3))\n")
    out = tmp_path / "results"
    assert run_all.main(["--device", "cpu", "--out", str(out), "--only", str(script), "--timeout", "15"]) == 1
    with open(out / "ops.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["op"], r["pass"], r["median_ms"]) for r in rows] == [("slow_op", "forward", "1.0000")]
    assert "bench_slow.py (timed out)" in capsys.readouterr().err
    # pick_defaults.py reads how each benchmark ended from bench_status.json.
    assert json.loads((out / "bench_status.json").read_text()) == {"bench_slow.py": "timed out"}


@pytest.mark.parametrize("name", run_all.OP_BENCHMARKS)
def test_every_op_benchmark_has_the_runner_flags(name):
    with open(f"{run_all.HERE}/{name}") as fh:
        source = fh.read()
    for flag in ("--out", "--device", "--quick"):
        assert f'"{flag}"' in source, f"{name} lacks {flag}"


R, A, Q = "test_roi_align_kernels", "test_anchor_kernels", "test_infonce_kernels"
BASE_IMPL = {op: base for op, (_, base, _, _) in pick_defaults.OPS.items()}


def full_rows(speedups):
    """ops.csv rows (op, shape, impl, pass, median ms): every row a full CUDA run writes, the baseline at 2 ms and
    each (op, backend) in ``speedups`` that many times faster."""
    rows = []
    for op in pick_defaults.OPS:
        for shape, pass_ in pick_defaults.expected_rows(op):
            rows.append((op, shape, BASE_IMPL[op], pass_, 2.0))
            rows += [(op, shape, b, pass_, 2.0 / s) for (o, b), s in speedups.items() if o == op]
    return rows


def write_gpu_results(out, cases, rows, status=None, exits=None, spread=None):
    """OUT as device_check.sh leaves it: gpu_tests/MODULE.SELECTION.{xml,rc} (each case in the selection its name
    puts it in; exit 0 unless ``exits`` says otherwise), ops.csv (speed-ups rounded as bench/common.py writes them)
    and bench_status.json (every benchmark "ok" unless ``status`` says otherwise). ``spread(op, shape, impl, pass,
    ms)``: the row's (p20, p80, reps) columns (absent: no such columns, as in older files)."""
    bodies = {"passed": "", "failed": '<failure message="x">x</failure>', "skipped": '<skipped message="s"/>',
              "error": '<error message="x"/>'}
    selection_of = {tuple(bs): sel for sel, (_, bs) in pick_defaults.TEST_SELECTIONS.items()}
    modules = {R, A, Q} | {module.split(".")[-1] for module, _, _ in cases}
    files = {(m, sel): [] for m in modules for sel in pick_defaults.TEST_SELECTIONS}
    for module, name, st in cases:
        key = (module.split(".")[-1], selection_of[tuple(pick_defaults.backends_named(name))])
        classname = "" if st == "error" else f"tests.{module}"
        files[key].append(f'<testcase classname="{classname}" name="{name}">{bodies[st]}</testcase>')
    (out / "gpu_tests").mkdir(parents=True, exist_ok=True)
    for (module, sel), lines in files.items():
        (out / "gpu_tests" / f"{module}.{sel}.xml").write_text(
            '<?xml version="1.0"?><testsuites><testsuite name="pytest">' + "".join(lines) + "</testsuite></testsuites>")
        (out / "gpu_tests" / f"{module}.{sel}.rc").write_text((exits or {}).get((module, sel), "0") + "\n")
    base = {(op, shape, pass_): ms for op, shape, impl, pass_, ms in rows if impl == BASE_IMPL[op]}
    with open(out / "ops.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["op", "shape", "impl", "pass", "median_ms", "speedup_vs_baseline", "device"]
                           + (["p20_ms", "p80_ms", "reps"] if spread else []))
        w.writeheader()
        for op, shape, impl, pass_, ms in rows:
            row = {"op": op, "shape": shape, "impl": impl, "pass": pass_, "median_ms": f"{ms:.4f}",
                   "speedup_vs_baseline": f"{base.get((op, shape, pass_), 0) / ms:.2f}", "device": "NVIDIA H100"}
            if spread:
                row.update(zip(("p20_ms", "p80_ms", "reps"), spread(op, shape, impl, pass_, ms)))
            w.writerow(row)
    status = {**{name: "ok" for name, *_ in pick_defaults.OPS.values()}, **(status or {})}
    (out / "bench_status.json").write_text(json.dumps(status))


def picked(out, capsys):
    """{op: backend} that pick_defaults proposes for OUT, and its whole output."""
    assert pick_defaults.main([str(out)]) == 0
    text = capsys.readouterr().out
    return dict(re.findall(r'^    "(\w+)": "(\w+)",', text, re.M)), text


PASSING = [(R, "test_gpu_matches_reference[cuda-float32]", "passed"),
           (R, "test_gpu_matches_reference[triton-float32]", "passed"),
           (A, "test_gpu_backend_matches_reference[cuda-insloc]", "passed"),
           (A, "test_gpu_backend_matches_reference[triton-insloc]", "passed"),
           (Q, "test_gpu_backends_match_reference[triton-a]", "passed"),
           (Q, "test_gpu_backends_match_reference[cuda-a]", "passed")]
ALL_FASTER = {(op, b): 2.0 for op in pick_defaults.OPS for b in pick_defaults.GPU_BACKENDS}


def test_pick_defaults_needs_passing_tests_and_a_win_at_every_shape(tmp_path, capsys):
    assert pick_defaults.backends_named("test_gpu_matches_reference[triton-float32-nchw]") == ["triton"]
    assert pick_defaults.backends_named("test_gpu_cuda_fp32_precision[cudacores-queue_dtype0]") == ["cuda"]
    assert pick_defaults.backends_named("test_gpu_empty_inputs") == ["cuda", "triton"]
    cases = [
        *PASSING[:2],
        (A, "test_gpu_backend_matches_reference[cuda-insloc]", "failed"),  # cuda anchors: a failure
        (A, "test_gpu_backend_matches_reference[triton-insloc]", "passed"),
        (A, "test_gpu_empty_gt_boxes", "passed"),  # concerns both
        (Q, "test_gpu_backends_match_reference[triton-a]", "passed"),
        (Q, "test_gpu_backends_match_reference[cuda-a]", "skipped"),  # cuda infonce: nothing ran
    ]
    speed = {("roi_align_multilevel", "cuda"): 3.0, ("roi_align_multilevel", "triton"): 4.0,
             ("sample_anchor_boxes", "cuda"): 20.0, ("sample_anchor_boxes", "triton"): 10.0,
             ("queue_infonce", "cuda"): 5.0, ("queue_infonce", "triton"): 0.7}  # triton infonce: verified, slower
    rows = [r if r[1:4] != ("detection-7x7", "triton", "fwd+bwd") else (*r[:4], 4.0)  # triton roi: slower once
            for r in full_rows(speed)]
    write_gpu_results(tmp_path, cases, rows)
    chosen, out = picked(tmp_path, capsys)
    assert chosen == {"roi_align_multilevel": "cuda", "sample_anchor_boxes": "triton", "queue_infonce": "reference"}
    assert ('"roi_align_multilevel": "cuda",  # insloc fwd+bwd 0.667 ms = 3.00x on NVIDIA H100; insloc-bf16-cl '
            'fwd+bwd 0.667 ms = 3.00x on NVIDIA H100;') in out
    assert "not faster at detection-7x7 fwd+bwd" in out
    assert '"queue_infonce": "reference",  # no GPU backend qualified' in out
    assert "- sample_anchor_boxes / cuda: test_gpu_backend_matches_reference[cuda-insloc]" in out
    assert pick_defaults.main([str(tmp_path / "missing")]) == 2
    # A kernel test module that failed to import (pytest --continue-on-collection-errors): its op's backends
    # fail, the others are unaffected.
    write_gpu_results(tmp_path, cases + [(R, "tests.test_roi_align_kernels", "error")], rows)
    chosen, out = picked(tmp_path, capsys)
    assert chosen["roi_align_multilevel"] == "reference" and chosen["sample_anchor_boxes"] == "triton"
    assert "- roi_align_multilevel / cuda: tests.test_roi_align_kernels" in out


def test_pick_defaults_needs_a_passed_test_that_names_the_backend(tmp_path, capsys):
    # The InfoNCE test naming cuda skipped: a passed test of every backend (naming none) does not qualify cuda.
    cases = [c if c != PASSING[5] else (Q, c[1], "skipped") for c in PASSING] + [
        (Q, "test_gpu_enqueue_wraps_around", "passed")]
    write_gpu_results(tmp_path, cases, full_rows({**ALL_FASTER, ("queue_infonce", "cuda"): 3.0}))
    chosen, out = picked(tmp_path, capsys)
    assert chosen["queue_infonce"] == "triton"  # the faster cuda one has no test of its own that passed
    assert "no test_infonce_kernels test naming cuda passed" in out


def test_pick_defaults_unfinished_test_processes(tmp_path, capsys):
    write_gpu_results(tmp_path, PASSING, full_rows(ALL_FASTER))
    assert set(picked(tmp_path, capsys)[0].values()) <= set(pick_defaults.GPU_BACKENDS)
    # Stopped at its limit: cuda loses the roi op only; a crash of the module's common process loses both backends.
    write_gpu_results(tmp_path, PASSING, full_rows(ALL_FASTER), exits={(R, "cuda"): "124", (A, "common"): "139"})
    chosen, out = picked(tmp_path, capsys)
    assert chosen["roi_align_multilevel"] == "triton" and chosen["sample_anchor_boxes"] == "reference"
    assert chosen["queue_infonce"] != "reference"
    assert "test_roi_align_kernels [cuda] exit 124 (stopped at its time limit)" in out
    # A process that never reported (no .rc), and a module that concerns every op (test_api) with a failure.
    write_gpu_results(tmp_path, PASSING + [("test_api", "test_gpu_triton_ops_on_a_device_that_is_not_current",
                                            "failed")], full_rows(ALL_FASTER))
    (tmp_path / "gpu_tests" / f"{Q}.triton.rc").unlink()
    chosen, out = picked(tmp_path, capsys)
    assert set(chosen.values()) == {"cuda"}
    assert f"{Q} [triton] no exit status" in out


def test_pick_defaults_partial_benchmark_rows(tmp_path, capsys):
    # The roi benchmark stopped (or crashed) after its first shape: the rows it kept are faster, yet they are not
    # all the rows; the other ops' backends still qualify.
    rows = [r for r in full_rows(ALL_FASTER) if r[0] != "roi_align_multilevel" or r[1] == "insloc"]
    write_gpu_results(tmp_path, PASSING, rows)
    chosen, out = picked(tmp_path, capsys)
    assert chosen["roi_align_multilevel"] == "reference" and chosen["queue_infonce"] != "reference"
    assert "9 of 12 benchmark rows missing" in out
    # A fused row without its baseline row counts as missing too.
    rows = [r for r in full_rows(ALL_FASTER) if r[1:3] != ("det 200x242991", "baseline")]
    write_gpu_results(tmp_path, PASSING, rows)
    assert picked(tmp_path, capsys)[0]["sample_anchor_boxes"] == "reference"


def test_pick_defaults_failed_or_timed_out_benchmark(tmp_path, capsys):
    # Every row is there and faster, but run_all.py reported the benchmark as timed out (or failed).
    for how in ("timed out", "exit 1", "not run"):
        write_gpu_results(tmp_path, PASSING, full_rows(ALL_FASTER), status={"bench_infonce.py": how})
        chosen, out = picked(tmp_path, capsys)
        assert chosen["queue_infonce"] == "reference" and chosen["roi_align_multilevel"] != "reference"
        assert f"bench_infonce.py {how}" in out
    # No bench_status.json at all (run_all.py did not start): nothing qualifies.
    os.remove(tmp_path / "bench_status.json")
    chosen, out = picked(tmp_path, capsys)
    assert set(chosen.values()) == {"reference"} and "bench_roi_align.py has no status" in out


def test_pick_defaults_compares_raw_medians_not_rounded_ratios(tmp_path, capsys):
    # 0.999x at one row of the deciding pass: ops.csv says 1.00, the medians say slower.
    rows = [r if r[1:4] != ("moco/bfloat16", "cuda", "both") else (*r[:4], 2.0 / 0.999)
            for r in full_rows(ALL_FASTER)]
    rows = [r if r[1:4] != ("moco/float32", "cuda", "backward") else (*r[:4], 2.0) for r in rows]
    write_gpu_results(tmp_path, PASSING, rows)
    with open(tmp_path / "ops.csv") as fh:
        assert any(r["impl"] == "cuda" and r["shape"] == "moco/bfloat16" and r["pass"] == "both"
                   and r["speedup_vs_baseline"] == "1.00" for r in csv.DictReader(fh))
    chosen, out = picked(tmp_path, capsys)
    assert chosen["queue_infonce"] == "triton"
    # The reason names the deciding-pass row alone; the other pass's slower row is listed apart.
    assert ("no: not faster at moco/bfloat16 both (not faster at moco/float32 backward: not the deciding pass)"
            in out)


def test_pick_defaults_wants_a_win_beyond_the_spread_enough_repetitions_and_keeps_a_tied_default(tmp_path, capsys):
    # Every fused median 0.1 % below the baseline's, within a wide spread: a tie, no default.
    noise = {(op, b): 1.001 for op in pick_defaults.OPS for b in pick_defaults.GPU_BACKENDS}
    write_gpu_results(tmp_path, PASSING, full_rows(noise), spread=lambda *r: (0.7 * r[-1], 1.4 * r[-1], 50))
    chosen, out = picked(tmp_path, capsys)
    assert set(chosen.values()) == {"reference"}
    assert "faster beyond the spread (p80 below the baseline's p20) at no shape" in out
    # A clear win, but timed 5 times (a --quick run): decides nothing.
    write_gpu_results(tmp_path, PASSING, full_rows(ALL_FASTER), spread=lambda *r: (0.99 * r[-1], 1.01 * r[-1], 5))
    chosen, out = picked(tmp_path, capsys)
    assert set(chosen.values()) == {"reference"} and "fewer than 10 repetitions at insloc fwd+bwd" in out
    # triton 3 % ahead of cuda (the current default), both clear wins: cuda stays; 20 % ahead: triton.
    tight = lambda *r: (0.99 * r[-1], 1.01 * r[-1], 30)  # noqa: E731
    for lead, winner in ((1.03, "cuda"), (1.2, "triton")):
        speed = {**ALL_FASTER, **{(op, "triton"): 2.0 * lead for op in pick_defaults.OPS}}
        write_gpu_results(tmp_path, PASSING, full_rows(speed), spread=tight)
        chosen, _ = picked(tmp_path, capsys)
        assert set(chosen.values()) == {winner}, (lead, chosen)


def test_pick_defaults_other_passes_are_reported_not_deciding(tmp_path, capsys):
    # cuda is slower at two rows outside the deciding pass (backward alone, forward alone) and faster than
    # triton in it: it still qualifies and wins, with those rows named beside the verdict.
    speed = {**ALL_FASTER, ("queue_infonce", "cuda"): 3.0, ("roi_align_multilevel", "cuda"): 3.0}
    slow = {("moco/float32", "cuda", "backward"), ("insloc", "cuda", "forward")}
    rows = [r if r[1:4] not in slow else (*r[:4], 2.0) for r in full_rows(speed)]
    write_gpu_results(tmp_path, PASSING, rows)
    chosen, out = picked(tmp_path, capsys)
    assert chosen["queue_infonce"] == "cuda" and chosen["roi_align_multilevel"] == "cuda"
    assert "yes (not faster at moco/float32 backward: not the deciding pass)" in out
    assert "yes (not faster at insloc forward: not the deciding pass)" in out


def test_pick_defaults_lists_variants_beside_their_backend(tmp_path, capsys):
    # cuda-separable: a setting of the cuda kernels; it is compared with cuda's rows and never chosen.
    rows = full_rows(ALL_FASTER)
    rows += [("roi_align_multilevel", shape, "cuda-separable", p, 0.25) for shape, p in
             pick_defaults.expected_rows("roi_align_multilevel")]
    write_gpu_results(tmp_path, PASSING, rows)
    chosen, out = picked(tmp_path, capsys)
    assert "cuda-separable" not in chosen.values()
    assert "| roi_align_multilevel | cuda-separable | insloc | fwd+bwd | 1.000 | 0.250 | 4.00x |" in out
    assert "| queue_infonce |" not in out.split("Settings of a backend")[1]  # no variant rows there
    # A deterministic setting is compared with the backend's deterministic row.
    rows += [("roi_align_multilevel", "insloc", "cuda-determ", "fwd+bwd", 5.0),
             ("roi_align_multilevel", "insloc", "cuda-separable-determ", "fwd+bwd", 0.5)]
    write_gpu_results(tmp_path, PASSING, rows)
    _, out = picked(tmp_path, capsys)
    assert "| roi_align_multilevel | cuda-separable-determ | insloc | fwd+bwd | 5.000 | 0.500 | 10.00x |" in out


def test_pick_defaults_settings_tests_decide_no_default(tmp_path, capsys):
    # A failing test of an opt-in setting (its name says "separable") is listed, and cuda still qualifies.
    assert pick_defaults.backends_named("test_gpu_cuda_separable_many_channels[7-all]") == []
    assert pick_defaults.backends_named("test_cuda_deterministic_backward[all-False-sample]") == ["cuda"]
    cases = PASSING + [(R, "test_gpu_cuda_separable_many_channels[7-all]", "failed"),
                       (Q, "test_gpu_cuda_pipelined_tiles_give_the_same_bits[q0]", "passed")]
    speed = {**ALL_FASTER, ("roi_align_multilevel", "cuda"): 3.0}  # cuda wins roi_align when it qualifies
    write_gpu_results(tmp_path, cases, full_rows(speed))
    chosen, out = picked(tmp_path, capsys)
    assert chosen["roi_align_multilevel"] == "cuda"
    assert "| roi_align_multilevel | cuda | 1 / 0 / 0 |" in out
    assert f"- {R}: 0 passed, 1 failed, 0 skipped\n  - failed: test_gpu_cuda_separable_many_channels[7-all]" in out
    assert f"- {Q}: 1 passed, 0 failed, 0 skipped" in out
    (tmp_path / "gpu_tests" / f"{R}.settings.rc").write_text("124\n")  # stopped at its limit
    (tmp_path / "gpu_tests" / f"{A}.settings.rc").unlink()
    chosen, out = picked(tmp_path, capsys)
    assert chosen["roi_align_multilevel"] == "cuda"
    assert f"- {R}: did not finish (exit 124)" in out and f"- {A}: no exit status" in out


@pytest.mark.slow
def test_gpu_test_selections_split_every_gpu_test_once():
    """device_check.sh runs the gpu tests of each module that marks any (found by grep) as one pytest process per
    selection: every collected gpu test must land in exactly one, the one its name's backends give."""
    def collect(*args):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "-m", "gpu", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
        return [line for line in proc.stdout.splitlines() if "::" in line]

    everything = collect()
    marked = subprocess.run(["grep", "-l", r"pytest\.mark\.gpu", *glob.glob(os.path.join(ROOT, "tests", "test_*.py"))],
                            capture_output=True, text=True).stdout.split()
    assert {n.split("::")[0] for n in everything} == {os.path.relpath(p, ROOT) for p in marked}
    seen = []
    for name, (expr, backends) in pick_defaults.TEST_SELECTIONS.items():
        selected = collect("-k", expr)
        assert all(pick_defaults.backends_named(n.split("::")[-1]) == list(backends) for n in selected), name
        seen += selected
    assert sorted(seen) == sorted(everything) and len(everything) > 100


@pytest.mark.parametrize("script", run_all.OP_BENCHMARKS + ["bench_train_step.py", "run_all.py", "pick_defaults.py",
                                    "bench_host.py", "profile_ops.py"])
def test_benchmark_scripts_start_as_scripts(script, tmp_path):
    # As `python bench/<script>` from another folder: sys.path is then a user's, not pytest's (which puts
    # tests/ on it, so a benchmark importing a test module that imports conftest works only here).
    proc = subprocess.run([sys.executable, os.path.join(run_all.HERE, script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


@pytest.mark.slow
def test_device_check_dry_run_without_a_gpu(tmp_path):
    """bench/device_check.sh end to end on the CPU (installed build, CPU benchmarks with short limits), so the
    script a GPU machine runs once has run here: every step, the limits, the summary and pick_defaults."""
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "SKIP_BUILD": "1",
           "BENCH_DEVICE": "cpu", "QUICK": "1", "DEADLINE_S": "400", "TESTS_S": "200", "BENCH_S": "15", "TRAIN_S": "8"}
    proc = subprocess.run(["bash", os.path.join(run_all.HERE, "device_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = re.search(r"gpu tests exit (\d+); benchmarks exit (\d+)", proc.stdout)
    assert summary, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert summary.group(1) == "0"
    # One pytest process per (module with gpu tests, selection), each ended by itself (5: no test selected).
    rcs = {f.name: f.read_text().strip() for f in (out / "gpu_tests").glob("*.rc")}
    assert len(rcs) == 4 * len(pick_defaults.TEST_SELECTIONS) and set(rcs.values()) <= {"0", "5"}, rcs
    # The training step (R50, batch 32) cannot finish in 8 s on a CPU: stopped, so the benchmarks count as failed.
    assert summary.group(2) == "1" and proc.returncode == 1
    env_txt = (out / "env.txt").read_text()
    assert all(f"\n{m} " in env_txt for m in ("torch", "torchvision", "pytest")), env_txt
    assert '"extension_loaded": true' in env_txt
    # Every gpu test was collected and skipped (no CUDA device), none ran.
    tests, unfinished = pick_defaults.read_test_runs(out)
    assert not unfinished
    assert {module for module, _ in tests} >= {"test_roi_align_kernels", "test_anchor_kernels", "test_infonce_kernels"}
    assert all(t["passed"] == 0 and t["failed"] == 0 and t["skipped"] > 0 for t in tests.values())
    # Each op benchmark started and then ended: by itself, or stopped at its limit keeping its rows (15 s: on a
    # loaded 2-core machine, 8 s was not always enough for one benchmark to import torch and write its first row).
    log = (out / "bench.log").read_text()
    status = json.loads((out / "bench_status.json").read_text())
    for name in run_all.OP_BENCHMARKS:
        assert re.search(rf"  {name}: (exit 0 after|stopped after 15 s)", log), log[-3000:]
        assert status[name] in ("ok", "timed out")
    with open(out / "ops.csv") as fh:
        assert list(csv.DictReader(fh)), "no benchmark row was kept"
    defaults = (out / "defaults.md").read_text()
    for op in pick_defaults.OPS:
        assert f'"{op}": "reference",  # no GPU backend qualified' in defaults
    assert proc.stdout.rstrip().endswith(defaults.rstrip().splitlines()[-1])


def test_device_check_stops_when_the_cuda_kernels_cannot_run_and_archives_its_folder(tmp_path):
    # On a machine whose CUDA kernels cannot run (here: no GPU) the gpu tests would all skip: it stops after the
    # build with the reason; ARCHIVE packs what it wrote into one file.
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "SKIP_BUILD": "1",
           "ARCHIVE": "check.tgz"}  # relative to where the script starts
    proc = subprocess.run(["bash", os.path.join(run_all.HERE, "device_check.sh"), "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-2000:]
    info = insloc_ops.build_info()  # the first reason that holds here
    reason = ("the extension did not load" if not info["extension_loaded"] else
              "the extension was built without CUDA kernels" if not info["cuda_kernels_compiled"] else
              "torch sees no CUDA device")
    assert f"PRE-FLIGHT FAILED: the CUDA kernels cannot run here: {reason}" in proc.stdout
    assert "== gpu tests" not in proc.stdout and not (tmp_path / "check" / "gpu_tests").exists()
    import tarfile

    with tarfile.open(tmp_path / "check.tgz") as tar:
        assert {"check/env.txt"} <= set(tar.getnames())
        env_txt = tar.extractfile("check/env.txt").read().decode()
    assert '"extension_loaded": ' in env_txt  # written before the check, archived at the exit


def test_device_check_stops_before_the_build_without_pytest(tmp_path):
    # A sitecustomize that hides pytest, as on an image without it: the script stops at once, naming WHEELS=DIR.
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n")
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "block"), "SKIP_BUILD": "1"}
    # OUTDIR relative to where the script starts (it moves to the repository root)
    proc = subprocess.run(["bash", os.path.join(run_all.HERE, "device_check.sh"), "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "cannot import: pytest." in proc.stdout and "WHEELS=DIR" in proc.stdout
    assert "== build" not in proc.stdout and not (out / "gpu_tests").exists()
    assert "\ntorchvision " in (out / "env.txt").read_text()


def test_host_benchmark_rows_for_every_op_and_pass(tmp_path):
    import bench.bench_host as host

    host.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "host.csv")])
    with open(tmp_path / "host.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = {(r["op"], r["impl"], r["pass"]) for r in rows}
    for op, pass_ in (("roi_align_multilevel", "forward"), ("roi_align_multilevel", "fwd+bwd"),
                      ("queue_infonce", "forward"), ("queue_infonce", "fwd+bwd"), ("sample_anchor_boxes", "forward")):
        assert (op, "baseline", pass_) in got
        if "cpu" in insloc_ops.available_backends()[op]["cpu"]:  # the C++ kernels are built
            assert (op, "cpu", pass_) in got
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert all(r["speedup_vs_baseline"] for r in rows if r["impl"] != "baseline")


def test_host_benchmark_times_the_implementations_in_alternation():
    import bench.bench_host as host

    seen = []
    timings = host.host_ms({k: (lambda k=k: seen.append(k)) for k in "abc"}, "cpu", calls=2, batches=6, warmup=1)
    assert seen[:3] == ["a", "b", "c"]  # warm-up, once each
    rounds = [seen[3 + 6 * r:3 + 6 * (r + 1)] for r in range(6)]  # a round: each implementation's batch of 2
    assert all(sorted(r[::2]) == ["a", "b", "c"] and r[::2] == r[1::2] for r in rounds)
    assert len({tuple(r[::2]) for r in rounds}) > 1  # the order is shuffled, not always a, b, c
    assert set(timings) == {"a", "b", "c"} and all(t[3] == 6 and t[0] > 0 for t in timings.values())


def test_infonce_peak_bandwidth_from_the_device_name():
    import bench.bench_infonce as infonce

    assert infonce.peak_gbs("NVIDIA H100 80GB HBM3") == 3350.0 and infonce.peak_gbs("NVIDIA H200") == 4800.0
    assert infonce.peak_gbs("NVIDIA H100 PCIe") is None and infonce.peak_gbs("NVIDIA GH200 480GB") is None


def test_roi_bench_bf16_channels_last_and_deterministic_backward():
    """bench_shape on tiny bf16 channels_last inputs (under bf16 autocast, as training runs them), the baseline and
    the C++ kernel; and an impl marked deterministic sees torch.use_deterministic_algorithms in its forward and in
    its backward alike."""
    import bench.bench_roi_align as roi
    from bench.common import Recorder

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", torch.are_deterministic_algorithms_enabled()))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", torch.are_deterministic_algorithms_enabled()))
            return g

    def probe(inp, feats):
        return Probe.apply(roi.fused("cpu")(inp, feats))

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, s, s, generator=g).to(torch.bfloat16, memory_format=torch.channels_last)
             for s in (16, 8)]
    inp = dict(features=feats, rois=torch.tensor([[0, 2.0, 3.0, 40.0, 50.0], [1, 5.0, 1.0, 20.0, 60.0]]),
               scales=[1 / 4, 1 / 8], levels=None, output_size=(7, 7), aligned=True)
    rec = Recorder(roi.OP)
    impls = [("torchvision", roi.baseline, False), ("cpp", roi.fused("cpu"), False), ("probe", probe, True)]
    roi.bench_shape(rec, "tiny-bf16-cl", inp, impls, "cpu", reps=2, max_seconds=1.0)
    assert [(r["impl"], r["pass"]) for r in rec.rows] == [(i, p) for p in roi.PASSES for i, *_ in impls]
    assert all(r["speedup_vs_baseline"] for r in rec.rows)
    assert {p for p, _ in seen} == {"forward", "backward"} and all(on for _, on in seen)
    assert not torch.are_deterministic_algorithms_enabled()


def test_time_interleaved_alternates_and_enters_each_context_around_each_call():
    from bench.common import time_interleaved

    calls, inside = [], []

    def entry(key):
        @contextlib.contextmanager
        def context():
            inside.append(key)
            try:
                yield
            finally:
                inside.remove(key)

        def fn():
            assert inside == [key]  # its own settings, no other entry's
            calls.append(key)
        return key, fn, context

    timings = time_interleaved([entry("a"), entry("b"), ("c", lambda: calls.append("c"), None)], "cpu", reps=6,
                               warmup=1, max_seconds=60)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up, one call each
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every entry once a round
    assert len({tuple(r) for r in rounds}) > 1 and len({r[0] for r in rounds}) > 1  # in orders that change
    assert set(timings) == {"a", "b", "c"} and all(t[3] == 6 and t[0] >= 0 for t in timings.values())


def test_recorder_rewrites_an_older_csv_with_the_current_columns(tmp_path):
    from bench.common import FIELDS, Recorder

    path = tmp_path / "old.csv"
    path.write_text("op,shape,impl,pass,median_ms,device,legacy\nx,s,base,forward,1.0,CPU,kept\n"
                    "z,s,base,forward,2.0,CPU,kept,a cell past the header\n")
    rec = Recorder("y", str(path))
    rec.add("s", "fused", "forward", (0.5, 0.4, 0.6, 5), settings="FLAG=1")
    with open(path) as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == FIELDS + ["legacy"]
    assert (rows[0]["op"], rows[0]["median_ms"], rows[0]["legacy"], rows[0]["revision"]) == ("x", "1.0", "kept", "")
    assert (rows[1]["op"], rows[1]["median_ms"]) == ("z", "2.0")
    assert (rows[2]["op"], rows[2]["settings"], rows[2]["legacy"]) == ("y", "FLAG=1", "")
    assert rows[2]["time"].endswith("Z") and rows[2]["torchvision"] and rows[2]["device"]
    rec.add("s", "fused", "backward", (0.5, 0.4, 0.6, 5))  # appends under the same header
    with open(path) as fh:
        assert [r["pass"] for r in csv.DictReader(fh)] == ["forward", "forward", "forward", "backward"]
    assert not os.path.exists(str(path) + ".tmp")


def test_rows_name_the_device_the_benchmark_ran_on_and_indexed_devices_keep_their_backends(monkeypatch):
    import bench.bench_host as host
    import bench.bench_infonce as infonce
    from bench import common
    # a CPU run on a machine with a GPU: the CPU's row, without the CUDA version
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"NVIDIA H200 #{torch.device(device).index}")
    cpu = common.environment("cpu")
    assert cpu["device"].startswith("CPU ") and cpu["device"].endswith(" threads") and cpu["cuda"] == ""
    gpu = common.environment("cuda:1")
    assert gpu["device"] == "NVIDIA H200 #1" and gpu["cuda"] == (torch.version.cuda or "")
    assert common.Recorder("x", device="cpu").env["device"] == cpu["device"]
    monkeypatch.undo()
    # "cpu:0" is a CPU device: its fused backends are not dropped
    assert "cpu" in infonce.impls("cpu:0") and "cpu" in infonce.impls("cpu")
    assert "cpu" in host.with_fused("queue_infonce", "cpu:0", lambda: None, lambda b: None)


def test_training_step_benchmark_times_both_implementations_in_one_run(tmp_path, capsys):
    import bench.bench_train_step as step
    out = tmp_path / "train.csv"
    step.main(["--device", "cpu", "--threads", "1", "--arch", "c4", "--depth", "18", "--batch", "2",
               "--image-size", "64", "--queue", "64", "--steps", "3", "--warmup", "1", "--no-data",
               "--impl", "fused", "baseline", "--out", str(out)])
    with open(out) as fh:
        rows = {r["impl"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"fused", "baseline"} and all(int(r["reps"]) == 3 for r in rows.values())
    # the speed-up sits on the fused row whatever the order of --impl; both rows count the same FLOPs
    assert rows["baseline"]["speedup_vs_baseline"] == "" and float(rows["fused"]["speedup_vs_baseline"]) > 0
    assert rows["fused"]["settings"].endswith("; roi_align_multilevel=cpu sample_anchor_boxes=cpu queue_infonce=cpu")
    assert rows["fused"]["shape"] == rows["baseline"]["shape"] == "R18-C4 b2 64px"
    flops = dict(re.findall(r"(fused|baseline) [\d.]+ img/s, ([\d.]+) GFLOP a step", capsys.readouterr().out))
    assert set(flops) == {"fused", "baseline"} and flops["fused"] == flops["baseline"] and float(flops["fused"]) > 0
    assert all(r["device"].startswith("CPU ") and r["cuda"] == "" for r in rows.values())
