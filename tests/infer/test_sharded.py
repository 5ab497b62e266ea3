"""Sharded batch inference: ordered output, resume without redoing records (a cut line redone), another job
refused, and `palmkit classify --input` on 2 ranks equal to one process, also after kill -9 and a rerun."""

import json
import subprocess
import time

import pytest

from palmkit.apps.commands import classify_command, generate_command
from palmkit.errors import PalmkitError
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.sharded import parts_dir, read_part, run_sharded
from palmkit.model.checkpoint import load_checkpoint
from tests.conftest import FIXTURES, finetuned_classifier
from tests.infer.conftest import kill_tree, torchrun

pytestmark = pytest.mark.timeout(600)

JOB = {"command": "test"}


def write_records(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def lengths(batch):
    return [{"n": len(r["text"])} for r in batch]


def test_output_keeps_input_order_and_fields(tmp_path):
    src = write_records(tmp_path / "in.jsonl", [f"text {'x' * i}" for i in range(10)])
    summary = run_sharded(str(src), str(tmp_path / "out.jsonl"), lengths, "text", JOB, batch_size=3)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(10))
    assert [r["n"] for r in rows] == [5 + i for i in range(10)]
    assert "0 done by an earlier run, 10 now" in summary
    assert not parts_dir(tmp_path / "out.jsonl").exists()


def test_resume_redoes_only_missing_records_and_a_cut_line(tmp_path):
    src = write_records(tmp_path / "in.jsonl", [str(i) for i in range(10)])
    out = tmp_path / "out.jsonl"
    seen = []

    def failing(batch):
        if len(seen) >= 4:
            raise RuntimeError("killed")
        seen.extend(r["id"] for r in batch)
        return lengths(batch)

    with pytest.raises(RuntimeError):
        run_sharded(str(src), str(out), failing, "text", JOB, batch_size=2)
    part = parts_dir(out) / "part-0.jsonl"
    with open(part, "ab") as f:
        f.write(b'{"i": 4, "res')  # a line the kill cut short
    assert sorted(read_part(part)[0]) == [0, 1, 2, 3]
    again = []
    summary = run_sharded(str(src), str(out), lambda b: again.extend(r["id"] for r in b) or lengths(b), "text", JOB,
                          batch_size=2)
    assert again == list(range(4, 10))
    assert "4 done by an earlier run, 6 now" in summary
    assert [json.loads(line)["n"] for line in out.read_text().splitlines()] == [1] * 10


def crash(batch):
    raise RuntimeError("killed")


def test_parts_of_another_job_are_refused(tmp_path):
    src = write_records(tmp_path / "in.jsonl", ["a", "b"])
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        run_sharded(str(src), str(out), crash, "text", JOB)
    with pytest.raises(PalmkitError, match="another job"):
        run_sharded(str(src), str(out), lengths, "text", {"command": "other"})
    assert (parts_dir(out) / "job.json").exists()  # kept for the job it belongs to


def test_bad_record_names_its_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(PalmkitError, match="line 2"):
        run_sharded(str(src), str(tmp_path / "out.jsonl"), lengths, "text", JOB)


@pytest.fixture(scope="module")
def classifier(checkpoint, tmp_path_factory):
    return finetuned_classifier(checkpoint, tmp_path_factory.mktemp("clf") / "tweets", "tweets-en", batch_size=16,
                                max_len=32)


