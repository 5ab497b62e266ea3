import copy
import csv
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import random_model

from palmkit.cli import main
from palmkit.errors import PalmkitError
from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.encode import Item, align_words, chat_item, pad
from palmkit.finetune.fit import FinetuneConfig, fit
from palmkit.finetune.heads import HEAD_FILE, SequenceClassifier
from palmkit.finetune.ner import finetune_ner
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.io import load_tensors
from palmkit.model.chat_template import format_chat
from palmkit.model.checkpoint import load_checkpoint, load_config
from palmkit.model.export import export_hf
from palmkit.model.lora import LoRALinear, add_lora, merge_lora, merged_state_dict
from palmkit.model.palm import PaLM
from palmkit.train.metrics import read_metrics

TASK_ROOT = Path(__file__).parent / "fixtures" / "tasks"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread
FILLER = "the quick brown over lazy language model predicts next token from ones before it many".split()


def easy_task(folder: Path, n: int = 160, seed: int = 0) -> Path:
    """Which animal does the sentence mention? Random filler words around one key word."""
    rng = random.Random(seed)
    path = folder / "animals.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "animal"])
        for i in range(n):
            words = rng.sample(FILLER, 6)
            key = ("fox", "dog")[i % 2]
            words.insert(rng.randrange(7), key)
            w.writerow([" ".join(words), key])
    return path


# --------------------------------------------------------------------------------------------------
# Alignment of tags to pieces


def test_bio_tags_go_on_the_first_piece_of_each_word(tokenizer):
    words = ["The", "Zyqxwvut", "jumps", "over", "Berlinerstrasse"]
    tags = [0, 1, 0, 0, 3]
    item = align_words(tokenizer, words, tags, max_len=64)
    per_word = [tokenizer.encode(w if i == 0 else " " + w) for i, w in enumerate(words)]
    assert any(len(p) > 1 for p in per_word)  # some words really are several pieces
    assert item.ids == [t for p in per_word for t in p]
    assert item.ids == tokenizer.encode(" ".join(words))  # same pieces as the running text
    expected = []
    for p, tag in zip(per_word, tags, strict=True):
        expected += [tag] + [-100] * (len(p) - 1)
    assert item.target == expected
    assert [item.ids[f] for f in item.words] == [p[0] for p in per_word]


def test_chinese_is_tagged_per_character(tokenizer):
    chars = list("江泽民在北京")
    item = align_words(tokenizer, chars, [5, 6, 6, 0, 1, 2], max_len=64, char_level=True)
    per_char = [tokenizer.encode(c) for c in chars]
    assert item.ids == [t for p in per_char for t in p]
    labelled = [t for t in item.target if t != -100]
    assert labelled == [5, 6, 6, 0, 1, 2]  # one label per character, on its first piece
    assert sum(len(p) for p in per_char) == len(item.target)


def test_truncated_words_and_echo(tokenizer):
    words = ["one", "two", "three", "four"]
    short = align_words(tokenizer, words, [1, 0, 0, 1], max_len=3)
    assert len(short.ids) <= 3 and short.words[-1] == -1  # cut-off words are marked, predicted O later
    echo = align_words(tokenizer, words, [1, 0, 0, 1], max_len=64, echo=True)
    plain = align_words(tokenizer, words, [1, 0, 0, 1], max_len=64)
    n = len(plain.ids)
    assert echo.ids == plain.ids * 2
    assert echo.target == [-100] * n + plain.target  # tagged on the copy that has read the whole sentence
    assert echo.words == [w + n for w in plain.words]


