"""Structured output's grammar layer: every kind of constraint, sampled under its masks, matches what it says,
checked by independent validators (jsonschema_rs for JSON Schema, Python's `re` for patterns)."""

import json
import re

import jsonschema_rs
import llguidance
import pytest
import torch

from palmkit.infer.grammar import (
    Constraint,
    GrammarError,
    apply_bitmask,
    compile_grammar,
    ll_tokenizer,
    matchers,
    new_bitmask,
)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "ç"]}},
                         "ok": {"type": "boolean"}}}


def closing_bias(tok) -> torch.Tensor:
    """+4 on the tokens that close strings and objects, and on the stop ids: any JSON object, sampled at random,
    would otherwise nest and run on for thousands of tokens."""
    bias = torch.zeros(tok.vocab_size)
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if i in tok.stop_ids or (text and set(text) <= set('"}]')):
            bias[i] = 4.0
    return bias


def sample_under(matcher, tok, seed: int, steps: int = 500, bias=0.0) -> tuple[list[int], bool]:
    """Random logits (+ bias) masked by the matcher, sampled until a stop token; (tokens, ended with a stop)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        mask = new_bitmask(1, tok.vocab_size)
        matcher.fill_mask(mask, 0)
        logits = apply_bitmask(torch.randn(1, tok.vocab_size, generator=g) + bias, mask)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if token in tok.stop_ids:
            return out, True
        matcher.accept(token)
        out.append(token)
    return out, False


def test_json_schema_samples_validate(tokenizer):
    validator = jsonschema_rs.validator_for(SCHEMA)
    for seed in range(20):
        [m] = matchers([Constraint("json_schema", SCHEMA)], tokenizer, tokenizer.stop_ids)
        ids, stopped = sample_under(m, tokenizer, seed)
        assert stopped and m.done
        assert validator.is_valid(json.loads(tokenizer.decode(ids))), tokenizer.decode(ids)


def test_json_object_regex_and_choice(tokenizer):
    cases = [(Constraint("json_object"), lambda t: isinstance(json.loads(t), dict)),
             (Constraint("regex", r"[0-9]{3}-(yes|no)"), lambda t: re.fullmatch(r"[0-9]{3}-(yes|no)", t)),
             (Constraint("choice", ["red", "green apple", "ç€ (x)"]), lambda t: t in ("red", "green apple", "ç€ (x)"))]
    for constraint, check in cases:
        for seed in range(5):
            [m] = matchers([constraint], tokenizer, tokenizer.stop_ids)
            ids, stopped = sample_under(m, tokenizer, seed, bias=closing_bias(tokenizer))
            assert stopped and check(tokenizer.decode(ids)), (constraint, tokenizer.decode(ids))


def test_a_choice_with_regex_characters_is_literal(tokenizer):
    [m] = matchers([Constraint("choice", ["a.b", "(c)*"])], tokenizer, tokenizer.stop_ids)
    texts = set()
    for seed in range(8):
        m = matchers([Constraint("choice", ["a.b", "(c)*"])], tokenizer, tokenizer.stop_ids)[0]
        texts.add(tokenizer.decode(sample_under(m, tokenizer, seed)[0]))
    assert texts <= {"a.b", "(c)*"} and texts


def test_mask_equals_llguidances_own_logit_bias(tokenizer):
    """apply_bitmask against a second path: llguidance's byte-per-token mask of the same state."""
    ll = ll_tokenizer(tokenizer, tuple(tokenizer.stop_ids))
    grammar = compile_grammar(Constraint("json_schema", SCHEMA))
    ours, theirs = llguidance.LLMatcher(ll, grammar), llguidance.LLMatcher(ll, grammar)
    prefix = tokenizer.encode('{"name":"ab')
    assert ours.consume_tokens(prefix) and theirs.consume_tokens(prefix)
    mask = new_bitmask(1, tokenizer.vocab_size)
    ours.unsafe_compute_mask_ptr(mask[0].data_ptr(), mask[0].numel() * 4)
    allowed = apply_bitmask(torch.zeros(1, tokenizer.vocab_size), mask)[0] == 0
    reference = torch.tensor(list(theirs.compute_logit_bias()[: tokenizer.vocab_size])) > 0
    assert torch.equal(allowed, reference) and 1 < int(allowed.sum()) < tokenizer.vocab_size


def test_token_bytes_decode_as_the_tokenizer_does(tokenizer):
    ll = ll_tokenizer(tokenizer, tuple(tokenizer.stop_ids))
    text = "Hello wörld 123 ç€ <|user|> x"
    ids = tokenizer.encode(text)
    assert ll.decode_str(ids) == tokenizer.decode(ids) == text
    assert ll.is_special_token(tokenizer.stop_ids[-1]) and not ll.is_special_token(ids[0])


@pytest.mark.parametrize("constraint", [Constraint("json_schema", {"type": "frob"}),
                                        Constraint("json_schema", {"type": "string", "format": "no-such-format"}),
                                        Constraint("regex", "("), Constraint("choice", []),
                                        Constraint("choice", ["a", 3])])
def test_what_cannot_compile_is_a_grammar_error(constraint):
    with pytest.raises(GrammarError):
        compile_grammar(constraint)
