"""benchmarks/gpu_check.sh on a machine without a CUDA GPU: it says so and exits 1, having checked nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script would run its checks")
def test_without_cuda_it_says_so_and_exits_1(tmp_path):
    log = tmp_path / "gpu_check.log"
    r = subprocess.run(["bash", str(SCRIPT), str(log)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 1
    assert r.stderr.startswith("gpu_check: no CUDA GPU visible to torch") and r.stdout == ""
    assert not log.exists()
