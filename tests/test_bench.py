"""The benchmark scripts still run (tiny shapes): a benchmark that rots is found here, not on a GPU."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import pick_defaults, run_all


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
    assert all("TFLOP/s" in r["shape"] for r in rows[:4])


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


@pytest.mark.parametrize("name", run_all.OP_BENCHMARKS)
def test_every_op_benchmark_has_the_runner_flags(name):
    with open(f"{run_all.HERE}/{name}") as fh:
        source = fh.read()
    for flag in ("--out", "--device", "--quick"):
        assert f'"{flag}"' in source, f"{name} lacks {flag}"


def _write_gpu_results(tmp_path, cases, rows):
    xml = ['<?xml version="1.0"?><testsuites><testsuite name="pytest">']
    for module, name, status in cases:
        body = {"passed": "", "failed": '<failure message="x">x</failure>', "skipped": '<skipped message="s"/>'}[status]
        xml.append(f'<testcase classname="tests.{module}" name="{name}" time="0.1">{body}</testcase>')
    xml.append("</testsuite></testsuites>")
    (tmp_path / "gpu_tests.xml").write_text("".join(xml))
    with open(tmp_path / "ops.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["op", "shape", "impl", "pass", "median_ms", "speedup_vs_baseline", "device"])
        w.writeheader()
        for op, shape, impl, pass_, ms, speedup in rows:
            w.writerow({"op": op, "shape": shape, "impl": impl, "pass": pass_, "median_ms": ms,
                        "speedup_vs_baseline": speedup, "device": "NVIDIA H100"})


def test_pick_defaults_needs_passing_tests_and_a_win_at_every_shape(tmp_path, capsys):
    assert pick_defaults.backends_named("test_gpu_matches_reference[triton-float32-nchw]") == ["triton"]
    assert pick_defaults.backends_named("test_gpu_opcheck_cuda") == ["cuda"]
    assert pick_defaults.backends_named("test_gpu_empty_inputs") == ["cuda", "triton"]
    R, A, Q = "test_roi_align_kernels", "test_anchor_kernels", "test_infonce_kernels"
    cases = [
        (R, "test_gpu_matches_reference[cuda-float32]", "passed"),
        (R, "test_gpu_matches_reference[triton-float32]", "passed"),
        (A, "test_gpu_backend_matches_reference[cuda-insloc]", "failed"),  # cuda anchors: a failure
        (A, "test_gpu_backend_matches_reference[triton-insloc]", "passed"),
        (A, "test_gpu_empty_gt_boxes", "passed"),  # concerns both
        (Q, "test_gpu_backends_match_reference[triton-a]", "passed"),
        (Q, "test_gpu_backends_match_reference[cuda-a]", "skipped"),  # cuda infonce: nothing ran
    ]
    rows = [
        ("roi_align_multilevel", "insloc", "cuda", "fwd+bwd", 1.0, "3.00"),
        ("roi_align_multilevel", "detection-7x7", "cuda", "fwd+bwd", 2.0, "1.60"),
        ("roi_align_multilevel", "insloc", "triton", "fwd+bwd", 0.8, "4.00"),  # faster at one shape,
        ("roi_align_multilevel", "detection-7x7", "triton", "fwd+bwd", 4.0, "0.90"),  # slower at the other
        ("roi_align_multilevel", "insloc", "cuda", "forward", 0.1, "9.00"),  # not a deciding pass
        ("sample_anchor_boxes", "insloc", "cuda", "forward", 0.1, "20.0"),
        ("sample_anchor_boxes", "insloc", "triton", "forward", 0.2, "10.0"),
        ("queue_infonce", "insloc/float32", "triton", "both", 0.5, "0.70"),  # verified but slower
        ("queue_infonce", "insloc/float32", "cuda", "both", 0.2, "5.00"),
    ]
    _write_gpu_results(tmp_path, cases, rows)
    assert pick_defaults.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"roi_align_multilevel": "cuda",  # insloc fwd+bwd 1.000 ms = 3.00x on NVIDIA H100' in out
    assert '"sample_anchor_boxes": "triton",' in out
    assert '"queue_infonce": "reference",  # no GPU backend qualified' in out
    assert "- sample_anchor_boxes / cuda: test_gpu_backend_matches_reference[cuda-insloc]" in out
    assert pick_defaults.main([str(tmp_path / "missing")]) == 2
    # The same results from a test run stopped part-way (pytest exit status 2): nothing qualifies.
    (tmp_path / "gpu_tests.rc").write_text("2\n")
    assert pick_defaults.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "did not finish (pytest exit status 2)" in out
    assert out.count("no GPU backend qualified") == 3
    (tmp_path / "gpu_tests.rc").write_text("1\n")  # finished, with failures: as before
    assert pick_defaults.main([str(tmp_path)]) == 0
    assert '"roi_align_multilevel": "cuda",' in capsys.readouterr().out
    # A kernel test module that failed to import (pytest --continue-on-collection-errors): its op's backends
    # fail, the others are unaffected.
    xml = (tmp_path / "gpu_tests.xml").read_text()
    (tmp_path / "gpu_tests.xml").write_text(xml.replace(
        "</testsuite>", '<testcase classname="" name="tests.test_roi_align_kernels" time="0"><error message="x"/>'
                        "</testcase></testsuite>"))
    assert pick_defaults.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"roi_align_multilevel": "reference",' in out and '"sample_anchor_boxes": "triton",' in out
    assert "- roi_align_multilevel / cuda: tests.test_roi_align_kernels" in out


@pytest.mark.parametrize("script", run_all.OP_BENCHMARKS + ["bench_train_step.py", "run_all.py", "pick_defaults.py"])
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
           "BENCH_DEVICE": "cpu", "QUICK": "1", "DEADLINE_S": "400", "TESTS_S": "200", "BENCH_S": "8", "TRAIN_S": "8"}
    proc = subprocess.run(["bash", os.path.join(run_all.HERE, "device_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = re.search(r"gpu tests exit (\d+); benchmarks exit (\d+)", proc.stdout)
    assert summary, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert summary.group(1) == "0" and (out / "gpu_tests.rc").read_text().strip() == "0"
    # The training step (R50, batch 32) cannot finish in 8 s on a CPU: stopped, so the benchmarks count as failed.
    assert summary.group(2) == "1" and proc.returncode == 1
    env_txt = (out / "env.txt").read_text()
    assert "torch " in env_txt and '"extension_loaded": true' in env_txt
    # Every gpu test was collected and skipped (no CUDA device), none ran.
    tests = pick_defaults.read_tests(out / "gpu_tests.xml")
    assert {module for module, _ in tests} >= {"test_roi_align_kernels", "test_anchor_kernels", "test_infonce_kernels"}
    assert all(t["passed"] == 0 and t["failed"] == 0 and t["skipped"] > 0 for t in tests.values())
    # Each op benchmark started and then ended: by itself, or stopped at its limit keeping its rows.
    log = (out / "bench.log").read_text()
    for name in run_all.OP_BENCHMARKS:
        assert re.search(rf"  {name}: (exit 0 after|stopped after 8 s)", log), log[-3000:]
    with open(out / "ops.csv") as fh:
        assert list(csv.DictReader(fh)), "no benchmark row was kept"
    defaults = (out / "defaults.md").read_text()
    for op in pick_defaults.OPS:
        assert f'"{op}": "reference",  # no GPU backend qualified' in defaults
    assert proc.stdout.rstrip().endswith(defaults.rstrip().splitlines()[-1])
