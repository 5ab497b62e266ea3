"""`palmkit corpus build` on a cache laid out from the fixtures (no network): built-in sources, user data, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from palmkit.cli import main
from palmkit.data.corpus.build import RunOptions, SplitOptions, TokenizerOptions, build, shard_text
from palmkit.data.corpus.dedup import normalise
from palmkit.data.corpus.stages import sample_rates
from palmkit.data.shards import mixture_weights
from palmkit.errors import PalmkitError
from palmkit.io import split_list
from palmkit.model.tokenizer import Tokenizer
from tests.data.corpus.conftest import fixture_cache


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_build_writes_text_report_tokenizer_fertility_and_shards(built):
    out, summary = built
    assert sorted(p.name for p in (out / "text").iterdir()) == ["de", "en", "zh"]
    sources = set()
    for lang in ("de", "en", "zh"):
        for split in ("train", "valid"):
            rows = read_jsonl(out / "text" / lang / f"{split}.jsonl")
            assert rows and all(set(r) == {"text", "source"} and r["text"].strip() for r in rows)
            sources |= {r["source"] for r in rows}
        index = json.loads((out / "shards" / lang / "index.json").read_text())
        assert index["train"]["tokens"] > 0 and index["valid"]["tokens"] > 0
    assert {"man-de", "help-de", "fortunes-de", "fortunes-zh", "peoples-daily-zh", "man-zh", "chitchat-en",
            "bbc-en", "wiki-en", "help-en"} <= sources
    report = (out / "report.md").read_text()
    for needle in ("| de |", "| zh |", "| peoples-daily-zh | zh |", "tokens"):
        assert needle in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.vocab_size <= 1000 and tok.decode(tok.encode("Kopiert die Auswahl 中国")) == "Kopiert die Auswahl 中国"
    fertility = (out / "fertility.md").read_text()
    assert re.search(r"\| zh \| \d+ \| \d+ \| \d+ \| \d+ \| \d+\.\d+ \|", fertility)
    assert "corpus built in" in summary and "| zh |" in summary


def test_splits_are_disjoint_deduplicated_and_deterministic(built, tmp_path):
    out, _ = built
    for lang in ("de", "en", "zh"):
        train = [r["text"] for r in read_jsonl(out / "text" / lang / "train.jsonl")]
        valid = [r["text"] for r in read_jsonl(out / "text" / lang / "valid.jsonl")]
        norm = [normalise(t) for t in train + valid]
        assert len(set(norm)) == len(norm)  # no document twice, in or across splits
    bz = [r["text"] for r in read_jsonl(out / "text" / "de" / "train.jsonl") + read_jsonl(
        out / "text" / "de" / "valid.jsonl") if "bzip2recover" in r["text"]]
    assert len(bz) == 1  # bzcat.1 is a copy of bzip2.1
    # The same build with two worker processes writes the very same files.
    cache = fixture_cache(tmp_path / "cache", ("de", "zh"))
    build(str(tmp_path / "again"), langs=["de", "zh"], tokenizer=TokenizerOptions(vocab_size=1000),
          run=RunOptions(cache=str(cache), workers=2))
    for lang in ("de", "zh"):
        for split in ("train.jsonl", "valid.jsonl"):
            assert (tmp_path / "again/text" / lang / split).read_bytes() == (out / "text" / lang / split).read_bytes()


def same_files(a: Path, b: Path) -> None:
    """Every file of two corpus folders byte for byte, but the report (it holds the build's timings)."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert any(n.endswith("train.bin") for n in names) and "tokenizer.model" in names
    for name in names:
        if name != "report.md":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_shard_text_writes_the_shards_the_build_wrote(built, tmp_path):
    """A corpus laid out by hand (text and tokenizer) gets the build's own shards: the tests' fixtures use it."""
    import shutil

    out, _ = built
    shutil.copytree(out / "text", tmp_path / "text")
    shutil.copyfile(out / "tokenizer.model", tmp_path / "tokenizer.model")
    summary = shard_text(tmp_path)
    assert sorted(summary) == sorted(p.name for p in (out / "shards").iterdir())
    for lang in summary:
        for name in ("train.bin", "valid.bin", "index.json"):
            assert (tmp_path / "shards" / lang / name).read_bytes() == (out / "shards" / lang / name).read_bytes()
    assert not (tmp_path / ".build").exists()
    assert (tmp_path / "text/en/train.jsonl").read_bytes() == (out / "text/en/train.jsonl").read_bytes()


def test_two_workers_and_two_machines_write_the_same_corpus(built, tmp_path):
    out, _ = built
    cache = fixture_cache(tmp_path / "cache", ("en", "de", "zh"))
    build(str(tmp_path / "two"), langs=["en,de", "zh"], tokenizer=TokenizerOptions(vocab_size=1000),
          run=RunOptions(cache=str(cache), workers=2))
    same_files(out, tmp_path / "two")
    # two machines sharing the folder: each runs its half of every stage, machine 0 writes the corpus
    cmd = [sys.executable, "-m", "palmkit.cli", "corpus", "build", "--out", str(tmp_path / "nodes"), "--langs",
           "en,de,zh", "--run.cache", str(cache), "--tokenizer.vocab_size", "1000", "--run.workers", "1",
           "--run.nodes", "2"]
    logs = [open(tmp_path / f"node{r}.log", "w") for r in (0, 1)]
    runs = [subprocess.Popen([*cmd, "--run.node_rank", str(r)], stderr=logs[r]) for r in (1, 0)]
    try:
        codes = [r.wait(timeout=600) for r in runs]
    finally:
        for r in runs:
            r.kill()
        for f in logs:
            f.close()
    assert codes == [0, 0], [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    same_files(out, tmp_path / "nodes")


def test_two_workers_share_the_dedup_partitions_and_write_the_same_corpus(tmp_path, monkeypatch):
    from palmkit.data.corpus import build as build_module
    from tests.data.corpus.conftest import perturbed_articles

    monkeypatch.setattr(build_module, "DEDUP_PART_BYTES", 10_000)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in perturbed_articles(seed=4)), encoding="utf-8")
    args = dict(langs="en", subset="none", inputs=str(data), lang="en", tokenizer=TokenizerOptions(vocab_size=400))
    build(str(tmp_path / "one"), **args, run=RunOptions(workers=1, unit_mb=0.02))
    build(str(tmp_path / "two"), **args, run=RunOptions(workers=2, unit_mb=0.02))
    same_files(tmp_path / "one", tmp_path / "two")
    near = re.search(r"^\| en \| [\d.]+ \| \d+ \| [\d,]+ \| \d+ \| [\d.]+ \| (\d+) \| (\d+) \|",
                     (tmp_path / "two/report.md").read_text(), re.M)
    assert near and int(near.group(1)) >= 5 and int(near.group(2)) >= 5  # exact and near copies were removed


