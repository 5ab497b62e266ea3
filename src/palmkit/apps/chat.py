"""`palmkit chat`: talk to a checkpoint in the terminal, in its chat template, each answer streamed as it comes.

    palmkit chat --checkpoint runs/chat --system "You are terse."

Type a message and press Enter; `/reset` starts the conversation over (the system message stays), `/exit` or
Ctrl-D quits. The prompt is `encode_chat`'s ids (what the server and transformers' `apply_chat_template` give),
and an answer ends at the template's `<|end|>`, at EOS or after `max_new_tokens` tokens.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from palmkit.infer.generate import Completion, generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.stop import StopRule
from palmkit.model.chat_template import chat_template, encode_chat, format_chat
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer

COMMANDS_HELP = "/reset starts over, /exit (or Ctrl-D) quits"
# SamplingParams' defaults but for the length: an answer of a chat runs longer than SamplingParams' 64 tokens
SAMPLING = SamplingParams(max_new_tokens=256)


def fit_context(tokenizer: Tokenizer, messages: list[dict], context: int, room: int,
                template: Callable[..., str] = format_chat) -> tuple[list[dict], list[int]]:
    """(messages, prompt ids) with the oldest turns after the system message dropped until the prompt leaves
    `room` tokens of the context for the answer (at least one)."""
    messages = list(messages)
    while True:
        ids = encode_chat(tokenizer, messages, template=template)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) + max(1, room) <= context or len(messages) <= first + 1:
            return messages, ids
        del messages[first]


def reply(model: PaLM, tokenizer: Tokenizer, messages: Sequence[dict], params: SamplingParams,
          template: Callable[..., str] = format_chat, out: TextIO | None = None) -> Completion:
    """The assistant's next turn after `messages`, written to `out` as it is produced; it ends at `<|end|>`."""
    _, ids = fit_context(tokenizer, list(messages), model.config.max_seq_len, params.max_new_tokens, template)
    rule = StopRule(params, model.config.eos_id, len(ids), model.config.max_seq_len, tokenizer)  # ends at <|end|>
    for (tok,) in generate_ids(model, [ids], params):
        _show(out, rule.push(tok))
        if rule.finish:
            break
    _show(out, rule.stream.finish())
    return Completion(rule.stream.text, rule.stream.ids, len(ids), rule.finish or "length")


def _show(out: TextIO | None, text: str) -> None:
    if out is not None and text:
        out.write(text)
        out.flush()


def chat_command(checkpoint: str, system: str = "", sampling: SamplingParams = SAMPLING, device: str = "cpu") -> None:
    """Chat with the model in CHECKPOINT in the terminal; answers stream as they are generated.

    Commands: /reset starts the conversation over (keeping SYSTEM), /exit or Ctrl-D quits. When the conversation
    outgrows the model's context, its oldest turns are left out of the prompt.

    Args:
        checkpoint: a checkpoint folder (a `palmkit finetune chat` result answers best)
        system: a system message that opens every conversation
        sampling: how each token of an answer is picked, SamplingParams' fields: --sampling.max_new_tokens (most
            tokens of one answer), --sampling.temperature (0: greedy decoding), --sampling.top_k (the k most likely
            tokens only; 0: no cut), --sampling.top_p (nucleus sampling; 1: no cut), --sampling.seed (repeatable
            answers; none: a fresh one), --sampling.stop (strings that end an answer, a list)
        device: cpu, cuda, cuda:1, ...
    """
    model, tokenizer, config = load_checkpoint(checkpoint, device=device)
    chat_loop(model, tokenizer, dataclasses.replace(sampling), system, chat_template(config.get("chat_template")))


def chat_loop(model: PaLM, tokenizer: Tokenizer, params: SamplingParams, system: str = "",
              template: Callable[..., str] = format_chat, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout) -> list[dict]:
    """The read-answer loop of `chat_command`; returns the conversation as it stood at /exit."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"chatting with the model ({COMMANDS_HELP})\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return messages
        command = line.strip()
        if command in ("/exit", "/quit"):
            return messages
        if command == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if not command:
            continue
        if command.startswith("/"):
            out.write(f"unknown command {command.split()[0]}: {COMMANDS_HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("assistant> ")
        answer = reply(model, tokenizer, messages, params, template, out)
        out.write("\n")
        messages.append({"role": "assistant", "content": answer.text})
