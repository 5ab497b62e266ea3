import subprocess
import sys

import pytest

from palmkit.cli import COMMANDS, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "palmkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_prints_paper_counts():
    r = run("info", "--preset", "palm-62b")
    assert r.returncode == 0 and "62,495,662,080" in r.stdout


def test_unknown_command_lists_commands(capsys):
    assert main(["nope"]) == 2
    assert "commands:" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for words in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([*words.split(), "--help"])
        assert exc.value.code == 0
        assert "usage: palmkit " + words in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path):
    r = run("generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.strip() == f"palmkit: error: checkpoint folder not found: {tmp_path / 'missing'}"
    assert "Traceback" not in r.stderr


def test_generate_and_export_commands(tmp_path, checkpoint):
    r = run("generate", "--checkpoint", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and "finish_reason=" in r.stdout
    r = run("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
