"""FAQ grounding: FAQ files, BM25, the grounding rule, and grounded chat on the server."""

import json
import math
from pathlib import Path

import httpx
import pytest

from palmkit.errors import PalmkitError
from palmkit.infer.engine import EngineOptions
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import END, format_chat
from palmkit.model.checkpoint import load_checkpoint
from palmkit.serve.app import create_app
from palmkit.serve.grounding import (
    BM25,
    NO_ANSWER,
    FaqEntry,
    FaqIndex,
    default_faq,
    ground,
    load_faq,
    system_message,
    terms,
)
from tests.serve.conftest import running

pytestmark = pytest.mark.timeout(120)


EXAMPLE_FAQ = Path(__file__).parents[2] / "examples" / "customer_service" / "faq.csv"


# --------------------------------------------------------------------------------------------------
# FAQ files


def test_shipped_faq_is_the_example_and_loads():
    assert default_faq().read_bytes() == EXAMPLE_FAQ.read_bytes()  # the package's copy is not stale
    entries = load_faq(default_faq())
    assert 25 <= len(entries) <= 40
    assert entries[0] == FaqEntry("How do I reset my password?", entries[0].answer, "faq.csv:2")
    assert entries[0].answer.startswith('Click "Forgot password"')  # CSV quoting undone


def test_load_faq_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "f.csv"
    csv_path.write_text('Answer,Question\n"two\nlines",first?\n\n  yes , second? \n', encoding="utf-8")
    assert load_faq(csv_path) == [FaqEntry("first?", "two lines", "f.csv:2"), FaqEntry("second?", "yes", "f.csv:5")]
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text('{"question": "q1", "answer": "a1", "id": 7}\n\n{"question": "问题", "answer": "回答"}\n',
                     encoding="utf-8")
    assert load_faq(jsonl) == [FaqEntry("q1", "a1", "f.jsonl:1"), FaqEntry("问题", "回答", "f.jsonl:3")]


@pytest.mark.parametrize(("name", "content", "error", "message"), [
    ("none.csv", None, FileNotFoundError, "FAQ file not found: "),
    ("empty.csv", b"  \n", PalmkitError, "empty.csv: the file is empty"),
    ("header.csv", b"question,answer\n", PalmkitError, "no FAQ entries after the header"),
    ("cols.csv", b"q,answer\nx,y\n", PalmkitError, "line 1: the CSV header must name 'question' and 'answer' "
                                                   "columns (missing question; found 'q', 'answer')"),
    ("utf8.csv", b"question,answer\nok,fine\nbad,caf\xe9\n", PalmkitError, "utf8.csv: line 3 is not valid UTF-8"),
    ("short.csv", b"question,answer,notes\nq,a,n\nonly\n", PalmkitError, "short.csv: line 3: 1 fields, expected 3"),
    ("blank.csv", b"question,answer\nq,\n", PalmkitError, "blank.csv: line 2: empty answer"),
    ("bad.jsonl", b'{"question": "q", "answer": "a"}\n{oops\n', PalmkitError, "bad.jsonl: line 2 is not JSON"),
    ("keys.jsonl", b'{"question": "q"}\n', PalmkitError, 'keys.jsonl: line 1: expected an object with "question"'),
    ("type.jsonl", b'{"question": "q", "answer": 3}\n', PalmkitError, "line 1: answer must be a string, got int"),
    ("faq.txt", b"question,answer\nq,a\n", PalmkitError, "must be .csv (question,answer columns) or .jsonl"),
])
def test_load_faq_errors(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error) as info:
        load_faq(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# BM25 and the grounding rule


def test_terms():
    assert terms("How do I reset my Passwords?") == ["reset", "password"]  # stop words out, plural cut
    assert terms("The app keeps crashing") == terms("app keep crashes")
    assert terms("files") == terms("file") and terms("class") == ["class"]
    assert terms("密码 reset") == ["密", "码", "reset"]  # CJK: one term per character


def test_bm25_matches_hand_computed_values():
    bm25 = BM25(["kiwi mango", "kiwi kiwi cherry", "durian"])
    # N = 3 documents of 2, 3 and 1 terms (mean 2), k1 = 1.5, b = 0.75; df(kiwi) = 2, df(cherry) = 1
    idf_kiwi, idf_cherry = math.log(1 + 1.5 / 2.5), math.log(1 + 2.5 / 1.5)

    def part(tf, length):
        return tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * length / 2))

    expected = [idf_kiwi * part(1, 2), idf_kiwi * part(2, 3) + idf_cherry * part(1, 3), 0.0]
    assert bm25.scores("cherry kiwi kiwi?").tolist() == pytest.approx(expected, rel=1e-12)  # distinct terms
    # coverage: the idf share of the question's terms present; "zebra" is unseen, so it has the largest idf
    idf_zebra = math.log(1 + 3.5 / 0.5)
    assert bm25.coverage("kiwi zebra").tolist() == pytest.approx(
        [idf_kiwi / (idf_kiwi + idf_zebra)] * 2 + [0.0], rel=1e-12)
    assert bm25.coverage("kiwi cherry").tolist() == pytest.approx(
        [idf_kiwi / (idf_kiwi + idf_cherry), 1.0, 0.0], rel=1e-12)
    assert bm25.scores("the of").tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("question", "expected"), [
    ("I forgot my password, how can I reset it?", "How do I reset my password?"),
    ("how do i cancel my subscription", "How do I cancel my subscription?"),
    ("the app keeps crashing", "The app crashes when I open it."),
    ("Is there a discount for students?", "Do you have a student discount?"),
    ("where are my invoices", "Where can I download my invoices?"),
    ("What is the capital of France?", None),
    ("how are you?", None),
    ("Who won the world cup?", None),
    ("tell me a joke", None),
])
def test_grounding_rule_on_the_shipped_faq(question, expected):
    hits = FaqIndex.from_file(default_faq()).relevant(question)
    if expected is None:
        assert hits == []
    else:
        assert hits[0].entry.question == expected
        assert all(h.coverage >= 0.5 for h in hits) and len(hits) == 1  # DEFAULT_K
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_threshold_is_the_rule(faq_file):
    question = "reset my password on my phone"  # "phone" is not in the FAQ: coverage is below 1
    hit = FaqIndex.from_file(faq_file).search(question)[0]
    assert 0 < hit.coverage < 1
    assert FaqIndex.from_file(faq_file, threshold=hit.coverage).relevant(question)
    assert not FaqIndex.from_file(faq_file, threshold=hit.coverage + 1e-6).relevant(question)