DIE_AT = """
import os, signal, sys
import palmkit.data.corpus.build as build_module
import palmkit.data.corpus.stages as stages
from palmkit.data.corpus.build import RunOptions, TokenizerOptions, build
stage, n = sys.argv[1], int(sys.argv[2])
build_module.DEDUP_PART_BYTES = int(sys.argv[5])
real, calls = getattr(stages, stage), []
def dying(*args):
    calls.append(args)
    if len(calls) == n:
        os.killpg(0, signal.SIGKILL)  # the build and its helper processes, no clean-up: as when a machine goes down
    return real(*args)
setattr(stages, stage, dying)
build(sys.argv[3], langs="en", subset="none", inputs=sys.argv[4], lang="en", tokenizer=TokenizerOptions(vocab_size=400),
      run=RunOptions(workers=1, unit_mb=0.004))
"""


UNITS = ("extract_unit", "pairs_unit", "verify_unit", "dedup_unit", "split_unit", "encode_unit")  # as they run


@pytest.mark.parametrize(("stage", "n"), [("extract_unit", 3), ("pairs_unit", 3), ("encode_unit", 4)])
def test_a_killed_build_resumes_without_redoing_and_writes_the_same_files(tmp_path, monkeypatch, stage, n):
    from palmkit.data.corpus import build as build_module
    from palmkit.data.corpus import stages
    from tests.data.corpus.conftest import perturbed_articles

    monkeypatch.setattr(build_module, "DEDUP_PART_BYTES", 10_000)  # several dedup partitions
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in perturbed_articles(seed=3)), encoding="utf-8")
    args = dict(langs="en", subset="none", inputs=str(data), lang="en", tokenizer=TokenizerOptions(vocab_size=400),
                run=RunOptions(workers=1, unit_mb=0.004))
    calls: Counter = Counter()
    for name in UNITS:
        real = getattr(stages, name)
        monkeypatch.setattr(stages, name, lambda *a, _real=real, _name=name: (calls.update([_name]), _real(*a))[1])
    build(str(tmp_path / "whole"), **args)
    whole = Counter(calls)
    assert whole[stage] > n  # the kill falls inside the stage
    with open(tmp_path / "stderr", "w") as err:
        killed = subprocess.run([sys.executable, "-c", DIE_AT, stage, str(n), str(tmp_path / "out"), str(data),
                                 "10000"],
                                stderr=err, timeout=300, start_new_session=True)
    assert killed.returncode == -9, (tmp_path / "stderr").read_text()
    assert (tmp_path / "out/.build").is_dir() and not (tmp_path / "out/shards").exists()
    calls.clear()
    build(str(tmp_path / "out"), **args)
    same_files(tmp_path / "whole", tmp_path / "out")
    # the units finished before the kill do not run again; the one it interrupted does
    expected = Counter({k: v for k, v in whole.items() if UNITS.index(k) >= UNITS.index(stage)})
    expected[stage] = whole[stage] - (n - 1)
    assert calls == expected


