"""`palmkit <command>`: a thin layer on jsonargparse that turns functions of the Python API into subcommands.

Each command is a typed function; nothing here describes its options. Its parameters become options spelled as
in Python (`--prompt Hello`) and its docstring the `--help`: the description, then for each option its entry
in the Google-style `Args:` section. A parameter typed with a dataclass becomes a group of options
(`--train.lr 3e-4`) explained by the fields' docstrings. Positional-only parameters (before `/`) are positional
arguments. Every command reads `--config FILE.yaml` (what `--print_config` writes; options given after it
override it). A command may take defaults from what its options point at, through a function `saved_defaults`
set on it (pretrain's: `--resume` continues with the options the run was saved with). A bool option alone means
true (`--resume`; `--baseline false` to turn one off). Lists are YAML
(`--eval_tasks '[sentiment-fr,sentiment-de]'`, or `--eval_tasks+ X` to append); where a function accepts a
comma-separated string too, its help says so.

Only the chosen command's module is imported, so `palmkit --help` starts fast. Errors a user can fix
(palmkit.errors.USER_ERRORS) print `palmkit: error: MESSAGE` and exit 2, like bad arguments; PALMKIT_DEBUG=1
raises them instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import version
from typing import TYPE_CHECKING

from palmkit.errors import USER_ERRORS

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

# "command words" -> ("module:function", one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("palmkit.apps.quickstart:quickstart", "the main job: corpus, tokenizer, pretraining, samples"),
    "info": ("palmkit.apps.commands:describe", "parameters and training FLOPs per token of a preset"),
    "generate": ("palmkit.apps.commands:generate_command", "complete a prompt, streaming to the terminal"),
    "chat": ("palmkit.apps.chat:chat_command", "chat with a model in the terminal: streaming, /reset, /exit"),
    "export": ("palmkit.model.export:export", "a Hugging Face folder or a GGUF file (llama.cpp, Ollama)"),
    "pretrain": ("palmkit.train.pretrain:pretrain", "pretrain on a corpus (one process or torchrun: DDP/FSDP2)"),
    "plot": ("palmkit.train.metrics:plot_run", "PNG of a run's training and per-language validation loss"),
    "quantize": ("palmkit.apps.commands:quantize_command", "int8-weight copy of a checkpoint for CPU inference"),
    "compress": ("palmkit.apps.commands:compress_command", "low-rank (SVD) copy of a checkpoint, optionally healed"),
    "finetune classify": ("palmkit.finetune.classify:finetune_classify", "fine-tune a text classifier (full or LoRA)"),
    "finetune ner": ("palmkit.finetune.ner:finetune_ner", "fine-tune a named-entity tagger (BIO)"),
    "finetune chat": ("palmkit.finetune.chat:finetune_chat", "supervised fine-tuning on conversations"),
    "evaluate": ("palmkit.apps.commands:evaluate_command", "report on a fine-tuned model beside a TF-IDF baseline"),
    "classify": ("palmkit.apps.commands:classify_command", "classify texts with a fine-tuned classifier"),
    "tag": ("palmkit.apps.commands:tag_command", "find named entities with a fine-tuned tagger"),
    "serve": ("palmkit.serve.app:serve", "OpenAI-compatible HTTP server with streaming and batching"),
    "choices write": ("palmkit.infer.choices:write_choice_items", "a classification task as multiple-choice JSONL"),
    "choices score": ("palmkit.infer.choices:score_choices", "multiple-choice accuracy by log-likelihood (as lm-eval)"),
    "corpus fetch": ("palmkit.data.corpus.sources:fetch", "download the built-in text sources into the cache"),
    "corpus build": ("palmkit.data.corpus.build:build", "clean, deduplicate, split text; tokenizer; shards"),
    "recipe support": ("palmkit.apps.support:recipe", "customer-service assistant: chat tuning, FAQ, web chat"),
    "recipe monitor": ("palmkit.apps.monitor.demo:recipe", "financial sentiment monitor: negative share, alerts"),
    "monitor": ("palmkit.apps.monitor.monitor:monitor", "sentiment monitor on a JSONL stream (file, stdin, folder)"),
    "recipe recommend": ("palmkit.apps.recommend:recipe", "movie recommendations: ALS + tuned LM scorer, evaluated"),
    "recommend": ("palmkit.apps.recommend:recommend_command", "a user's top movies from a recommender folder"),
}

HELP = ("-h", "--help")


def _usage(prefix: list[str]) -> str:
    """The list of commands under `prefix` (all of them for an empty prefix)."""
    n = len(prefix)
    rows = [(c, h) for c, (_, h) in COMMANDS.items() if c.split()[:n] == prefix]
    width = max(len(c) for c, _ in rows)
    lines = [f"usage: palmkit {' '.join(prefix) + ' ' if prefix else ''}<command> [options]", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {h}" for c, h in rows]
    lines += ["", "Run `palmkit COMMAND --help` for the options of one command; `palmkit --version` for the version."]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(command words, the rest): the longest run of leading words that starts a known command."""
    words: list[str] = []
    while argv and any(c.split()[: len(words) + 1] == [*words, argv[0]] for c in COMMANDS):
        words.append(argv.pop(0))
        if " ".join(words) in COMMANDS:
            break
    return words, argv


