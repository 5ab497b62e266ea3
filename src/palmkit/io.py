"""Files that are never half-written: atomic writes, JSON and safetensors files, folder swaps; reading text.

A write goes to a temporary file beside its target, is fsynced and renamed into place, so a crash leaves the old
file or the new one, never a mix; the new file gets the mode a plain `open` would give it (the process umask), or
the old file's mode when it replaces one. A folder is built beside its target and swapped in (`staged_dir`), never
over a folder that holds files palmkit did not write there (`check_destination`; a manifest in the folder lists
what palmkit wrote). Reading never unpickles: tensors come
from safetensors, the rest from JSON; text is UTF-8, with a per-line fallback where a source mixes in an 8-bit
code page (`decode_text`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm import tqdm

from palmkit.errors import CheckpointError, PalmkitError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`: a staged folder is durable before it is swapped in, however
    its files were written (a file already fsynced costs next to nothing)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(path := os.path.join(root, name)):
                _fsync_dir(Path(path))  # an fsync through a read-only descriptor, as for a folder
        _fsync_dir(Path(root))


def umask() -> int:
    """The process umask, read without changing it (Linux reports it in /proc; elsewhere set and put back)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, default: int) -> int:
    """A replacement keeps the mode of the file it replaces; a new file gets `default` less the umask, as `open`
    and `mkdir` would (mkstemp and mkdtemp make 0600 and 0700 whatever the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default & ~umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: Literal["wb", "w"] = "wb", encoding: str | None = None
                ) -> Iterator[IO]:
    """A file to write `path` through: a temporary beside it, fsynced and renamed into place when the block ends,
    removed when it fails, so that readers see the old file or the whole new one (also after a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path, 0o666))
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy file `src` to `dst` atomically and durably (shutil.copyfile neither fsyncs nor renames)."""
    with open(src, "rb") as source, atomic_open(dst) as f:
        shutil.copyfileobj(source, f, 1 << 20)


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
    try:  # mapped, not read whole first: a file's bytes and its tensors never both in memory
        tensors = load_file(path)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None
    # A fixed key order: every rank must walk the tensors in the same order to shard them (FSDP2).
    return {k: tensors[k] for k in sorted(tensors)}


def load_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file palmkit wrote; a missing or unreadable one raises CheckpointError naming the file and `what`
    it is ("checkpoint file", "run options file", ...), so that the message says which saved state is broken."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt {what} {path}: not JSON ({exc})") from None


# ---- folders palmkit writes whole (checkpoints, exports, fine-tuned models)
#
# Such a folder is built beside its target and swapped in, with a manifest of the names palmkit wrote there. A
# name is palmkit's to replace or remove only when it is one of the names its command writes (`own`) and the
# manifest lists it: a name alone proves nothing (a user's `eval/` or `tensorboard/` looks like palmkit's). A
# target that holds anything else is refused, or with `force` updated name by name: palmkit's files replaced,
# the others kept, and refused still if palmkit would have to write over one of them.

STAGING_MARK = ".palmkit-staging"  # in a folder palmkit is building: {"pid", "host"}, proof that palmkit made it
MANIFEST = ".palmkit-files.json"  # in a folder palmkit wrote: {"files": [the names it wrote there]}
PREVIOUS = "previous"  # in a marked holder folder: the target being replaced, for the moment of the swap


def written_names(folder: str | os.PathLike) -> set[str]:
    """The names that palmkit's manifest in `folder` says it wrote there (none without a readable manifest)."""
    try:
        names = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))["files"]
        return {n for n in names if isinstance(n, str) and "/" not in n and n not in (".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_manifest(folder: Path, names: Collection[str]) -> None:
    atomic_write_json(folder / MANIFEST, {"files": sorted(names)})


def claim_names(folder: str | os.PathLike, names: Collection[str]) -> None:
    """Record in `folder`'s manifest that palmkit writes `names` there (files it writes in place, such as live
    logs, rather than through `staged_dir`); a name there that palmkit did not write is refused, untouched."""
    folder = Path(folder)
    written = written_names(folder)
    clash = sorted(n for n in names if n not in written and ((folder / n).exists() or (folder / n).is_symlink()))
    if clash:
        raise PalmkitError(f"{folder} holds {_names(clash)}, which palmkit did not write there but would have to "
                           "write: move them elsewhere, or give a new or empty folder")
    if not set(names) <= written:
        folder.mkdir(parents=True, exist_ok=True)
        _write_manifest(folder, written | set(names))


def foreign_entries(folder: str | os.PathLike, own: Collection[str], manifest: bool = True) -> list[str]:
    """The names in `folder` that are not palmkit's files of that folder (in `own` and, with `manifest`, listed
    in its manifest; their atomic temporaries; the staging mark and the manifest); [] for a folder that does not
    exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = set(own) & written_names(folder) if manifest else set(own)
    return sorted(p.name for p in folder.iterdir() if not _is_own(p.name, mine))


def _is_own(name: str, own: Collection[str]) -> bool:
    return name in own or name in (STAGING_MARK, MANIFEST) or (name.endswith(".tmp") and any(
        name.startswith(f".{o}.") for o in own))


def check_destination(target: str | os.PathLike, own: Collection[str], force: bool = False,
                      manifest: bool = True) -> None:
    """Refuse to write a palmkit folder at `target` where a folder holds files palmkit did not write (`own`
    names listed in its manifest), unless `force`; with `force` still refuse one that holds a name of `own`
    palmkit did not write (it would be written over). A file there is always refused; a link to a folder only
    without `force` (it is written through). manifest=False: any `own` name counts as palmkit's."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise PalmkitError(f"{target} exists and is not a folder: give the path of a new or empty folder")
    foreign = foreign_entries(target, own, manifest)
    if force:
        clash = [n for n in foreign if n in set(own)]
        if clash:
            raise PalmkitError(f"{target} holds {_names(clash)}, which palmkit did not write there but would have "
                               "to write: move them elsewhere, or give a new or empty folder")
        return
    if not (foreign or target.is_symlink()):
        return
    shown = "it is a link to a folder" if not foreign else "it holds files palmkit did not write there: " + \
        _names(foreign)
    raise PalmkitError(f"{target} is not a palmkit folder ({shown}): give a new or empty folder, or --force to "
                       "write palmkit's files into it and keep the others")


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _write_mark(folder: Path) -> None:
    (folder / STAGING_MARK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of `target` that a killed palmkit process left beside it; returns them.

    Only folders with a staging mark written on this machine by a process that is gone are touched. One that
    holds the previous `target` of a swap cut short puts it back when `target` is missing."""
    target = Path(target)
    removed = []
    for folder in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        try:
            mark = json.loads((folder / STAGING_MARK).read_text())
            pid, host = int(mark["pid"]), mark["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no readable mark: not provably palmkit's
        if folder.is_symlink() or host != socket.gethostname() or _alive(pid):
            continue
        if (folder / PREVIOUS).is_dir() and not (target.exists() or target.is_symlink()):
            os.replace(folder / PREVIOUS, target)
            warn(f"{target}: put back the folder that an interrupted swap had moved aside")
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` with at most a moment where neither exists.

    For that moment the old `dst` sits in a marked holder folder beside it, which `remove_stale_staging` puts
    back if the process is killed there."""
    if not (dst.exists() or dst.is_symlink()):
        os.replace(src, dst)
        _fsync_dir(dst.parent)
        return
    holder = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    _write_mark(holder)
    os.replace(dst, holder / PREVIOUS)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(holder, ignore_errors=True)


def _merge_into(staging: Path, target: Path, own: Collection[str], manifest: bool) -> None:
    """Move the files of `staging` into the existing folder `target` one by one (each an atomic rename) and remove
    palmkit's files (`own`, listed in its manifest) that the new folder no longer has; anything else in `target`
    is left as it is. With `manifest` the target's manifest then lists what palmkit wrote there."""
    dest = target.resolve()
    new = {p.name for p in staging.iterdir()} - {STAGING_MARK, MANIFEST}
    written = written_names(dest)
    mine = set(own) & written if manifest else set(own)
    trash = staging / ".replaced"
    trash.mkdir()
    for name in sorted(new | (mine - new)):
        old = dest / name
        if name not in mine and (old.exists() or old.is_symlink()):
            raise PalmkitError(f"{target} holds {name}, which palmkit did not write there: left as it is, and "
                               "nothing written; move it elsewhere or give a new or empty folder")
    removed = set()
    for name in sorted(new | (mine - new)):
        old = dest / name
        if old.is_dir() and not old.is_symlink():  # a folder is not replaced by a rename: move it aside first
            os.replace(old, trash / name)
            removed.add(name)
        if name in new:
            os.replace(staging / name, old)
        elif old.exists() or old.is_symlink():
            old.unlink()
            removed.add(name)
    if manifest:  # what was written now, and what palmkit wrote or claimed before and is still there to claim
        _write_manifest(dest, new | (written - (removed - new)))
    _fsync_dir(dest)


@contextmanager
def staged_dir(target: str | os.PathLike, own: Collection[str] | None = None, force: bool = False
               ) -> Iterator[Path]:
    """An empty folder beside `target` to fill; on success it replaces `target`, on an error it is removed.

    Built in `target`'s parent so that the swap is a rename on one file system; an error inside the block
    leaves the old `target` as it was. `own` names the files palmkit writes in such a folder: the folder gets a
    manifest of what it wrote, and an existing `target` that holds anything but those (as its manifest lists
    them) is refused before the block runs, or with `force` is updated in place, palmkit's files replaced and
    the others kept (`check_destination`). own=None (palmkit's own work folders): no manifest, and the names the
    block wrote are palmkit's. Staging folders that a killed run left beside `target` are removed first
    (`remove_stale_staging`). The folder gets the mode `mkdir` would give it, or the old target's.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = own is not None
    if own is not None:
        check_destination(target, own, force)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        staging.chmod(_mode_for(target, 0o777))
        _write_mark(staging)
        yield staging
        names = set(own) if own is not None else {p.name for p in staging.iterdir()}
        if manifest:  # what the block wrote, and the names palmkit claimed there before (its logs, written later)
            _write_manifest(staging, {p.name for p in staging.iterdir()} - {STAGING_MARK}
                            | (written_names(target) & names))
        fsync_tree(staging)
        check_destination(target, names, force, manifest)  # again: a long job's target may have changed meanwhile
        if target.is_symlink() or foreign_entries(target, names, manifest):
            _merge_into(staging, target, names, manifest)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            replace_dir(staging, target)
            (target / STAGING_MARK).unlink(missing_ok=True)
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


def jsonl_rows(lines: str | Iterable[str | bytes], name: str | os.PathLike = "",
               skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of JSON Lines: a whole text, or lines as they come
    (an open file: read as it goes, so a file of any size streams). A line that is not JSON is an error naming
    `name` and the line, or with `skip_bad` passed over (a log whose last line a crash tore)."""
    for n, line in enumerate(lines.splitlines() if isinstance(lines, str) else lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if not skip_bad:
                raise PalmkitError(f"{name}: line {n} is not JSON ({getattr(exc, 'msg', exc)})") from None


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
