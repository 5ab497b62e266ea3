"""The customer-service assistant: FAQ files, BM25, grounding, tuning data, the server and its web page."""

import itertools
import json
import math
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_serve import Slow, running

from palmkit.apps.support import build_sft_data, recipe
from palmkit.errors import PalmkitError
from palmkit.infer.engine import Engine
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

pytestmark = pytest.mark.timeout(120)

FIXTURE_TASKS = Path(__file__).parent / "fixtures" / "tasks"
EXAMPLE_FAQ = Path(__file__).parents[1] / "examples" / "customer_service" / "faq.csv"

SMALL_FAQ = """question,answer
How do I reset my password?,"Click ""Forgot password"" on the sign-in page and follow the link we email you."
How do I cancel my subscription?,"Go to Billing > Plan and click Cancel subscription."
Which payment methods do you accept?,"Visa, Mastercard and PayPal."
"""


@pytest.fixture
def faq_file(tmp_path) -> Path:
    path = tmp_path / "faq.csv"
    path.write_text(SMALL_FAQ, encoding="utf-8")
    return path


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
# Tuning data


def test_sft_data_on_the_fixture_tasks(tmp_path):
    entries = load_faq(default_faq())
    counts = build_sft_data(entries, tmp_path, dialogue=5, pseudo=5, faq_variants=4, root=FIXTURE_TASKS)
    rows = [json.loads(line)["messages"] for line in Path(counts["path"]).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == counts["total"] == counts["faq"] + counts["pseudo_faq"] + counts["dialogue"]
    assert counts["dialogue"] == 5 and counts["pseudo_faq"] == 5
    grounded = [r for r in rows if r[0]["role"] == "system"]
    assert len(grounded) == counts["faq"] + counts["pseudo_faq"]
    covered = set()
    for system, user, reply in grounded:
        assert (user["role"], reply["role"]) == ("user", "assistant")
        first_q, first_a = system["content"].split("\n")[1:3]
        assert first_a == "A: " + reply["content"]  # the target is the answer retrieval put first
        covered.add(first_q[3:])
    assert {e.question for e in entries} <= covered  # every FAQ entry is learned at least once
    plain = [r for r in rows if r[0]["role"] != "system"]
    assert all([m["role"] for m in r] == ["user", "assistant"] for r in plain)
    assert counts["faq"] >= 3 * len(entries)


# --------------------------------------------------------------------------------------------------
# The server


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
    app = create_app(checkpoint, faq=faq_file, max_batch=2)
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


def test_malformed_requests_and_the_page(checkpoint, faq_file):
    app = create_app(checkpoint, faq=faq_file)
    with running(app) as base:
        post = lambda body: httpx.post(f"{base}/v1/chat/completions", content=body, timeout=30)
        no_user = post(json.dumps({"model": "tiny", "messages": [{"role": "system", "content": "hi"}]}))
        assert no_user.status_code == 400 and no_user.json()["error"]["param"] == "messages"
        assert "needs a user message" in no_user.json()["error"]["message"]
        assert post("{not json").status_code == 400
        assert post(json.dumps({"model": "tiny", "messages": []})).status_code == 400
        assert post(json.dumps({"model": "tiny", "messages": "hi"})).status_code == 400
        page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    config = json.loads(page.text.split('type="application/json">')[1].split("</script>")[0])
    assert config == {"model": "tiny", "faq": {"name": "faq.csv", "entries": 3}, "api_key_required": False}
    assert "http://" not in page.text and "https://" not in page.text  # nothing loads from elsewhere


def test_page_without_faq_and_plain_chat(checkpoint):
    app = create_app(checkpoint, model_name="m</script>")
    with running(app) as base:
        page = httpx.get(base + "/").text
        body = {"model": "m</script>", "max_tokens": 3, "messages": [{"role": "user", "content": "Tell me a joke"}]}
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).json()
    config = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    assert config["faq"] is None and config["model"] == "m</script>"  # escaped inside the script element
    assert "faq" not in reply and reply["choices"][0]["message"]["content"] != NO_ANSWER


# --------------------------------------------------------------------------------------------------
# The page in a real browser


def chromium_driver():
    """Headless Chromium from Debian's packages, driven by Selenium without its downloader."""
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: install.sh installs them "
                    "(as root), or run: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def ask_in_page(driver, question: str) -> tuple[list[str], str]:
    """Type a question, press Send; (distinct partial answers seen while it streamed, final answer)."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".answer"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    partial: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = driver.execute_script(
            "const a = document.querySelectorAll('.answer'); const e = a[a.length - 1];"
            f"return a.length > {before} ? [e.dataset.state, e.textContent] : null;")
        if state:
            if state[1] and (not partial or partial[-1] != state[1]):
                partial.append(state[1])
            if state[0] != "streaming":
                return partial, state[1]
        time.sleep(0.01)
    raise AssertionError("the answer did not finish in 60 s")


def test_browser_streams_a_grounded_answer(checkpoint, faq_file):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    engine = Engine(Slow(model, 0.08), tokenizer, max_batch=2, autotune=False)  # slow enough to watch it stream
    app = create_app(engine, faq=faq_file)
    question = "I forgot my password"
    driver = chromium_driver()
    try:
        with running(app) as base:
            driver.get(f"{base}/?max_tokens=16")
            partial, final = ask_in_page(driver, question)
            source = driver.execute_script("return document.querySelector('.assistant .source').textContent")
            reference = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "palmkit", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": question}]}).json()["choices"][0]["message"]["content"]
            _, declined = ask_in_page(driver, "What is the capital of France?")
            _, too_long = ask_in_page(driver, "password " * 300)
            error = driver.execute_script("const e = document.querySelectorAll('.error'); "
                                          "return e.length ? e[e.length - 1].textContent : null")
    finally:
        driver.quit()
    assert len(partial) >= 4, partial  # the text grew in steps while the page read the stream
    assert all(b.startswith(a) for a, b in itertools.pairwise(partial))
    assert final == reference and final
    assert source == 'Source: \u201cHow do I reset my password?\u201d (faq.csv:2)'
    assert declined == NO_ANSWER
    assert too_long == "" and error.startswith("Error 400: This model's maximum context length is 256 tokens")


# --------------------------------------------------------------------------------------------------
# The recipe end to end, tiny


def test_recipe_end_to_end_tiny(tmp_path, checkpoint, faq_file, monkeypatch, one_thread):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(FIXTURE_TASKS))
    torch.manual_seed(0)
    summary = recipe(checkpoint=str(checkpoint), faq=str(faq_file), out=str(tmp_path / "support"), max_train=24,
                     epochs=1, dialogue=10, pseudo=10, max_len=128)
    assert (tmp_path / "support" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "support" / "model" / "config.json").read_text())["task"] == "chat"
    assert "You: What is the capital of France?\nAssistant: " + NO_ANSWER in summary
    assert "Source: How do I reset my password? (faq.csv:2)" in summary
    assert f"palmkit serve --checkpoint {tmp_path / 'support' / 'model'} --faq {faq_file} --port 8000" in summary
    assert "You: hi, how do i reset my password?" in summary
    with pytest.raises(PalmkitError, match="not a palmkit checkpoint"):
        recipe(checkpoint=str(tmp_path), out=str(tmp_path / "x"))