def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def command_parser(words: list[str], fn: Callable) -> ArgumentParser:
    """The jsonargparse parser of one command: `fn`'s parameters, `--config` and `--print_config`."""
    import docstring_parser
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the description's paragraphs and line breaks as the docstring has them."""

    # the help of a dataclass group's options is the docstring under each field
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    parser = ArgumentParser(prog="palmkit " + " ".join(words), formatter_class=Formatter,
                            description="\n\n".join(filter(None, [doc.short_description, doc.long_description])))
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of options, as --print_config writes them; options after it override it")
    positional = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.POSITIONAL_ONLY]
    parser.add_function_arguments(fn, skip={p.name for p in positional}, fail_untyped=True, as_group=False)
    helps = {p.arg_name: p.description for p in doc.params}
    for p in positional:  # typed `list[str]` (all that commands need so far): any number, at least one unless
        # the parameter has a default (a command that reads its texts from a file instead)
        parser.add_argument(p.name, nargs="+" if p.default is p.empty else "*", type=str, help=helps.get(p.name))
    for action in parser._actions:
        # `--resume` alone means `--resume true`; jsonargparse's own bool options always want the value
        if getattr(action, "_typehint", None) is bool:
            action.nargs, action.const = "?", True
    return parser


def _saved_defaults(parser: ArgumentParser, argv: list[str], defaults: Callable[..., dict]) -> None:
    """Defaults that a command reads from what its options point at (`fn.saved_defaults`), such as the options
    a resumed run was saved with: `defaults` takes some of the command's options by name and returns the
    defaults to set. Only the options typed again (or read from --config) can then differ from them."""
    from jsonargparse import ArgumentError

    # A first look at the options, without printing or exiting: the real parse in `run` does that.
    quiet = [a for a in argv if a not in HELP and not a.startswith("--print_config")]
    parser.exit_on_error = False
    try:
        first = parser.parse_args(quiet)
    except ArgumentError:
        return
    finally:
        parser.exit_on_error = True
    found = defaults(**{name: first[name] for name in inspect.signature(defaults).parameters})
    if found:
        parser.set_defaults(**found)


def _text(result) -> str | None:
    """What the terminal shows of a command's result: text as it is, a dict of metrics as JSON."""
    if isinstance(result, dict):
        return json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in result.items()},
                          indent=1, default=str, ensure_ascii=False)
    return None if result is None else str(result)


def run(words: list[str], argv: list[str]) -> int:
    """Parse `argv` for the command `words`, call its function and print the result."""
    target = COMMANDS[" ".join(words)][0]
    fn = _load(target)
    parser = command_parser(words, fn)
    if hasattr(fn, "saved_defaults"):
        _saved_defaults(parser, argv, fn.saved_defaults)
    cfg = parser.instantiate(parser.parse_args(argv))
    params = inspect.signature(fn).parameters.values()
    positional = [p.name for p in params if p.kind == p.POSITIONAL_ONLY]
    options = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    result = fn(*(cfg[n] for n in positional), **{n: cfg[n] for n in options})
    text = _text(result)
    if text is not None:
        print(text, flush=True)  # written inside main's try, so a closed pipe is reported there
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `palmkit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"palmkit {version('palmkit')}")  # the installed package's, which pyproject takes from __version__
        return 0
    words, rest = _split_command(argv)
    if " ".join(words) not in COMMANDS:
        if rest[:1] and rest[0] in HELP:
            print(_usage(words))
            return 0
        if rest[:1] and rest[0].startswith("-"):
            problem = f"unknown option {rest[0]!r}"
        elif rest[:1]:
            problem = f"unknown command {' '.join([*words, rest[0]])!r}"
        else:
            problem = f"{' '.join(words)!r} needs one of its commands" if words else "no command given"
        print(f"palmkit: error: {problem}\n\n{_usage(words)}", file=sys.stderr)
        return 2
    clean = False
    try:
        code = run(words, rest)
        clean = True
        return code
    except USER_ERRORS as exc:
        if os.environ.get("PALMKIT_DEBUG"):
            raise
        print(f"palmkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npalmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`palmkit info | head`): stop quietly, as Unix tools do; stdout is pointed at
        # /dev/null so that Python's flush at exit does not raise a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        _leave_process_group(clean)


def _leave_process_group(clean: bool) -> None:
    """Destroy a torchrun command's process group before exit (train.distributed.close_distributed)."""
    if "torch" in sys.modules:  # only commands that imported torch can have joined a group
        from palmkit.train.distributed import close_distributed

        close_distributed(clean)


if __name__ == "__main__":
    sys.exit(main())
