"""Sharded batch inference: `torchrun --nproc_per_node=N -m palmkit.cli classify|tag|generate --input big.jsonl
--output out.jsonl` splits the records over the ranks (data parallel: each rank holds the whole model).

Each rank appends its results to its own part file in OUT.parts/, one JSON line per record with the record's
index, flushed and fsynced after every batch: a run killed at any moment loses at most the batch in flight. Run the
same command again and the records already in a part file are skipped (a line cut short by the kill is dropped),
whatever the number of ranks this time. When every record is done, rank 0 writes OUT in input order, atomically,
and removes OUT.parts/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from palmkit.errors import PalmkitError
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.tensor_parallel import control_group
from palmkit.io import atomic_write_bytes, atomic_write_json, decode_text, jsonl_rows, load_json
from palmkit.model.checkpoint import load_checkpoint
from palmkit.train.distributed import Dist, init_distributed

MANIFEST = "job.json"

Predict = Callable[[list[dict]], Sequence[dict]]


def read_records(path: str | os.PathLike, field: str) -> tuple[list[dict], str]:
    """(JSON objects of a JSONL file, each with a string `field`; the file's sha256); blank lines skipped."""
    path = Path(path)
    raw = path.read_bytes()
    records = []
    for n, record in jsonl_rows(decode_text(raw, name=path), name=path):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise PalmkitError(f"{path}: line {n} is not a JSON object with a string field {field!r}")
        records.append(record)
    return records, hashlib.sha256(raw).hexdigest()


def read_part(path: Path) -> tuple[dict[int, dict], int]:
    """(results by record index, byte length of the complete lines) of a part file; a last line without its
    newline, which a kill cut short, is not a result."""
    if not path.exists():
        return {}, 0
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    done = {}
    for line in raw[:end].splitlines():
        entry = json.loads(line)
        done[entry["i"]] = entry["result"]
    return done, end


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
    records, digest = read_records(input, field)
    parts = parts_dir(output)
    manifest = {"input": str(Path(input).resolve()), "input_sha256": digest, "records": len(records), "job": job}
    if (parts / MANIFEST).exists() and load_json(parts / MANIFEST) != manifest:
        raise PalmkitError(f"{parts} holds the results of another job or input (see its {MANIFEST}): remove it, "
                           "or choose another --output")
    group = control_group() if d.world_size > 1 else None
    done: dict[int, dict] = {}
    for part in sorted(parts.glob("part-*.jsonl")):
        done.update(read_part(part)[0])
    if d.is_main:
        atomic_write_json(parts / MANIFEST, manifest)
    _barrier(group)  # every rank has read the parts before any rank adds to them: all split the same records
    todo = [i for i in range(len(records)) if i not in done]
    mine = todo[d.rank * len(todo) // d.world_size:(d.rank + 1) * len(todo) // d.world_size]
    own = parts / f"part-{d.rank}.jsonl"
    parts.mkdir(parents=True, exist_ok=True)
    with open(own, "ab") as f:
        f.truncate(read_part(own)[1])  # drop a line cut short by a kill
        bar = tqdm(total=len(mine), unit="rec", desc=f"rank 0 of {d.world_size}", disable=not d.is_main)
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            results = predict([records[i] for i in batch])
            f.write(b"".join(json.dumps({"i": i, "result": r}, ensure_ascii=False).encode() + b"\n"
                             for i, r in zip(batch, results, strict=True)))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
        bar.close()
    _barrier(group)
    if not d.is_main:
        return None
    results: dict[int, dict] = {}
    for part in sorted(parts.glob("part-*.jsonl")):
        results.update(read_part(part)[0])
    missing = len(records) - len(results)
    if missing:  # only if a part file was removed while the ranks ran
        raise PalmkitError(f"{missing} records have no result in {parts}: run the command again")
    atomic_write_bytes(output, b"".join(json.dumps({**r, **results[i]}, ensure_ascii=False).encode() + b"\n"
                                        for i, r in enumerate(records)))
    shutil.rmtree(parts)
    return (f"{len(records)} records written to {output}: {len(done)} done by an earlier run, "
            f"{len(todo)} now by {d.world_size} process{'es' if d.world_size > 1 else ''}")


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
