"""`palmkit <command>`: a thin layer that turns API functions into subcommands.

Each command is a typed Python function; its parameters become `--options` (underscores as dashes)
and its docstring becomes `--help`. Parameters named in the function's `__cli_positional__` are
positional. Errors a user can fix (bad paths, corrupt files, bad values) print one line, exit 2.
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable

from palmkit.errors import USER_ERRORS

# "command words" -> ("module:function", one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("palmkit.apps.quickstart:quickstart", "the main job: corpus, tokenizer, pretraining, samples"),
    "info": ("palmkit.apps.commands:describe", "parameters and training FLOPs per token of a preset"),
    "generate": ("palmkit.apps.commands:generate_command", "complete a prompt, streaming to the terminal"),
    "export": ("palmkit.model.export:export_hf", "write a Hugging Face (CohereForCausalLM) folder"),
    "pretrain": ("palmkit.apps.commands:pretrain_command", "pretrain on a corpus (one process or torchrun: DDP/FSDP2)"),
    "plot": ("palmkit.train.metrics:plot_run", "PNG of a run's training and per-language validation loss"),
    "quantize": ("palmkit.apps.commands:quantize_command", "int8-weight copy of a checkpoint for CPU inference"),
    "compress": ("palmkit.apps.commands:compress_command", "low-rank (SVD) copy of a checkpoint, optionally healed"),
    "finetune classify": ("palmkit.apps.commands:finetune_classify_command", "fine-tune a text classifier (full or LoRA)"),
    "finetune ner": ("palmkit.apps.commands:finetune_ner_command", "fine-tune a named-entity tagger (BIO)"),
    "finetune chat": ("palmkit.apps.commands:finetune_chat_command", "supervised fine-tuning on conversations"),
    "evaluate": ("palmkit.apps.commands:evaluate_command", "report on a fine-tuned model beside a TF-IDF baseline"),
    "classify": ("palmkit.apps.commands:classify_command", "classify texts with a fine-tuned classifier"),
    "tag": ("palmkit.apps.commands:tag_command", "find named entities with a fine-tuned tagger"),
    "serve": ("palmkit.serve.app:serve", "OpenAI-compatible HTTP server with streaming and batching"),
    "corpus fetch": ("palmkit.data.corpus.sources:fetch", "download the built-in multilingual text sources into the cache"),
    "corpus build": ("palmkit.data.corpus.build:build", "clean, deduplicate and split text, train a tokenizer, write shards"),
    "recipe support": ("palmkit.apps.support:recipe", "customer-service assistant: chat tuning, FAQ grounding, web chat"),
    "recipe monitor": ("palmkit.apps.monitor.demo:recipe", "financial sentiment monitor: rolling negative share and alerts"),
    "monitor": ("palmkit.apps.monitor.monitor:monitor_command", "run the sentiment monitor on a JSONL stream (file, stdin, folder)"),
}


def _unwrap(tp) -> tuple[object, bool]:
    """(base type, is_list) for an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple, collections.abc.Sequence):
        return _unwrap(typing.get_args(tp)[0])[0], True
    return tp, False


def add_function(parser: argparse.ArgumentParser, fn: Callable) -> None:
    """Add one argument per parameter of `fn` to `parser`."""
    hints = typing.get_type_hints(fn)
    positional = getattr(fn, "__cli_positional__", ())
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        annotation = param.annotation if param.annotation is not inspect.Parameter.empty else str
        tp, is_list = _unwrap(hints.get(name, annotation))
        required = param.default is inspect.Parameter.empty
        kwargs: dict = {} if required else {"default": param.default}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            tp = type(kwargs["choices"][0])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
            if is_list:
                kwargs["nargs"] = "+" if required else "*"
        if name in positional:
            parser.add_argument(name, **kwargs)
        else:
            kwargs["help"] = "(required)" if required else f"(default: {param.default})"
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=required and tp is not bool,
                                **kwargs)


def _command_parser(words: list[str]) -> tuple[argparse.ArgumentParser, Callable]:
    target, _ = COMMANDS[" ".join(words)]
    module, _, func = target.partition(":")
    fn = getattr(importlib.import_module(module), func)
    parser = argparse.ArgumentParser(prog="palmkit " + " ".join(words), description=inspect.getdoc(fn),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_function(parser, fn)
    return parser, fn


def _usage(prefix: list[str]) -> str:
    """The list of commands under `prefix` (all of them for an empty prefix)."""
    n = len(prefix)
    rows = [(c, h) for c, (_, h) in COMMANDS.items() if c.split()[:n] == prefix]
    width = max(len(c) for c, _ in rows)
    lines = [f"usage: palmkit {' '.join(prefix) + ' ' if prefix else ''}<command> [options]", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {h}" for c, h in rows]
    lines += ["", "Run `palmkit COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `palmkit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    words: list[str] = []
    while argv and not argv[0].startswith("-") and any(
            c.split()[: len(words) + 1] == [*words, argv[0]] for c in COMMANDS):
        words.append(argv.pop(0))
        if " ".join(words) in COMMANDS:
            break
    if " ".join(words) not in COMMANDS:
        print(_usage(words), file=sys.stdout if {"-h", "--help"} & set(argv) else sys.stderr)
        return 0 if {"-h", "--help"} & set(argv) else 2
    parser, fn = _command_parser(words)
    args = vars(parser.parse_args(argv))
    try:
        result = fn(**args)
    except USER_ERRORS as exc:
        if os.environ.get("PALMKIT_DEBUG"):
            raise
        print(f"palmkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npalmkit: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, str):
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