def test_pooling_ignores_right_padding(tokenizer):
    model = random_model(tokenizer.vocab_size)
    short, long = [*tokenizer.encode("The fox"), 2], [*tokenizer.encode("A language model predicts the next token"), 2]
    ids, lengths = pad([Item(short), Item(long)], tokenizer.pad_id)
    for pooling in ("last", "mean"):
        module = SequenceClassifier(model, 3, pooling).eval()
        batch = module(ids, lengths)
        alone = torch.cat([module(torch.tensor([x]), torch.tensor([len(x)])) for x in (short, long)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        h = model.hidden_states(torch.tensor([short]))[0]
        pooled = h[-1] if pooling == "last" else h.mean(0)
        torch.testing.assert_close(batch[0], module.head(pooled), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Chat loss mask


def test_chat_loss_covers_exactly_the_assistant_replies(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi, how can I help?"},
                {"role": "user", "content": "Tell me a fact"}, {"role": "assistant", "content": "Foxes jump."}]
    item = chat_item(tokenizer, messages, max_len=256)
    full = tokenizer.encode(format_chat(messages, add_generation_prompt=False), bos=True)
    assert item.ids == full[:-1]
    # Reference mask from the marker tokens: after each <|assistant|> up to and including its <|end|>.
    assistant, end = tokenizer.sp.piece_to_id("<|assistant|>"), tokenizer.sp.piece_to_id("<|end|>")
    inside, expected = False, []
    for tok in full:
        expected.append(inside)
        if tok == assistant:
            inside = True
        elif tok == end:
            inside = False
    trained = [i for i, t in enumerate(item.target) if t != -100]
    assert [i + 1 for i in trained] == [i for i, m in enumerate(expected) if m]
    assert all(item.target[i] == full[i + 1] for i in trained)
    assert tokenizer.decode(full[i + 1] for i in trained) == "Hi, how can I help?<|end|>Foxes jump.<|end|>"


# --------------------------------------------------------------------------------------------------
# LoRA


def test_lora_merged_weights_give_the_same_logits(tokenizer):
    model = random_model(tokenizer.vocab_size)
    add_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj", "down_proj"])
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)  # B starts at zero: make the update real
    model.eval()
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    lora_logits = model(ids)
    fresh = PaLM(model.config)
    fresh.load_state_dict(merged_state_dict(model))
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(fresh.eval()(ids), lora_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged(ids), lora_logits, atol=1e-5, rtol=1e-5)
    base_only = random_model(tokenizer.vocab_size)(ids)
    assert (base_only - lora_logits).abs().max() > 1e-3  # the adapters did change the function


def test_lora_trains_only_the_adapters_and_the_head(tokenizer, tmp_path):
    model = random_model(tokenizer.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=2, alpha=4, targets=["q_proj", "v_proj"])
    module = SequenceClassifier(model, 2)
    head_before = module.head.weight.detach().clone()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith("head.")}
    items = [Item([*tokenizer.encode(t), tokenizer.eos_id], i % 2) for i, t in
             enumerate(["the fox", "the dog", "a fox runs", "a dog sleeps"] * 4)]
    cfg = FinetuneConfig(lora_rank=2, epochs=2, batch_size=4, patience=0)
    rising = iter([0.5, 0.6])  # the last model is the best, so the folder holds the final weights
    fit(module, model, tokenizer, items, lambda: {"loss": 0.0, "accuracy": next(rising)},
        lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y), cfg, tmp_path / "out", "accuracy",
        {"task": "classify", "labels": ["a", "b"], "pooling": "last"})
    after = merged_state_dict(model)
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, weight in before.items():
        owner = name.removesuffix(".weight")
        if owner in lora:
            torch.testing.assert_close(lora[owner].base.weight, weight, rtol=0, atol=0)  # frozen base
            delta = after[name] - weight
            assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= 2  # a rank-2 update
        else:
            torch.testing.assert_close(after[name], weight, rtol=0, atol=0)
    assert not torch.equal(module.head.weight, head_before)
    saved = load_tensors(tmp_path / "out" / "model.safetensors")  # the checkpoint is plain: LoRA merged
    assert set(saved) == set(before)
    torch.testing.assert_close(saved["layers.0.self_attn.q_proj.weight"], after["layers.0.self_attn.q_proj.weight"])


# --------------------------------------------------------------------------------------------------
# Training runs on tiny models


def test_classifier_learns_an_easy_task(checkpoint, tmp_path):
    data = easy_task(tmp_path, n=160)
    out = tmp_path / "clf"
    best = finetune_classify(str(checkpoint), str(out), train_file=str(data), text_field="sentence",
                             label_field="animal", train=FinetuneConfig(epochs=2, batch_size=16, lr=2e-3, max_len=32))
    assert best["valid/accuracy"] >= 0.9, best  # chance is 0.5
    clf = load_classifier(out)
    rows = clf.predict(["the quick fox over lazy model", "many token dog from before", "model fox"])
    assert [label for label, _ in rows][:2] == ["fox", "dog"]
    assert all(abs(sum(p.values()) - 1) < 1e-5 for _, p in rows)
    config = load_config(out)
    assert config["task"] == "classify" and config["labels"] == ["dog", "fox"] and config["pooling"] == "last"
    records = read_metrics(out / "metrics.jsonl")
    assert any("loss" in r and "examples_per_s" in r for r in records)
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / HEAD_FILE).is_file()
    model, _, _ = load_checkpoint(out)  # model-only tools read the folder as a plain checkpoint
    assert isinstance(model, PaLM)


