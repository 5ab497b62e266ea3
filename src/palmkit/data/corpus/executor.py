"""Running the units of a build stage on datatrove's executors: worker processes on one machine, or several
machines that share the output folder, each running its slice of every stage.

A stage is a list of independent units (a piece of input, a language, a part of a language) whose outputs
depend only on the unit's number, never on which worker ran it or when; datatrove records each finished unit
(`logs/<stage>/completions/`), so a killed build skips what is done when it is started again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from datatrove.executor.local import LocalPipelineExecutor
from loguru import logger
from tqdm import tqdm

# datatrove logs every task to the terminal; palmkit shows one progress bar per stage instead (the task logs
# stay in logs/<stage>/logs/).
logger.disable("datatrove")


class StageStep:
    """datatrove pipeline step that runs unit `rank` of a stage: `run(work_dir, stage, rank)`."""

    def __init__(self, run: Callable[[Path, str, int], None], work_dir: Path, stage: str):
        self.run, self.work_dir, self.stage = run, work_dir, stage

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        self.run(self.work_dir, self.stage, rank)

    def __repr__(self) -> str:
        return f"palmkit corpus stage {self.stage}"


def finished(logs: Path) -> set[int]:
    """Units of a stage that datatrove marked complete."""
    folder = logs / "completions"
    return {int(p.name) for p in folder.iterdir()} if folder.is_dir() else set()


def _watch(bar: tqdm, logs: Path, sizes: list[int], stop: threading.Event) -> None:
    shown = bar.n
    while True:
        stopped = stop.wait(0.5)
        done = sum(sizes[i] for i in finished(logs) if i < len(sizes))
        bar.update(done - shown)
        shown = done
        if stopped:
            return


def run_stage(step: StageStep, sizes: list[int], workers: int, nodes: int = 1, node_rank: int = 0,
              poll_s: float = 2.0) -> None:
    """Run every unit of a stage (unit i handles sizes[i] bytes) and return when all of them are finished.

    With several machines, machine `node_rank` of `nodes` runs units [node_rank * n, (node_rank + 1) * n) and
    then waits for the others' (they share `step.work_dir`); if one of them stops, the others wait until it is
    started again, and it continues from its last finished unit.
    """
    total = len(sizes)
    if not total:
        return
    logs = step.work_dir / "logs" / step.stage
    per_node = -(-total // nodes)
    offset = min(node_rank * per_node, total)
    local = min(per_node, total - offset)
    executor = LocalPipelineExecutor(
        pipeline=[step], tasks=total, workers=max(1, min(workers, local)), logging_dir=str(logs),
        local_tasks=local, local_rank_offset=offset,
        # fork: workers inherit the imported modules and the silenced logger (the platform default elsewhere)
        start_method="fork" if sys.platform == "linux" else "spawn")
    before = sum(sizes[i] for i in finished(logs) if i < total)
    with tqdm(total=sum(sizes), initial=before, desc=step.stage, unit="B", unit_scale=True, mininterval=1.0,
              disable=None, file=sys.stderr) as bar:
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(bar, logs, sizes, stop), daemon=True)
        watcher.start()
        try:
            if local > 0:
                executor.run()
            while len(finished(logs)) < total:  # other machines' units
                time.sleep(poll_s)
        finally:
            stop.set()
            watcher.join()