def test_max_mb_per_lang_caps_a_language(tmp_path):
    cache = fixture_cache(tmp_path / "cache", ("de",))
    build(str(tmp_path / "out"), langs=["de"], tokenizer=TokenizerOptions(vocab_size=400),
          run=RunOptions(cache=str(cache), workers=1), split=SplitOptions(max_mb_per_lang=0.01))
    docs = [r["text"] for s in ("train", "valid") for r in read_jsonl(tmp_path / "out/text/de" / f"{s}.jsonl")]
    size = sum(len(d.encode()) for d in docs)
    assert 10_000 <= size <= 10_000 + max(len(d.encode()) for d in docs)  # stops at the first document past 10 kB


def test_temperature_sampling_of_tokenizer_lines():
    plans = {"big": {"train_bytes": 320_000, "parts": 3}, "small": {"train_bytes": 1_600, "parts": 1},
             "gone": {"train_bytes": 0, "parts": 0}}
    rates = sample_rates(plans, alpha=0.3, budget=200_000)
    drawn = {lang: rates[lang] * plans[lang]["train_bytes"] for lang in rates}
    w = mixture_weights({"big": 320_000, "small": 1_600}, 0.3)
    assert set(rates) == {"big", "small"} and sum(drawn.values()) == pytest.approx(200_000)
    assert drawn["small"] / 200_000 == pytest.approx(w["small"]) and w["small"] > 0.15  # upsampled from 0.5%
    assert rates["small"] > 1 > rates["big"]  # small languages' lines repeat, big ones' are sampled


# --------------------------------------------------------------------------------------------------
# User data