def test_grounded_prompt_puts_entries_before_the_question(faq_file):
    index = FaqIndex.from_file(faq_file)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "I forgot my password"}]
    g = ground(index, history)
    assert g.grounded and g.hits[0].entry.where == "faq.csv:2"
    assert g.messages[:3] == history[:3] and g.messages[4] == history[3]
    prompt = format_chat(g.messages)
    assert prompt.endswith(
        '<|system|>Answer from these FAQ entries.\nQ: How do I reset my password?\nA: Click "Forgot password" '
        "on the sign-in page and follow the link we email you.<|end|>\n<|user|>I forgot my password<|end|>\n"
        "<|assistant|>")
    assert g.messages[3]["content"] == system_message(g.hits)
    assert g.info()["sources"][0]["question"] == "How do I reset my password?"
    unrelated = ground(index, [{"role": "user", "content": "what's the weather?"}])
    assert not unrelated.grounded and unrelated.messages == [{"role": "user", "content": "what's the weather?"}]
    with pytest.raises(ValueError, match="needs a user message"):
        ground(index, [{"role": "system", "content": "x"}])


# --------------------------------------------------------------------------------------------------
# The server with a FAQ


def sse_chunks(response: httpx.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def greedy_reference(checkpoint, messages, max_tokens):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop=(END,))
    return generate(model, tokenizer, format_chat(messages), params)[0].text


def test_grounded_stream_has_sources_and_the_models_greedy_text(checkpoint, faq_file):
    app = create_app(checkpoint, faq=faq_file, options=EngineOptions(max_batch=2))
    question = "how can I reset my password"
    with running(app) as base:
        body = {"model": "tiny", "stream": True, "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": question}]}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            chunks = sse_chunks(r)
        full = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert chunks[-1] == "[DONE]"
    faq = chunks[0]["faq"]
    assert faq["grounded"] and faq["sources"][0]["question"] == "How do I reset my password?"
    assert all("faq" not in c for c in chunks[1:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    messages = ground(FaqIndex.from_file(faq_file), [{"role": "user", "content": question}]).messages
    assert text == greedy_reference(checkpoint, messages, 12) == full["choices"][0]["message"]["content"]
    assert full["faq"] == faq
    assert full["usage"]["prompt_tokens"] > 40  # the entries are in the prompt


def test_ungrounded_answer_is_fixed_and_skips_the_model(checkpoint, faq_file):
    app = create_app(checkpoint, faq=faq_file)
    engine = app.state.palmkit.engine
    with running(app) as base:
        body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "Tell me a joke"}]}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            chunks = sse_chunks(r)
        full = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "n": 2}, timeout=60).json()
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1] if c["choices"][0]["delta"]]
    assert len(deltas) > 5 and "".join(d["content"] for d in deltas) == NO_ANSWER  # streamed word by word
    assert chunks[0]["faq"] == {"grounded": False, "sources": []}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert [c["message"]["content"] for c in full["choices"]] == [NO_ANSWER, NO_ANSWER]
    assert full["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert engine.prompt_tokens == 0 and engine.completion_tokens == 0  # the model never ran
