"""The GPU check script as a smoke test on the CPU: it must keep running on a bare machine
(the core alone, no orchestration stack) whether or not a GPU is at hand."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_runs_the_core_alone_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--steps", "4", "--gpu-steps", "2", "--gpu-batch", "4"]
    args += ["--gpu-tile", "64", "--mosaic", "300", "--size", "256", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "srpu_pipelines.bench.gpu_check", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["orchestration_imported"] == []
    assert r["shipped_batch"]["steps"] == 4 and r["gpu_batch"]["steps"] == 2
    assert r["shipped_batch"]["gflop_per_step"] > 1
    assert r["cpu_agreement"]["passed"] and r["cpu_agreement"]["fp32_device_vs_cpu"] == 1.0
    assert r["mosaic"]["labels_shape"] == [300, 300]