def test_user_inputs_txt_jsonl_csv_with_invalid_utf8(tmp_path, capsys):
    data = tmp_path / "mine"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("Erster Absatz mit genug Text darin.\nZweite Zeile.\n\n"
                                "Zweiter Absatz, auch lang genug.\n")
    (data / "sub" / "b.jsonl").write_bytes(b'{"body": "Ein Dokument aus einer JSONL-Datei."}\n'
                                           b'{"body": "Kaputt \xff\xfe kodiert, wird gezaehlt."}\nnot json\n')
    (data / "sub" / "c.csv").write_bytes(b'id,body\n1,"Eine Zeile aus CSV, mit Komma."\n'
                                         b'2,"Noch eine CSV-Zeile, lang genug."\n3,"bad \xc3\x28 bytes here ok"\n')
    (data / "ignored.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    build(str(out), subset="none", inputs=[str(data)], lang="de", text_field="body",
          tokenizer=TokenizerOptions(vocab_size=400), run=RunOptions(workers=1))
    texts = {r["text"] for s in ("train", "valid") for r in read_jsonl(out / "text/de" / f"{s}.jsonl")}
    assert texts == {"Erster Absatz mit genug Text darin.\nZweite Zeile.", "Zweiter Absatz, auch lang genug.",
                     "Ein Dokument aus einer JSONL-Datei.", "Eine Zeile aus CSV, mit Komma.",
                     "Noch eine CSV-Zeile, lang genug."}
    err = capsys.readouterr().err
    assert re.search(r"skipped 2 record\(s\) of \S*b\.jsonl", err)
    assert re.search(r"skipped 1 record\(s\) of \S*c\.csv", err)
    assert "| user:mine | de |" in (out / "report.md").read_text()
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted((Path(r["file"]).name, r["line"]) for r in rejected) == [("b.jsonl", 2), ("b.jsonl", 3),
                                                                           ("c.csv", 4)]
    assert "## Skipped input records" in (out / "report.md").read_text()


SEVEN = Path(__file__).parents[2] / "fixtures/corpus/seven-languages.jsonl"  # make_seven_languages.py beside it


def test_lang_auto_labels_the_documents_of_a_file_of_seven_languages(tmp_path, capsys):
    """Real text of the seven built-in languages' sources in one shuffled file: each document goes to its
    language, or to rejected.jsonl with its reason; no warning about languages nobody asked for."""
    rows = read_jsonl(SEVEN)
    assert Counter(r["lang"] for r in rows).keys() == {"en", "zh", "de", "fr", "es", "ru", "ja"}
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    out = tmp_path / "out"
    build(str(out), subset="none", inputs=str(data), lang="auto", tokenizer=TokenizerOptions(vocab_size=1000),
          run=RunOptions(workers=1))
    got = {r["text"]: d.name for d in (out / "text").iterdir()
           for split in ("train", "valid") for r in read_jsonl(d / f"{split}.jsonl")}
    right = sum(got.get(r["text"]) == r["lang"] for r in rows)
    assert right >= 0.95 * len(rows), (right, len(rows))
    assert {p.name for p in (out / "text").iterdir()} >= {"de", "en", "es", "fr", "ja", "ru", "zh"}
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()] \
        if (out / "rejected.jsonl").exists() else []
    assert len(got) + len(rejected) == len(rows)  # every document is somewhere
    assert all(r["reason"].startswith("language unclear") for r in rejected)
    assert "no text for language" not in capsys.readouterr().err


def test_langs_keeps_the_languages_asked_for(tmp_path):
    rows = [r for r in read_jsonl(SEVEN) if r["lang"] in ("de", "fr", "ru")]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    out = tmp_path / "out"
    build(str(out), langs="de,ru", subset="none", inputs=str(data), lang="auto",
          tokenizer=TokenizerOptions(vocab_size=600), run=RunOptions(workers=1))
    assert sorted(p.name for p in (out / "text").iterdir()) == ["de", "ru"]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    others = [r for r in rejected if r["reason"] == "language fr not in --langs"]
    assert len(others) >= 0.95 * sum(r["lang"] == "fr" for r in rows)
    assert {r["line"] for r in others} <= {i + 1 for i, r in enumerate(rows) if r["lang"] == "fr"}
    with pytest.raises(PalmkitError, match="--langs xx: not a language --lang auto knows"):
        build(str(out), langs="de,xx", subset="none", inputs=str(data), lang="auto", run=RunOptions(workers=1))


def _documents(shards: Path, tokenizer: Tokenizer) -> list[str]:
    """The documents of a language's token shards, decoded (each is BOS ... EOS)."""
    index = json.loads((shards / "index.json").read_text())
    docs = []
    for split in ("train", "valid"):
        ids = np.fromfile(shards / f"{split}.bin", dtype=index["dtype"]).tolist()
        while ids:
            end = ids.index(tokenizer.eos_id)
            assert ids[0] == tokenizer.bos_id
            docs.append(tokenizer.decode(ids[1:end]))
            ids = ids[end + 1:]
    return docs


