"""`palmkit corpus fetch`: a source that cannot be fetched is reported, and the others still build."""

from __future__ import annotations

from palmkit.data.corpus.build import RunOptions, TokenizerOptions, build
from palmkit.data.corpus.sources import SOURCES, fetch
from palmkit.data.fetch import MARKER, package_path
from tests.data.conftest import fail_downloads
from tests.data.corpus.conftest import fixture_cache


def test_fetch_reports_a_source_that_cannot_be_fetched(tmp_path, monkeypatch, capsys):
    cache = fixture_cache(tmp_path, ("de",))
    failing = next(s.package for s in SOURCES if s.name == "fortunes-de")
    (package_path(failing, cache) / MARKER).unlink()
    fail_downloads(monkeypatch)
    monkeypatch.setattr("palmkit.data.fetch.os.geteuid", lambda: 1000)  # never run apt-get update from a test
    summary = fetch(["de"], cache=str(cache))
    assert "2 of 3 sources ready" in summary and "FAILED fortunes-de=0.35-1" in summary
    assert "could not fetch fortunes-de=0.35-1 (sources fortunes-de)" in capsys.readouterr().err
    out = build(str(tmp_path / "out"), langs=["de"], tokenizer=TokenizerOptions(vocab_size=400),
                run=RunOptions(cache=str(cache), workers=1))
    assert "| de |" in out  # the other sources still build
