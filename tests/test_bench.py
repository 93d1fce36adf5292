"""The benchmark scripts still run (tiny shapes): a benchmark that rots is found here, not on a GPU."""
import csv

import pytest
import torch

from bench import run_all


def test_training_step_benchmark_runs_fused_and_baseline(tmp_path):
    import bench.bench_train_step as step  # noqa: F401  (imports the trainer and the baselines)

    out = tmp_path / "step.csv"
    torch.manual_seed(0)
    step.main(["--device", "cpu", "--arch", "fpn", "c4", "--depth", "18", "--batch", "2", "--image-size", "64",
               "--queue", "16", "--steps", "1", "--warmup", "0", "--no-flops", "--data-samples", "2",
               "--out", str(out)])
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["impl"], r["pass"]) for r in rows] == [("baseline", "step"), ("fused", "step")] * 2 + [("data", "sample")]
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert rows[1]["speedup_vs_baseline"] and rows[3]["speedup_vs_baseline"]


def test_markdown_table_has_a_line_per_row():
    rows = [{"op": "queue_infonce", "shape": "insloc", "pass": "both", "impl": "cpu", "median_ms": "1.5",
             "speedup_vs_baseline": "2.00", "peak_extra_mb": "0.5", "device": "CPU"}]
    table = run_all.markdown_table(rows).splitlines()
    assert len(table) == 3 and table[2] == "| queue_infonce | insloc | both | cpu | 1.500 | 2.00 | 0.5 | CPU |"


@pytest.mark.parametrize("name", run_all.OP_BENCHMARKS)
def test_every_op_benchmark_has_the_runner_flags(name):
    with open(f"{run_all.HERE}/{name}") as fh:
        source = fh.read()
    for flag in ("--out", "--device", "--quick"):
        assert f'"{flag}"' in source, f"{name} lacks {flag}"