@pytest.fixture(scope="module")
def many_texts(tmp_path_factory):
    lines = [line for line in (FIXTURES / "sample.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [f"{lines[i % len(lines)][: 20 + i % 40]} {i}" for i in range(160)]
    return write_records(tmp_path_factory.mktemp("texts") / "in.jsonl", texts)


@pytest.fixture(scope="module")
def one_process(classifier, many_texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out.jsonl"
    classify_command(checkpoint=str(classifier), input=str(many_texts), output=str(out), batch_size=1)
    return read(out)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_same(got, want):
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["id"] for r in got] == list(range(len(want)))
    for g, w in zip(got, want, strict=True):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


def torchrun_classify(classifier, src, out, **popen):
    return torchrun("classify", "--checkpoint", str(classifier), "--input", str(src), "--output", str(out),
                    "--batch_size", "1", **popen)


def test_two_ranks_equal_one_process(classifier, many_texts, one_process, tmp_path):
    run = torchrun_classify(classifier, many_texts, tmp_path / "out.jsonl", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert "160 records written" in stdout and "by 2 processes" in stdout
    assert_same(read(tmp_path / "out.jsonl"), one_process)
    assert len({r["label"] for r in one_process}) > 1  # not vacuous: the labels vary


def test_kill_and_rerun_equal_one_process(classifier, many_texts, one_process, tmp_path):
    out = tmp_path / "out.jsonl"
    run = torchrun_classify(classifier, many_texts, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = parts_dir(out)
    deadline = time.monotonic() + 240
    while sum(len(read_part(p)[0]) for p in parts.glob("part-*.jsonl")) < 10:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    kill_tree(run)  # kill -9 of every rank
    done = sum(len(read_part(p)[0]) for p in parts.glob("part-*.jsonl"))
    assert not out.exists() and 10 <= done < 160
    # the rerun (one process this time) takes the records the killed ranks finished as done
    summary = classify_command(checkpoint=str(classifier), input=str(many_texts), output=str(out), batch_size=1)
    assert f"{done} done by an earlier run, {160 - done} now" in summary
    assert_same(read(out), one_process)


def test_generate_input_file_equals_generate(checkpoint, tmp_path):
    prompts = ["The quick brown fox", "Der", "a b c d"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    generate_command(str(checkpoint), input=str(src), output=str(out), sampling=greedy, batch_size=2)
    model, tok, _ = load_checkpoint(checkpoint)
    want = generate(model, tok, prompts, greedy)
    got = read(out)
    assert [(r["prompt"], r["completion"], r["completion_tokens"]) for r in got] == [
        (p, c.text, len(c.token_ids)) for p, c in zip(prompts, want, strict=True)]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    src = write_records(tmp_path / "in.jsonl", [str(i) for i in range(6)])
    out = tmp_path / "out.jsonl"
    inner = []

    def nested(batch):  # the same command started again while this one runs
        if not inner:
            with pytest.raises(PalmkitError, match="another run is writing"):
                run_sharded(str(src), str(out), lengths, "text", JOB, batch_size=2)
            inner.append(True)
        return lengths(batch)

    run_sharded(str(src), str(out), nested, "text", JOB, batch_size=2)
    assert inner and [json.loads(line)["n"] for line in out.read_text().splitlines()] == [1] * 6


def test_a_part_file_with_zeros_after_a_crash_is_recovered(tmp_path):
    """A machine crash can leave zeros where the last writes had not reached the disk: those lines and what follows
    are redone, not read as results (nor a crash of the rerun)."""
    src = write_records(tmp_path / "in.jsonl", [str(i) for i in range(8)])
    out = tmp_path / "out.jsonl"

    def failing(batch):
        if batch[0]["id"] >= 4:
            raise RuntimeError("killed")
        return lengths(batch)

    with pytest.raises(RuntimeError):
        run_sharded(str(src), str(out), failing, "text", JOB, batch_size=2)
    part = parts_dir(out) / "part-0.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(lines[0] + lines[1] + b"\0" * len(lines[2]) + lines[3])  # record 2 lost, record 3 after it
    assert sorted(read_part(part)[0]) == [0, 1]
    again = []
    run_sharded(str(src), str(out), lambda b: again.extend(r["id"] for r in b) or lengths(b), "text", JOB,
                batch_size=2)
    assert again == list(range(2, 8))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(8))


def test_the_input_is_streamed_not_held(tmp_path):
    import tracemalloc

    texts = ["y" * 1000 + str(i) for i in range(20_000)]  # 20 MB of records
    src = write_records(tmp_path / "in.jsonl", texts)
    tracemalloc.start()
    run_sharded(str(src), str(tmp_path / "out.jsonl"), lengths, "text", JOB, batch_size=64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20  # an index of where each record starts, not the records
    rows = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(rows) == 20_000 and json.loads(rows[-1]) == {"text": texts[-1], "id": 19_999, "n": 1005}
