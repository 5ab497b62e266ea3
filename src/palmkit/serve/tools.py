"""Tool calling in chat: tools rendered into the conversation, the model's calls parsed back into `tool_calls`.

The chat template has three roles, so tools travel as text the template already carries: a system message first
lists the tools (name, description, JSON schema of the arguments) and the call syntax,
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; an assistant's earlier calls are written back in that
syntax, and a `tool` message becomes a user turn `<tool_response>{"name", "content"}</tool_response>`.

Structured output (infer/grammar.py) keeps calls valid: with `tool_choice` "required" or a named function the
completion must be one call whose arguments match that tool's schema; with "auto" it is either such a call or
text that does not start with `<`, so a call the model starts is always valid JSON. A completion holding a call
answers `tool_calls` with `finish_reason` "tool_calls"; one that ran out of tokens mid-call stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from palmkit.infer.grammar import Constraint
from palmkit.serve.protocol import APIError, ChatBody, ChatMessage, Tool

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def rendered_tools(body: ChatBody) -> list[Tool] | None:
    """The tools a chat request shows the model: none with tool_choice "none"."""
    return body.tools if body.tool_choice != "none" else None


def tool_mode(body: ChatBody) -> str | None:
    """"auto", "required", a function's name, or None when the request makes no tool calls."""
    if not body.tools or body.tool_choice == "none":
        return None
    choice = body.tool_choice or "auto"
    if not isinstance(choice, str):
        if choice.function.name not in {t.function.name for t in body.tools}:
            raise APIError(400, f"tool_choice names '{choice.function.name}', which is not among the tools.",
                           param="tool_choice", code="invalid_value")
        return choice.function.name
    return choice


def _text(message: ChatMessage) -> str:
    return message.content if isinstance(message.content, str) else "".join(p.text for p in message.content or ())


def _tools_message(tools: list[Tool]) -> dict:
    lines = [json.dumps({"name": t.function.name, "description": t.function.description or "",
                         "parameters": t.function.parameters or {"type": "object"}}, ensure_ascii=False,
                        separators=(",", ":")) for t in tools]
    return {"role": "system", "content": "You can call these tools. To call one, answer with only "
            f'{CALL_OPEN}{{"name": NAME, "arguments": {{...}}}}{CALL_CLOSE}.\nTools:\n' + "\n".join(lines)}


def chat_messages(messages: list[ChatMessage], tools: list[Tool] | None = None) -> list[dict]:
    """A conversation as the chat template reads it: roles system/user/assistant, string contents, `tools` in a
    first system message, calls and results written as text."""
    names: dict[str, str] = {}
    out = [_tools_message(tools)] if tools else []
    for m in messages:
        content = _text(m)
        if m.role == "assistant" and m.tool_calls:
            for call in m.tool_calls:
                names[call.id] = call.function.name
                content += CALL_OPEN + json.dumps({"name": call.function.name, "arguments": _arguments(call)},
                                                  ensure_ascii=False, separators=(",", ":")) + CALL_CLOSE
        if m.role == "tool":
            result = {"name": m.name or names.get(m.tool_call_id or "", ""), "content": content}
            out.append({"role": "user", "content": f"<tool_response>{json.dumps(result, ensure_ascii=False)}"
                        "</tool_response>"})
            continue
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _arguments(call) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        raise APIError(400, f"The arguments of tool call '{call.id}' are not JSON.", param="messages",
                       code="invalid_value") from None


def tool_constraint(body: ChatBody, mode: str) -> Constraint:
    """The grammar of a completion under `mode` (tool_mode): one valid call, or (auto) text or one valid call."""
    tools = [t for t in body.tools or () if mode in ("auto", "required") or t.function.name == mode]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name},
                             "arguments": t.function.parameters or {"type": "object"}}} for t in tools]
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    call = f'call: "{CALL_OPEN}" %json {json.dumps(schema)} "{CALL_CLOSE}"\n'
    start = "start: call | text\ntext: /(?s:[^<].*)?/\n" if mode == "auto" else "start: call\n"
    return Constraint("lark", start + call)


def parse_calls(text: str, body: ChatBody) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a completion: the text before the first call (None if empty) and each well-formed
    call of a known tool in OpenAI's shape; ([text], []) when it holds none."""
    known = {t.function.name for t in body.tools or ()}
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(call, dict) and call.get("name") in known and isinstance(call.get("arguments"), dict):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
    if not calls:
        return text, []
    content = text[: text.index(CALL_OPEN)].strip()
    return content or None, calls
