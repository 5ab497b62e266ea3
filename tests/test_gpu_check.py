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


def test_its_finetuning_step_runs_on_two_cpu_processes(tmp_path):
    # The step as the script has it, with the CPU for the GPUs (two gloo processes) and the tiny preset
    text = SCRIPT.read_text()
    block = text[text.index('cat > "$TMP/ft_data.py"'):text.index('step "fine-tuning')]
    block = (block.replace("--device cuda", "--device cpu").replace("torch.cuda.device_count()", "2")
             .replace('"$TMP" small', '"$TMP" tiny'))
    script = f"set -uo pipefail\nPY={sys.executable}\nTMP={tmp_path}\n{block}\nfinetune_ddp\n"
    r = subprocess.run(["bash", "-c", script], cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert [line.split(",")[1].strip() for line in lines] == ["float32", "bfloat16"]
    assert all("2 process(es)" in line and "examples/s" in line for line in lines)
