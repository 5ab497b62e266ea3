"""The customer-service recipe: `palmkit recipe support`.

It tunes a base model on chat data (chatterbot-corpus English and chitchat, task `dialogue-en`) plus grounded
examples in exactly the format of serve/grounding.py, built from the FAQ itself and from chatterbot Q/A pairs
used as a pseudo-FAQ, so that the model learns to answer from the retrieved entry (a base model trained for
minutes mostly learns the FAQ's own answers: tune again when the FAQ changes).
`palmkit serve --checkpoint CKPT --faq FILE` then grounds every /v1/chat/completions request and the web page at `/`.

The same FAQ also works as a tool (`FAQ_TOOL`, `answer_with_tool`): served without `--faq`, the model calls
`lookup_faq` through OpenAI's tool-calling API, the application runs the search and sends the entry back.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

from palmkit.apps.recipes import base_checkpoint
from palmkit.data.tasks import CHATTERBOT, TaskFiles, chatterbot_examples, load_task, package_dir, subsample
from palmkit.errors import PalmkitError
from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.fit import FinetuneConfig
from palmkit.infer.generate import complete_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.io import atomic_write_bytes
from palmkit.model.chat_template import END, encode_chat
from palmkit.model.checkpoint import load_checkpoint
from palmkit.serve.grounding import NO_ANSWER, FaqEntry, FaqIndex, Grounding, default_faq, ground


def _variants(question: str, rng: random.Random, n: int) -> list[str]:
    """The question as customers type it: as written, lowercased without punctuation, with a greeting..."""
    plain = " ".join(re.sub(r"[^\w\s']", " ", question).lower().split())
    greetings = ["Hi, ", "Hello! ", "Hi there. ", "Quick question: ", "Hey, "]
    pool = [question, plain, rng.choice(greetings) + question, rng.choice(greetings) + plain, plain + "?",
            question + " Thanks!", "Can you help? " + question, plain + " please"]
    return pool[:n]


def grounded_examples(entries: Sequence[FaqEntry], variants: int = 3, seed: int = 0) -> list[list[dict]]:
    """Conversations [system with retrieved entries, user question, assistant = best entry's answer].

    Retrieval runs over `entries` themselves, so the other entries in the prompt are the real near misses.
    The target is the answer of the first entry in the prompt: the model learns to copy what retrieval
    put first, the behaviour the server relies on. Variants whose retrieval fails are left out."""
    index = FaqIndex(entries)
    rng = random.Random(seed)
    out = []
    for entry in entries:
        for question in _variants(entry.question, rng, variants):
            g = ground(index, [{"role": "user", "content": question}])
            if g.grounded:
                out.append([*g.messages, {"role": "assistant", "content": g.hits[0].entry.answer}])
    return out


def pseudo_faq(root: str | os.PathLike | None = None, cache: str = "", max_chars: int = 160) -> list[FaqEntry]:
    """chatterbot-corpus English Q/A pairs (tech_support first, then the other topics) as pseudo-FAQ entries:
    the first exchange of each conversation, one entry per distinct question, answers of FAQ length only."""

    folder = package_dir(CHATTERBOT, root, cache) / "chatterbot_corpus" / "data" / "english"
    files = sorted(folder.glob("*.yml"), key=lambda p: (p.stem != "tech_support", p.name))
    seen, out = set(), []
    for path in files:
        for question, answer in (c[:2] for c in chatterbot_examples([path])):
            key = question["content"].lower()
            if key not in seen and len(answer["content"]) <= max_chars:
                seen.add(key)
                out.append(FaqEntry(" ".join(question["content"].split()), " ".join(answer["content"].split()),
                                    path.name))
    return out


def _take(examples: list, n: int, seed: int) -> list:

    return subsample(examples, n, seed) if n > 0 else []  # subsample's n = 0 means all of them


def build_sft_data(faq: Sequence[FaqEntry], out: str | os.PathLike, dialogue: int = 200, pseudo: int = 300,
                   faq_variants: int = 8, seed: int = 0, root: str | os.PathLike | None = None) -> dict:
    """Write OUT/train.jsonl ({"messages": [...]} per line) for `finetune_chat`: grounded examples from the
    FAQ (every entry, `faq_variants` phrasings), up to `pseudo` grounded chatterbot pseudo-FAQ examples and
    up to `dialogue` plain conversations of task dialogue-en (first exchange only: the prompt length of one
    question). Returns the counts. root: task package files (tests: the fixtures)."""

    rng = random.Random(seed)
    own = grounded_examples(faq, faq_variants, seed)
    entries = pseudo_faq(root)
    tech = {e.answer for e in entries if e.where == "tech_support.yml"}
    chatter = grounded_examples(entries, 2, seed)
    # all of tech_support (the support-style topic), then a sample of the other topics
    first = [c for c in chatter if c[-1]["content"] in tech][:pseudo]
    chatter = first + _take([c for c in chatter if c[-1]["content"] not in tech], pseudo - len(first), seed)
    # the first exchange, when short: a long one would set the padded length of its whole batch
    short = [c[:2] for c in load_task("dialogue-en", root=root, seed=seed).train
             if len(c[0]["content"]) + len(c[1]["content"]) <= 240]
    chats = _take(short, dialogue, seed)
    rows = own + chatter + chats
    rng.shuffle(rows)
    path = Path(out) / "train.jsonl"
    atomic_write_bytes(path, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows).encode())
    return {"path": str(path), "faq": len(own), "pseudo_faq": len(chatter), "dialogue": len(chats),
            "total": len(rows)}


def answer(model, tokenizer, index: FaqIndex, question: str, max_new_tokens: int = 96) -> tuple[str, Grounding]:
    """The assistant's greedy answer to one question (the server's answer at temperature 0)."""

    context = model.config.max_seq_len
    g = ground(index, [{"role": "user", "content": question}],
               fits=lambda m: len(encode_chat(tokenizer, m)) < context)
    if not g.grounded:
        return NO_ANSWER, g
    prompt = encode_chat(tokenizer, g.messages)
    room = context - len(prompt)
    if room < 1:
        raise PalmkitError(f"the grounded prompt does not fit the model's {model.config.max_seq_len} tokens")
    params = SamplingParams(max_new_tokens=min(max_new_tokens, room), temperature=0, stop=(END,))
    return complete_ids(model, tokenizer, [prompt], params)[0].text.strip(), g


# The worked tool: an application serves the model without --faq and lets it look the FAQ up itself. The
# schema bounds the query (48 characters), so a constrained call always ends within a bounded number of tokens.
FAQ_TOOL = {"type": "function", "function": {
    "name": "lookup_faq", "description": "Find the FAQ entry that answers a customer's question.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["query"],
                   "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 48}}}}}


def lookup_faq(index: FaqIndex, arguments: str) -> str:
    """Run FAQ_TOOL: `arguments` is the call's JSON text; the result (JSON text) is the best entry, or none."""
    query = json.loads(arguments)["query"]
    hits = index.relevant(query) or index.search(query, 1)
    return json.dumps({"question": hits[0].entry.question, "answer": hits[0].entry.answer} if hits
                      else {"answer": None}, ensure_ascii=False)


