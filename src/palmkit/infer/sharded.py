"""Sharded batch inference: `torchrun --nproc_per_node=N -m palmkit.cli classify|tag|generate --input big.jsonl
--output out.jsonl` splits the records over the ranks (data parallel: each rank holds the whole model).

Each rank appends its results to its own part file in OUT.parts/, one JSON line per record with the record's
index, flushed and fsynced after every batch: a run killed at any moment loses at most the batch in flight. Run the
same command again and the records already in a part file are skipped (a line cut short by the kill, or left
unreadable by a crash of the machine, is dropped with everything after it), whatever the number of ranks this
time. When every record is done, rank 0 writes OUT in input order, atomically, and removes OUT.parts/.

Nothing is held whole: each rank reads the input once to check it and note where each record starts (8 bytes a
record), then reads only its own records; rank 0 writes OUT record by record from the input and the part files.
Each rank holds a lock on its part file while it runs, so a second run on the same OUT is refused at once
instead of doing the same records again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import torch.distributed as dist
from tqdm import tqdm

from palmkit.errors import PalmkitError
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.tensor_parallel import control_group
from palmkit.io import atomic_open, atomic_write_json, load_json
from palmkit.model.checkpoint import load_checkpoint
from palmkit.train.distributed import Dist, init_distributed

MANIFEST = "job.json"
LOCK_WAIT = 5.0  # seconds: a run killed a moment ago releases its locks as its processes end

Predict = Callable[[list[dict]], Sequence[dict]]


def scan_records(path: str | os.PathLike, field: str) -> tuple[array, str]:
    """(where each record's line starts, the file's sha256) of a JSONL file of objects with a string `field`,
    read line by line; blank lines skipped; a bad line is an error naming it."""
    path = Path(path)
    digest, starts, pos = hashlib.sha256(), array("q"), 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            digest.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PalmkitError(f"{path}: line {n} is not valid UTF-8; save the file as UTF-8") from None
            if n == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PalmkitError(f"{path}: line {n} is not JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise PalmkitError(f"{path}: line {n} is not a JSON object with a string field {field!r}")
                starts.append(pos + (len(raw) - len(raw.removeprefix(b"\xef\xbb\xbf")) if n == 1 else 0))
            pos += len(raw)
    return starts, digest.hexdigest()


def read_at(f: IO[bytes], start: int) -> dict:
    f.seek(start)
    return json.loads(f.readline())


def read_part(path: Path) -> tuple[dict[int, int], int]:
    """(where each record's result starts, by record index; byte length of the good lines) of a part file. The
    good lines end at the first that is not a whole result: a last line a kill cut short, or the zeros a crash
    of the machine left where data had not reached the disk."""
    done: dict[int, int] = {}
    if not path.exists():
        return done, 0
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError
                entry = json.loads(line)
                if not isinstance(entry["result"], dict):
                    raise ValueError
                done[int(entry["i"])] = pos
            except (ValueError, KeyError, TypeError):
                break
            pos += len(line)
    return done, pos


def _lock(path: Path) -> IO[bytes]:
    """`path` opened for appending and locked for this process, or an error if another run holds it."""
    f = open(path, "ab")
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                raise PalmkitError(f"another run is writing {path}: wait for it to end, or choose another "
                                   "--output") from None
            time.sleep(0.1)


def parts_dir(output: str | os.PathLike) -> Path:
    """Where the ranks keep their results until the output is written."""
    out = Path(output)
    return out.with_name(out.name + ".parts")


def run_sharded(input: str, output: str, predict: Predict, field: str, job: dict, batch_size: int = 32,
                d: Dist | None = None) -> str | None:
    """Apply `predict` to the records of INPUT (a JSONL file of objects with a string `field`) in batches, each
    rank a share; write OUTPUT: every record with its result's keys added, in input order.

    `job` (command, checkpoint, options) is kept with the part files: a rerun for another job or another input
    is refused rather than mixed in. Returns a summary on rank 0 and None on the others.
    """
    if batch_size < 1:
        raise PalmkitError(f"batch_size must be >= 1, got {batch_size}")
    if Path(output).resolve() == Path(input).resolve():
        raise PalmkitError("--output must not be the --input file")
    d = d or init_distributed()
    starts, digest = scan_records(input, field)
    parts = parts_dir(output)
    manifest = {"input": str(Path(input).resolve()), "input_sha256": digest, "records": len(starts), "job": job}
    if (parts / MANIFEST).exists() and load_json(parts / MANIFEST, "job manifest") != manifest:
        raise PalmkitError(f"{parts} holds the results of another job or input (see its {MANIFEST}): remove it, "
                           "or choose another --output")
    group = control_group() if d.world_size > 1 else None
    parts.mkdir(parents=True, exist_ok=True)
    own = parts / f"part-{d.rank}.jsonl"
    with _lock(own) as f, open(input, "rb") as source:
        _barrier(group)  # every rank holds its lock before any reads the parts: a second run stops here
        done = set()
        for part in sorted(parts.glob("part-*.jsonl")):
            done.update(read_part(part)[0])
        if d.is_main:
            atomic_write_json(parts / MANIFEST, manifest)
        _barrier(group)  # every rank has read the parts before any rank adds to them: all split the same records
        todo = [i for i in range(len(starts)) if i not in done]
        mine = todo[d.rank * len(todo) // d.world_size:(d.rank + 1) * len(todo) // d.world_size]
        f.truncate(read_part(own)[1])  # drop a line cut short by a kill, and what follows it
        bar = tqdm(total=len(mine), unit="rec", desc=f"rank 0 of {d.world_size}", disable=not d.is_main)
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            results = predict([read_at(source, starts[i]) for i in batch])
            f.write(b"".join(json.dumps({"i": i, "result": r}, ensure_ascii=False).encode() + b"\n"
                             for i, r in zip(batch, results, strict=True)))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
        bar.close()
        _barrier(group)
    if not d.is_main:
        return None
    _write_output(output, input, starts, parts)
    shutil.rmtree(parts)
    return (f"{len(starts)} records written to {output}: {len(done)} done by an earlier run, "
            f"{len(todo)} now by {d.world_size} process{'es' if d.world_size > 1 else ''}")


def _write_output(output: str, input: str, starts: array, parts: Path) -> None:
    """OUTPUT in input order, each record with its result's keys, one record in memory at a time."""
    files = sorted(parts.glob("part-*.jsonl"))
    where_part, where = array("i", [-1]) * len(starts), array("q", [0]) * len(starts)
    for k, part in enumerate(files):
        for i, pos in read_part(part)[0].items():
            if 0 <= i < len(starts):
                where_part[i], where[i] = k, pos
    missing = where_part.count(-1)
    if missing:  # only if a part file was removed while the ranks ran
        raise PalmkitError(f"{missing} records have no result in {parts}: run the command again")
    handles = [open(part, "rb") for part in files]
    try:
        with open(input, "rb") as source, atomic_open(output) as out:
            for i, start in enumerate(starts):
                result = read_at(handles[where_part[i]], where[i])["result"]
                out.write(json.dumps({**read_at(source, start), **result}, ensure_ascii=False).encode() + b"\n")
    finally:
        for h in handles:
            h.close()


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


def _device(d: Dist, device: str) -> str:
    # under torchrun each rank takes its own GPU (or the CPU); alone, the device asked for
    return str(d.device) if d.world_size > 1 else device


def classify_file(checkpoint: str, input: str, output: str, batch_size: int = 32, field: str = "text",
                  device: str = "cpu") -> str | None:
    """`run_sharded` with a fine-tuned classifier: each record gets "label" and "probabilities"."""
    d = init_distributed()
    clf = load_classifier(checkpoint, device=_device(d, device))

    def predict(batch: list[dict]) -> list[dict]:
        return [{"label": label, "probabilities": probs}
                for label, probs in clf.predict([r[field] for r in batch], batch_size)]

    job = {"command": "classify", "checkpoint": str(Path(checkpoint).resolve()), "field": field}
    return run_sharded(input, output, predict, field, job, batch_size, d)


def tag_file(checkpoint: str, input: str, output: str, batch_size: int = 32, field: str = "text",
             device: str = "cpu") -> str | None:
    """`run_sharded` with a fine-tuned tagger: each record gets "entities" (type, text, start, end)."""
    d = init_distributed()
    tagger = load_tagger(checkpoint, device=_device(d, device))

    def predict(batch: list[dict]) -> list[dict]:
        return [{"entities": e} for e in tagger.tag([r[field] for r in batch])]

    job = {"command": "tag", "checkpoint": str(Path(checkpoint).resolve()), "field": field}
    return run_sharded(input, output, predict, field, job, batch_size, d)


def generate_file(checkpoint: str, input: str, output: str, params: SamplingParams, batch_size: int = 8,
                  field: str = "prompt", device: str = "cpu") -> str | None:
    """`run_sharded` with a language model: each record gets "completion", "finish_reason", "completion_tokens"."""
    d = init_distributed()
    model, tokenizer, _ = load_checkpoint(checkpoint, device=_device(d, device))

    def predict(batch: list[dict]) -> list[dict]:
        return [{"completion": c.text, "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids)}
                for c in generate(model, tokenizer, [r[field] for r in batch], params)]

    job = {"command": "generate", "checkpoint": str(Path(checkpoint).resolve()), "field": field,
           "params": {**dataclasses.asdict(params), "stop": list(params.stop)}}
    return run_sharded(input, output, predict, field, job, batch_size, d)