def test_early_stopping_stops_and_keeps_the_best(tokenizer, tmp_path):
    model = random_model(tokenizer.vocab_size)
    module = SequenceClassifier(model, 2)
    items = [Item([5, 6, 7, tokenizer.eos_id], i % 2) for i in range(8)]
    scores = iter([0.5, 0.8, 0.7, 0.6, 0.95, 0.99])
    heads = []

    def validate():
        heads.append(module.head.weight.detach().clone())
        return {"loss": 1.0, "accuracy": next(scores)}

    cfg = FinetuneConfig(epochs=10, batch_size=4, eval_every=1, patience=2, lr=1e-2)
    best = fit(module, model, tokenizer, items, validate,
               lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y), cfg, tmp_path / "run",
               "accuracy", {"task": "classify", "labels": ["a", "b"], "pooling": "last"})
    assert best["step"] == 2 and best["valid/accuracy"] == 0.8 and best["steps"] == 4  # 0.7, 0.6: stop
    saved = load_tensors(tmp_path / "run" / HEAD_FILE)
    torch.testing.assert_close(saved["weight"], heads[1], rtol=0, atol=0)
    assert not torch.equal(saved["weight"], heads[3])
    assert load_config(tmp_path / "run")["best"]["step"] == 2
    assert any("early stop" in r.get("event", "") for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_ner_tagger_and_cli(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    out = tmp_path / "ner"
    best = finetune_ner(str(checkpoint), str(out), task="ner-zh",
                        train=FinetuneConfig(epochs=1, batch_size=8, max_len=48, lora_rank=4,
                                             lora_targets=["q_proj,v_proj", "up_proj"]))
    assert {"valid/f1", "valid/precision", "valid/recall"} <= set(best)
    config = load_config(out)
    assert config["task"] == "ner" and config["char_level"] and "B-PER" in config["labels"]
    assert config["finetune"]["lora_targets"] == ["q_proj", "v_proj", "up_proj"]
    tagger = load_tagger(out)
    text = "国家主席江泽民在北京发表讲话"
    (ents,) = tagger.tag([text])
    assert all(e["text"] == text[e["start"]:e["end"]] and e["type"] in ("PER", "LOC", "ORG") for e in ents)
    assert tagger.tag(["", "   "]) == [[], []]
    assert main(["tag", "--checkpoint", str(out), "我爱北京", "江泽民"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    with pytest.raises(PalmkitError, match="0 validation examples"):  # ner-en's slice has no valid sentence
        finetune_ner(str(checkpoint), str(tmp_path / "en"), task="ner-en", train=FinetuneConfig(epochs=1))


def test_chat_result_is_a_plain_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    out = tmp_path / "chat"
    best = finetune_chat(str(checkpoint), str(out), task="dialogue-en",
                         train=FinetuneConfig(epochs=1, batch_size=4, max_len=64))
    assert best["valid/loss"] > 0
    assert not (out / HEAD_FILE).exists()
    model, tok, config = load_checkpoint(out)
    assert config["task"] == "chat"
    assert (export_hf(out, tmp_path / "hf") / "config.json").is_file()
    text = generate(model, tok, [format_chat([{"role": "user", "content": "Hi"}])],
                    SamplingParams(max_new_tokens=4, temperature=0))[0]
    assert text.finish_reason in ("stop", "length")


def test_classify_cli_takes_texts_and_comma_lists(checkpoint, tmp_path, capsys):
    data = easy_task(tmp_path, n=40)
    out = tmp_path / "c"
    assert main(["finetune", "classify", "--checkpoint", str(checkpoint), "--out", str(out), "--train_file",
                 str(data), "--text_field", "sentence", "--label_field", "animal", "--train.epochs", "1",
                 "--train.max_len", "24", "--train.lora_rank", "2",
                 "--train.lora_targets", "q_proj,k_proj,v_proj"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] < 5000  # adapters on 3 projections and the head only
    assert load_config(out)["finetune"]["lora_targets"] == ["q_proj", "k_proj", "v_proj"]
    # lr 0, the default, stands for the rate that suits the method, resolved when training starts
    assert load_config(out)["finetune"]["lr"] == 0.0
    assert FinetuneConfig(lora_rank=2).peak_lr == 2e-3 and FinetuneConfig().peak_lr == 3e-4
    assert FinetuneConfig(lr=1e-3, lora_rank=2).peak_lr == 1e-3
    assert main(["classify", "--checkpoint", str(out), "a fox", "a dog", "nothing"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["a fox", "a dog", "nothing"]
    assert all(line.split("\t")[0] in ("fox", "dog") for line in lines)


def test_bad_inputs_are_user_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target"):
        add_lora(random_model(64), 2, 4, ["qq_proj"])
    with pytest.raises(Exception, match="either --task"):
        finetune_classify(str(checkpoint), str(tmp_path / "x"))
    with pytest.raises(Exception, match="not a classify checkpoint"):
        load_classifier(checkpoint)


def test_served_classifier_answers_v1_classify(checkpoint, tmp_path):
    """A `finetune classify` folder served by `palmkit serve` gets POST /v1/classify, matching the Python API."""
    import httpx

    from palmkit.serve.app import create_app
    from tests.test_serve import running

    data = easy_task(tmp_path, n=40)
    out = tmp_path / "served"
    finetune_classify(str(checkpoint), str(out), train_file=str(data), text_field="sentence",
                      label_field="animal", train=FinetuneConfig(epochs=1, batch_size=16, lr=2e-3, max_len=32))
    texts = ["a quick fox", "a lazy dog"]
    expected = load_classifier(out).predict(texts)
    with running(create_app(out)) as base:
        r = httpx.post(f"{base}/v1/classify", json={"model": "served", "input": texts}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["label"] for d in body["data"]] == [label for label, _ in expected]
        for d, (_, probs) in zip(body["data"], expected, strict=True):
            assert d["probabilities"] == pytest.approx(probs, abs=1e-5)
        assert httpx.post(f"{base}/v1/classify", json={"model": "served", "input": []}).status_code == 400
        assert httpx.post(f"{base}/v1/classify", json={"model": "nope", "input": "x"}).status_code == 404
        assert httpx.post(f"{base}/v1/classify", json={"model": "served", "input": 3}).status_code == 400