def answer_with_tool(client, model: str, index: FaqIndex, question: str,
                     max_tokens: int | None = None) -> tuple[str, dict]:
    """One customer question through an OpenAI-compatible server with the FAQ as a tool: the model must call
    lookup_faq (tool_choice "required", so its arguments are valid JSON of the tool's schema), the application
    runs it and sends the result back as a `tool` message, and the model answers from it in at most `max_tokens`
    (None: the rest of the context, as the call itself). (answer, the call)."""
    messages = [{"role": "system", "content": "You answer customers from the FAQ."},
                {"role": "user", "content": question}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[FAQ_TOOL], tool_choice="required",
                                           temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": lookup_faq(index, call.function.arguments)}]
    final = client.chat.completions.create(model=model, messages=messages, tools=[FAQ_TOOL], tool_choice="none",
                                           temperature=0, max_tokens=max_tokens)
    return final.choices[0].message.content or "", {"name": call.function.name, "arguments": call.function.arguments}


EXAMPLE_QUESTIONS = ["I forgot my password, how can I reset it?", "how do i cancel my subscription",
                     "What is the capital of France?"]


def recipe(checkpoint: str = "", faq: str = "", out: str = "runs/support", serve: bool = False,
           host: str = "127.0.0.1", port: int = 8000, max_train: int = 1000, epochs: int = 4, lr: float = 1e-3,
           max_len: int = 160, dialogue: int = 100, pseudo: int = 150, seed: int = 0,
           base_minutes: float = 3.0) -> str | None:
    """Customer-service assistant: tune a base model on chat data and FAQ-grounded examples, show answers,
    then (with SERVE) serve it with the FAQ and a web chat page at http://HOST:PORT/.

    The FAQ dominates the tuning mix: a base model trained for minutes learns its answers rather than a general
    skill of copying from the prompt, so tune again when the FAQ changes. The tuned model lands in OUT/model;
    OUT/data/train.jsonl is what it was tuned on.

    Args:
        checkpoint: the base model (default: the quickstart's, else a short English pretraining now)
        faq: question/answer pairs, CSV (header question,answer) or JSONL (default: the demo FAQ shipped with
            palmkit)
        out: folder of the tuning data and the tuned model
        serve: then serve the tuned model with the FAQ until Ctrl-C
        host: address the server binds
        port: TCP port of the server
        max_train: tune on at most this many conversations (bounds the tuning time with EPOCHS; the default's
            time is in benchmarks/README.md, "Recipes")
        epochs: passes over the tuning conversations
        lr: peak learning rate of the tuning
        max_len: tokens per conversation (cut at the base model's context)
        dialogue: plain chats that join the FAQ's own examples (8 phrasings of each entry)
        pseudo: chatterbot pseudo-FAQ examples that join them
        seed: seed of the tuning data, the tuning and the answers
        base_minutes: pretraining time of a base model when there is none to start from
    """
    import torch

    from palmkit.serve.app import serve as serve_http  # the `serve` argument is the flag

    started = time.perf_counter()
    faq_path = Path(faq) if faq else default_faq()
    index = FaqIndex.from_file(faq_path)  # a bad FAQ file fails before minutes of training
    base = base_checkpoint(checkpoint, minutes=base_minutes)
    out_dir = Path(out)
    counts = build_sft_data(index.entries, out_dir / "data", dialogue=dialogue, pseudo=pseudo, seed=seed)
    print(f"tuning data: {counts['total']} conversations ({counts['faq']} grounded on {faq_path.name}, "
          f"{counts['pseudo_faq']} on chatterbot pseudo-FAQ, {counts['dialogue']} plain dialogue) "
          f"in {counts['path']}")
    context = json.loads((base / "config.json").read_text(encoding="utf-8"))["model"]["max_seq_len"]
    t0 = time.perf_counter()
    # batches of 8: examples run from 30 to 190 tokens and a batch is padded to its longest
    options = FinetuneConfig(max_train=max_train, epochs=epochs, lr=lr, batch_size=8, max_len=min(max_len, context),
                             max_valid=100, seed=seed)
    best = finetune_chat(str(base), str(out_dir / "model"), data=TaskFiles(train_file=counts["path"]), train=options)
    tune_s = time.perf_counter() - t0
    model_dir = out_dir / "model"
    torch.manual_seed(seed)
    model, tokenizer, _ = load_checkpoint(model_dir)
    questions = EXAMPLE_QUESTIONS if faq_path.resolve() == default_faq().resolve() else [
        f"hi, {index.entries[0].question.lower()}", index.entries[len(index.entries) // 2].question,
        EXAMPLE_QUESTIONS[-1]]
    lines = [f"tuned in {tune_s / 60:.1f} min (validation loss {best.get('valid/loss', float('nan')):.3f}); "
             f"total {(time.perf_counter() - started) / 60:.1f} min", ""]
    for question in questions:
        text, g = answer(model, tokenizer, index, question)
        lines += [f"You: {question}", f"Assistant: {text}"]
        lines.append(f"  Source: {g.hits[0].entry.question} ({g.hits[0].entry.where})" if g.grounded
                     else "  (no FAQ entry matches: fixed answer, the model was not asked)")
        lines.append("")
    command = f"palmkit serve --checkpoint {model_dir} --faq {faq_path} --port {port}"
    lines += [f"Serve it:  {command}", f"then open http://{host}:{port}/ (chat page) or use the OpenAI API at "
              f"http://{host}:{port}/v1"]
    summary = "\n".join(lines)
    if not serve:
        return summary
    print(summary, flush=True)
    del model

    print(f"serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    serve_http(str(model_dir), host=host, port=port, faq=str(faq_path))
    return None
