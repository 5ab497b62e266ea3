"""Files that are never half-written: atomic writes, JSON and safetensors files, folder swaps; reading text.

A write goes to a temporary file beside its target, is fsynced and renamed into place, so a crash leaves the old
file or the new one, never a mix; a folder is built beside its target and swapped in (`staged_dir`). Reading never
unpickles: tensors come from safetensors, the rest from JSON; text is UTF-8, with a per-line fallback where a
source mixes in an 8-bit code page (`decode_text`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from tqdm import tqdm

from palmkit.errors import CheckpointError, PalmkitError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous and unshared)."""
    flat = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
            for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None
    # A fixed key order: every rank must walk the tensors in the same order to shard them (FSDP2).
    return {k: tensors[k] for k in sorted(tensors)}


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` with at most a moment where neither exists."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """An empty folder beside `target` to fill; on success it replaces `target`, on an error it is removed.

    Built in `target`'s parent so that the swap is a rename on one file system; an error inside the block
    leaves the old `target` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def decode_text(raw: bytes, fallback: str | None = None, name: str | os.PathLike = "") -> str:
    """UTF-8 text, a leading BOM dropped.

    A file that is not UTF-8 is read line by line, each line that is not UTF-8 with the 8-bit `fallback` codec
    (bytes it lacks replaced); without a fallback it is an error naming `name`, the line and the byte offset.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if fallback is None:
            line = raw[: exc.start].count(b"\n") + 1
            raise PalmkitError(f"{name}: line {line} is not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
                               ) from None
    return "".join(_decode_line(line, fallback) for line in raw.splitlines(keepends=True))


def _decode_line(line: bytes, fallback: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode(fallback, errors="replace")


def split_list(values: Sequence[str] | str) -> list[str]:
    """Accept `["en", "zh"]`, `["en,zh"]` and `"en,zh"` alike (the CLI passes lists)."""
    values = [values] if isinstance(values, str) else values
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def warn(message: str) -> None:
    """Print `warning: message` to stderr without breaking a progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
