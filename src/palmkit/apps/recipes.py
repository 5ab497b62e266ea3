"""What the application recipes (`palmkit recipe support`, `palmkit recipe monitor`) share: a base model.

A recipe fine-tunes a pretrained checkpoint. Given none, it uses the quickstart's model when that exists,
and otherwise pretrains a short English one with the quickstart pipeline, so that a recipe runs on a
fresh machine in a few minutes (a model trained for minutes is weak; `--checkpoint` takes a better one).
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from palmkit.apps.quickstart import quickstart
from palmkit.errors import PalmkitError

QUICKSTART_MODEL = Path("runs/quickstart/model/final")


def base_checkpoint(checkpoint: str = "", cache: str = "runs/recipe-base", minutes: float = 3.0) -> Path:
    """The checkpoint a recipe starts from: CHECKPOINT, else the quickstart's model, else one pretrained now."""
    if checkpoint:
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise PalmkitError(f"{path}: not a palmkit checkpoint folder (no config.json)")
        return path
    if (QUICKSTART_MODEL / "config.json").is_file():
        print(f"base model: {QUICKSTART_MODEL} (from `palmkit quickstart`)")
        return QUICKSTART_MODEL
    final = Path(cache) / "model" / "final"
    Path(cache).mkdir(parents=True, exist_ok=True)
    # Two recipes started together must not pretrain into one folder: the second waits for the first's model
    with open(Path(cache) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").is_file():

            print(f"no --checkpoint and no quickstart model: pretraining an English base model for {minutes:g} "
                  f"min in {cache}")
            quickstart(out=cache, minutes=minutes, langs=["en"], vocab_size=8000)
    return final
