"""benchmarks/gpu.py, the one command for a GPU, must run and say why it skips where no CUDA device is
visible (CI, these machines), exiting 0. Its measurements run only on a device (benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_skips_cleanly_without_a_cuda_device():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Skipped: no CUDA device" in done.stdout
    assert "Command:" not in done.stdout  # nothing built or measured
