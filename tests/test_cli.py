"""The command line: help from docstrings, --config and --print_config, exit codes, --resume and --init_from."""

import importlib.metadata
import json
import re
import subprocess
import sys

import pytest
import yaml

import palmkit
from palmkit.cli import COMMANDS, main
from palmkit.errors import PalmkitError
from palmkit.io import load_tensors

TINY = ["--train.preset", "tiny", "--train.seq_len", "32", "--train.batch_tokens", "256", "--train.micro_batch", "4",
        "--train.warmup_steps", "1", "--train.eval_every", "0", "--train.dtype", "float32"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "palmkit.cli", *args], capture_output=True, text=True, timeout=300)


def pretrain(corpus, out, *args):
    return main(["pretrain", "--data", str(corpus), "--out", str(out), *TINY, *args])


@pytest.mark.parametrize("command", ["info", "pretrain"])
def test_preset_help_names_every_preset(command, capsys):
    from palmkit.model.palm import PRESETS

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert [name for name in PRESETS if not re.search(rf"(?<![\w-]){re.escape(name)}\b", text)] == []


def test_info_prints_paper_counts():
    r = run("info", "--preset", "palm-62b")
    assert r.returncode == 0 and "62,495,662,080" in r.stdout


def test_unknown_command_exits_2_with_the_list():
    r = run("recomend", "--help")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("palmkit: error: unknown command 'recomend'\n")
    assert "finetune classify" in r.stderr and "commands:" in r.stderr


def test_unknown_subcommand_and_bare_group(capsys):
    assert main(["finetune", "bogus"]) == 2
    assert "unknown command 'finetune bogus'" in capsys.readouterr().err
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "finetune chat" in out and "pretrain" not in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"palmkit {palmkit.__version__}\n"
    assert palmkit.__version__ == importlib.metadata.version("palmkit")  # pyproject reads it from the package


