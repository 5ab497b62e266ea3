"""`palmkit chat` in a pseudo-terminal: streamed answers in the chat template, /reset, /exit and Ctrl-D."""

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from palmkit.apps.chat import chat_loop, fit_context, reply
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import encode_chat

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


class Terminal:
    """A child process on a pseudo-terminal, read until an expected text shows up."""

    def __init__(self, argv: list[str]):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.fd, self.seen = master, ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Everything printed since the last expect, up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} after {timeout}s; the terminal shows {self.seen[-500:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before {text!r}; it showed {self.seen[-500:]!r}")
            self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        at = self.seen.index(text) + len(text)
        out, self.seen = self.seen[:at], self.seen[at:]
        return out

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.fd)


@pytest.fixture
def terminal(checkpoint):
    term = Terminal([sys.executable, "-m", "palmkit.cli", "chat", "--checkpoint", str(checkpoint),
                     "--sampling.temperature", "0", "--sampling.max_new_tokens", str(GREEDY.max_new_tokens)])
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
        term.close()


def _answer(transcript: str) -> str:
    """The streamed answer in what the terminal showed after a message: between the prompts."""
    return transcript.split("assistant> ", 1)[1].rsplit("\nyou> ", 1)[0]


def test_terminal_chat_streams_the_templates_answers_and_resets(terminal, loaded):
    model, tok = loaded
    hi = [{"role": "user", "content": "Hi"}]
    first = reply(model, tok, hi, GREEDY)
    terminal.expect("/exit (or Ctrl-D) quits")
    terminal.expect("you> ")
    terminal.send("Hi")
    assert _answer(terminal.expect("you> ")) == first.text
    # the second turn continues the conversation
    terminal.send("And you?")
    second = reply(model, tok, [*hi, {"role": "assistant", "content": first.text},
                                {"role": "user", "content": "And you?"}], GREEDY)
    assert _answer(terminal.expect("you> ")) == second.text
    terminal.send("/reset")
    assert "(new conversation)" in terminal.expect("you> ")
    terminal.send("Hi")  # the same first answer again: nothing of the old conversation is left
    assert _answer(terminal.expect("you> ")) == first.text
    terminal.send("/exit")
    assert terminal.close() == 0


def test_ctrl_d_quits(terminal):
    terminal.expect("you> ")
    os.write(terminal.fd, b"\x04")
    assert terminal.close() == 0


def test_loop_keeps_the_conversation_and_the_system_message(loaded):
    model, tok = loaded
    lines = iter(["Hello", "/bogus", "", "/reset", "Bye", "/exit"])
    out = io.StringIO()
    messages = chat_loop(model, tok, GREEDY, system="Be brief.", read=lambda prompt: next(lines), out=out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Bye"
    assert messages[2]["content"] == reply(model, tok, messages[:2], GREEDY).text
    assert "unknown command /bogus" in out.getvalue()


def test_long_conversations_drop_their_oldest_turns(loaded):
    model, tok = loaded
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": ("user", "assistant")[i % 2], "content": "word " * 40} for i in range(12)]
    context = model.config.max_seq_len
    kept, ids = fit_context(tok, [system, *turns], context, room=32)
    assert kept[0] == system and kept[-1] == turns[-1] and len(kept) < 13
    assert len(ids) + 32 <= context and ids == encode_chat(tok, kept)
    assert len(encode_chat(tok, [system, *turns[-len(kept):]])) + 32 > context  # one more turn would not fit
