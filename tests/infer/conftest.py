"""Helpers of the distributed inference tests: launching `torchrun` and ending what it started."""

import os
import signal
import subprocess
import sys
from pathlib import Path


def torchrun(*args: str, **popen) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m palmkit.cli ARGS` started in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "palmkit.cli",
           *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, **popen)


def kill_tree(run: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal torchrun's workers, then torchrun itself: it starts each worker in a session of its own, so a
    signal to torchrun's process group misses them."""
    try:
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    except FileNotFoundError:  # torchrun has ended
        children = []
    for pid in children:
        try:
            os.kill(int(pid), sig)
        except ProcessLookupError:
            pass
    if run.poll() is None:
        run.send_signal(sig)
    run.wait(60)