def test_code_and_markdown_come_back_byte_for_byte(tmp_path):
    """Source files and Markdown through the corpus and the tokenizer: the shards decode to the input documents,
    indentation, tabs, blank lines and trailing spaces included; --normalize tidies them as before."""
    root = Path(__file__).parents[3]
    docs = [p.read_text(encoding="utf-8") for p in sorted((root / "src/palmkit/data/corpus").glob("*.py"))]
    docs += ["## " + part for part in (root / "README.md").read_text(encoding="utf-8").split("\n## ")[1:]]
    docs += ["all: build\n\nbuild:\n\t$(CC) -o app main.c   \n\tstrip app\n\n\n\n# trailing\t \n",
             "  leading spaces\r\nand a CRLF line\r\n\f\n    end  "]
    assert len(set(docs)) == len(docs) and sum(d.count("\n    ") for d in docs) > 500
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "out"
    build(str(out), subset="none", inputs=str(data), lang="en", tokenizer=TokenizerOptions(vocab_size=2000),
          run=RunOptions(workers=1))
    texts = [r["text"] for s in ("train", "valid") for r in read_jsonl(out / "text/en" / f"{s}.jsonl")]
    assert sorted(texts) == sorted(docs)
    decoded = _documents(out / "shards/en", Tokenizer(out / "tokenizer.model"))
    assert sorted(decoded) == sorted(docs)
    build(str(out), subset="none", inputs=str(data), lang="en", normalize=True,
          tokenizer=TokenizerOptions(vocab_size=2000), run=RunOptions(workers=1))
    texts = [r["text"] for s in ("train", "valid") for r in read_jsonl(out / "text/en" / f"{s}.jsonl")]
    assert not any("\n    " in t for t in texts)  # the old cleaning strips each line


def test_user_text_loses_only_control_characters(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"text": "keep\tthis  text\x00 as \x1b[31mgiven\x1b[0m\x07, \ud800 ok.\n\n\n  end"})
                    + "\n", encoding="utf-8")
    out = tmp_path / "out"
    build(str(out), subset="none", inputs=str(data), lang="en", tokenizer=TokenizerOptions(vocab_size=300),
          run=RunOptions(workers=1))
    texts = [r["text"] for s in ("train", "valid") for r in read_jsonl(out / "text/en" / f"{s}.jsonl")]
    assert texts == ["keep\tthis  text as given, \ufffd ok.\n\n\n  end"]
    assert "took out 4 control character(s) or escape sequence(s) and replaced 1 invalid" in capsys.readouterr().err


def test_user_input_errors_are_clear(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(PalmkitError, match=r"no documents in --inputs .*empty\.jsonl"):
        build(str(tmp_path / "o"), subset="none", inputs=[str(empty)], lang="de", run=RunOptions(workers=1))
    with pytest.raises(PalmkitError, match="--inputs needs --lang"):
        build(str(tmp_path / "o"), subset="none", inputs=[str(empty)])
    bad = tmp_path / "t.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(PalmkitError, match="no column 'text'"):
        build(str(tmp_path / "o"), subset="none", inputs=[str(bad)], lang="de", run=RunOptions(workers=1))
    r = subprocess.run([sys.executable, "-m", "palmkit.cli", "corpus", "build", "--out", str(tmp_path / "o"),
                        "--subset", "none", "--inputs", str(empty), "--lang", "de"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("palmkit: error: no documents in --inputs")
    assert len(r.stderr.strip().splitlines()) == 1  # no traceback, no progress bar outside a terminal


# --------------------------------------------------------------------------------------------------
# The command


def test_cli_commands_are_registered(capsys):
    with pytest.raises(SystemExit):
        main(["corpus", "build", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--out", "--langs", "--inputs", "--text_field", "--subset", "--split.max_mb_per_lang",
                   "--tokenizer.alpha", "--tokenizer.vocab_size", "--run.workers", "--run.cache", "--normalize"):
        assert option in help_text
    # each option is explained by build's docstring
    assert "share of each language's documents held out for validation" in " ".join(help_text.split())
    assert split_list(["en,zh", "de"]) == ["en", "zh", "de"] and split_list("fr") == ["fr"]