def test_package_imports_torch_only_when_asked():
    code = ("import sys, palmkit, palmkit.errors, palmkit.cli; assert 'torch' not in sys.modules; "
            "from palmkit.model.palm import PaLM; assert palmkit.PaLM is PaLM; print(palmkit.SamplingParams)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "palmkit.infer.sampling.SamplingParams" in r.stdout
    with pytest.raises(AttributeError):
        palmkit.nothing  # noqa: B018


def test_every_command_has_help(capsys):
    for words in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([*words.split(), "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: palmkit " + words in out and "--print_config" in out and "--config" in out


def option_help(text: str) -> dict[str, str]:
    """--option -> its help text on one line, from a --help output."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  --"):
            option = line.split()[0].rstrip(",")
            entries[option] = " ".join(line.split()[1:])
        elif line.startswith("      ") and entries:
            entries[option] += " " + " ".join(line.split())
    return entries


def test_pretrain_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    options = option_help(text)
    assert "peak learning rate, reached at the end of warm-up" in options["--train.lr"]
    assert "default: 0.002" in options["--train.lr"]
    assert "optimiser steps to train; 0: no step limit (max_minutes then ends the run)" in options["--train.max_steps"]
    assert "a finished checkpoint folder" in options["--init_from"]
    assert "Checkpoints (with optimiser, RNG and data-loader state" in text  # the description, from the docstring


def print_config(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--print_config"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_config_file_gives_the_same_as_flags(tmp_path, capsys):
    flags = ["pretrain", "--data", "c", "--out", "r", "--train.lr", "3e-4", "--train.max_steps", "100", "--resume"]
    config = tmp_path / "run.yaml"
    config.write_text("data: c\nout: r\nresume: true\ntrain:\n  lr: 3.0e-4\n  max_steps: 100\n")
    from_flags = print_config(flags, capsys)
    assert print_config(["pretrain", "--config", str(config)], capsys) == from_flags
    parsed = yaml.safe_load(from_flags)
    assert parsed["train"]["lr"] == 3e-4 and parsed["train"]["max_steps"] == 100 and parsed["resume"] is True
    assert parsed["train"]["preset"] == "small"  # the rest keeps the defaults
    # ... and the command does the same with either
    (tmp_path / "info.yaml").write_text("preset: tiny\nvocab_size: 300\n")
    assert main(["info", "--preset", "tiny", "--vocab_size", "300"]) == 0
    direct = capsys.readouterr().out
    assert main(["info", "--config", str(tmp_path / "info.yaml")]) == 0
    assert capsys.readouterr().out == direct and "vocabulary" in direct and " 300" in direct


def test_print_config_round_trips(tmp_path, capsys):
    first = print_config(["finetune", "classify", "--checkpoint", "c", "--out", "o", "--data.task", "tweets-en",
                          "--train.lora_rank", "8", "--train.lora_targets", "[q_proj, k_proj]", "--pooling", "mean"],
                         capsys)
    (tmp_path / "ft.yaml").write_text(first)
    assert print_config(["finetune", "classify", "--config", str(tmp_path / "ft.yaml")], capsys) == first
    parsed = yaml.safe_load(first)
    assert parsed["train"]["lora_targets"] == ["q_proj", "k_proj"] and parsed["pooling"] == "mean"
    assert parsed["train"]["lr"] == 0.0  # automatic, resolved only when training starts


def test_positional_texts_and_bool_flags(capsys):
    parsed = yaml.safe_load(print_config(["tag", "--checkpoint", "c", "我爱北京", "two words", "--json_output"],
                                         capsys))
    assert parsed["texts"] == ["我爱北京", "two words"] and parsed["json_output"] is True
    parsed = yaml.safe_load(print_config(["evaluate", "--checkpoint", "c", "--baseline", "false"], capsys))
    assert parsed["baseline"] is False


def test_argument_errors_exit_2(capsys):
    for argv in (["info", "--vocab_size", "many"], ["generate", "--prompt", "hi"], ["info", "--nope", "1"],
                 ["pretrain", "--data", "c", "--train.dtype", "bf16"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    assert "error:" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path):
    r = run("generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.strip() == f"palmkit: error: checkpoint folder not found: {tmp_path / 'missing'}"
    assert "Traceback" not in r.stderr


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(preset: str = "small") -> str:
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr("palmkit.apps.commands.describe", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["info"])

    def refused(preset: str = "small") -> str:
        raise PalmkitError(f"bad input: {preset}")

    monkeypatch.setattr("palmkit.apps.commands.describe", refused)
    assert main(["info"]) == 2
    monkeypatch.setenv("PALMKIT_DEBUG", "1")
    with pytest.raises(PalmkitError):
        main(["info"])


def test_generate_and_export_commands(tmp_path, checkpoint):
    r = run("generate", "--checkpoint", str(checkpoint), "--prompt", "Hello", "--sampling.max_new_tokens", "5",
            "--sampling.temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and "finish_reason=" in r.stdout
    # one stop string as a plain value, as the old --stop took it (a list needs --sampling.stop+ per string)
    r = run("generate", "--checkpoint", str(checkpoint), "--prompt", "Hello", "--sampling.max_new_tokens", "5",
            "--sampling.temperature", "0", "--sampling.stop", "zzz-never")
    assert r.returncode == 0, r.stderr
    assert "finish_reason=length" in r.stdout
    r = run("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


def test_resume_takes_the_saved_options_and_reports_changes(corpus, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    assert pretrain(corpus, run_dir, "--train.max_steps", "2", "--train.save_every", "2") == 0
    capsys.readouterr()
    # Only max_steps is given: the other options (preset tiny, seq_len 32, ...) come from train_config.json
    assert main(["pretrain", "--data", str(corpus), "--out", str(run_dir), "--resume", "--train.max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "options changed since it was saved: max_steps: 2 -> 3" in out
    assert json.loads(out[out.index("{"):])["step"] == 3
    saved = json.loads((run_dir / "train_config.json").read_text())["train"]
    assert saved["max_steps"] == 3 and saved["preset"] == "tiny"
    # A change the saved state cannot follow is refused before anything runs
    assert main(["pretrain", "--data", str(corpus), "--out", str(run_dir), "--resume", "--train.seq_len", "64"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"palmkit: error: cannot resume .* seq_len 32 \(given 64\)", err)


def test_init_from_starts_from_the_checkpoint_weights(corpus, tmp_path, capsys, checkpoint, one_thread):
    first = tmp_path / "first"
    assert pretrain(corpus, first, "--train.max_steps", "2") == 0
    # lr 0: the weights stay exactly what they started from
    continued = tmp_path / "continued"
    assert pretrain(corpus, continued, "--train.max_steps", "1", "--train.lr", "0", "--train.seed", "5",
                    "--init_from", str(first / "final")) == 0
    start = load_tensors(first / "final" / "model.safetensors")
    got = load_tensors(continued / "final" / "model.safetensors")
    name = "layers.0.self_attn.q_proj.weight"
    assert (got[name] == start[name]).all() and (got["embed_tokens.weight"] == start["embed_tokens.weight"]).all()
    state = json.loads((continued / "checkpoints" / "step-0000001" / "trainer_state.json").read_text())
    assert state["step"] == 1  # a new run: step count and optimiser start afresh
    # without --init_from the same options start from random weights
    fresh = tmp_path / "fresh"
    assert pretrain(corpus, fresh, "--train.max_steps", "1", "--train.lr", "0", "--train.seed", "5") == 0
    assert not (load_tensors(fresh / "final" / "model.safetensors")[name] == start[name]).all()
    capsys.readouterr()
    # a checkpoint whose tokenizer is not the corpus's is refused
    assert pretrain(corpus, tmp_path / "bad", "--train.max_steps", "1", "--init_from", str(checkpoint)) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_closed_pipe_ends_quietly():
    # `palmkit info | head -n 1`: the reader closes the pipe after one line; no traceback, the exit code of SIGPIPE
    proc = subprocess.Popen([sys.executable, "-m", "palmkit.cli", "info", "--preset", "palm-540b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
