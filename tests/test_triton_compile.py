"""Every Triton kernel launch compiles to a cubin for sm_80 and sm_90 and fits their shared memory (no GPU
needed; see tests/triton_aot.py). The interpreter tests check what the kernels compute; this checks that
the real compiler accepts them."""
import json
import os
import subprocess
import sys

import pytest
from conftest import triton_compile_api

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_every_triton_launch_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    if not triton_compile_api():
        pytest.skip("this Triton's triton.compile API is older than tests/triton_aot.py's")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py"), "80", "90"], capture_output=True,
                         text=True, env=env, cwd=os.path.dirname(HERE), timeout=1800)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, json.dumps(failed[:3], indent=1)[:6000]
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = {(r["kernel"], r["arch"]) for r in rows}
    expected = {"_forward_partials", "_forward_combine", "_backward_dq", "_backward_finish", "_forward_kernel",
                "_backward_kernel", "_sample_anchor_kernel", "_finalize_kernel"}
    assert kernels == {(k, a) for k in expected for a in (80, 90)}
    # Every mode a GPU run can take was compiled: tf32x3, tf32 and IEEE dots, atomic and deterministic dq, bf16 and
    # fp16 tensor-core dots, channels_last and aligned RoIAlign.
    seen = {(r["kernel"], k, v) for r in rows for k, v in r["constexprs"].items()}
    for item in [("_forward_partials", "PRECISION", "tf32"), ("_forward_partials", "PRECISION", "tf32x3"),
                 ("_backward_dq", "PRECISION", "tf32x3"), ("_forward_partials", "PRECISION", "ieee"),
                 ("_backward_dq", "ATOMIC", "True"), ("_backward_dq", "ATOMIC", "False"),
                 ("_forward_partials", "DOT_DTYPE", "bf16"), ("_forward_partials", "DOT_DTYPE", "fp16"),
                 ("_backward_kernel", "CHANNELS_LAST", "True"), ("_forward_kernel", "ALIGNED", "True"),
                 ("_forward_kernel", "BY_LEVEL", "False"), ("_forward_combine", "BLOCK_S", "1024")]:
        assert item in seen, item
    # The InfoNCE dots a GPU runs by default are on tensor cores: 16-bit operands, and fp32 as TF32x3 (or
    # TF32); only IEEE fp32 (which the GPU path never picks) uses CUDA cores.
    for r in rows:
        if r["kernel"] in ("_forward_partials", "_backward_dq"):
            on_cuda_cores = r["constexprs"]["PRECISION"] == "ieee" and r["constexprs"]["DOT_DTYPE"] == "fp32"
            assert (r["mma"] == 0) == on_cuda_cores, r
