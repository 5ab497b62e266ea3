"""A request's structured-output fields as one grammar constraint (infer/grammar.py), checked before any work.

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) and
vLLM's `guided_json`, `guided_regex` and `guided_choice` (a regex and a list of strings have no OpenAI form);
at most one per request, and none beside chat `tools`, whose calls have their own grammar (serve/tools.py).
A schema or pattern the grammar engine cannot compile is a 400 naming the field, before the model runs.
"""

from __future__ import annotations

from palmkit.infer.grammar import Constraint, GrammarError, compile_grammar
from palmkit.serve.protocol import APIError, SamplingBody


def _requested(body: SamplingBody) -> list[tuple[str, Constraint]]:
    out = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        out.append(("response_format", Constraint("json_object")))
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type 'json_schema' needs 'json_schema'.",
                           param="response_format.json_schema", code="invalid_value")
        out.append(("response_format", Constraint("json_schema", fmt.json_schema.schema_)))
    if body.guided_json is not None:
        out.append(("guided_json", Constraint("json_schema", body.guided_json)))
    if body.guided_regex is not None:
        out.append(("guided_regex", Constraint("regex", body.guided_regex)))
    if body.guided_choice is not None:
        out.append(("guided_choice", Constraint("choice", body.guided_choice)))
    return out


def request_constraint(body: SamplingBody, tools: Constraint | None = None) -> Constraint | None:
    """The one constraint of a request (`tools`: the grammar of its tool calls), compiled once to check it: runs on
    a worker thread (a large schema takes milliseconds to compile)."""
    requested = _requested(body)
    if len(requested) + (tools is not None) > 1:
        names = [name for name, _ in requested] + ["tools"] * (tools is not None)
        raise APIError(400, f"Only one of {', '.join(names)} may constrain a request.", param=names[-1],
                       code="invalid_value")
    name, constraint = requested[0] if requested else ("tools", tools)
    if constraint is None:
        return None
    if body.ignore_eos:  # a finished grammar allows only a stop token: past it there is nothing valid to write
        raise APIError(400, f"'ignore_eos' cannot be combined with '{name}'.", param="ignore_eos",
                       code="invalid_value")
    try:
        compile_grammar(constraint)
    except GrammarError as exc:
        raise APIError(400, f"Invalid '{name}': the grammar engine cannot compile it: {exc}", param=name,
                       code="invalid_grammar") from None
    return constraint
