"""`palmkit finetune chat`: the result is a plain checkpoint that generates and exports; with LoRA, a PEFT adapter
for the exported base too; the exported chat model answers in transformers as in palmkit."""

import json
from pathlib import Path

import pytest
import torch

from palmkit.apps.chat import reply
from palmkit.data.tasks import TaskFiles
from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.fit import ADAPTER_DIR, FinetuneConfig
from palmkit.finetune.heads import HEAD_FILE
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import encode_chat, format_chat
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.export import export_hf
from palmkit.model.lora import ADAPTER_CONFIG
from tests.conftest import TASK_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_chat_result_is_a_plain_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    out = tmp_path / "chat"
    best = finetune_chat(str(checkpoint), str(out), data=TaskFiles(task="dialogue-en"),
                         train=FinetuneConfig(epochs=1, batch_size=4, max_len=64))
    assert best["valid/loss"] > 0
    assert not (out / HEAD_FILE).exists()
    model, tok, config = load_checkpoint(out)
    assert config["task"] == "chat"
    assert (export_hf(out, tmp_path / "hf") / "config.json").is_file()
    text = generate(model, tok, [format_chat([{"role": "user", "content": "Hi"}])],
                    SamplingParams(max_new_tokens=4, temperature=0))[0]
    assert text.finish_reason in ("stop", "length")


GREETINGS = ["Hi", "Hello there", "Good morning", "Hey"]


def greetings_file(folder: Path) -> Path:
    """40 different greetings that all get the same short answer: learnt in a few steps, <|end|> included."""
    rows = [{"messages": [{"role": "user", "content": f"{GREETINGS[i % 4]} {'abcdefghij'[i // 4]}"},
                          {"role": "assistant", "content": "Hello, friend."}]} for i in range(40)]
    path = folder / "greetings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_chat(checkpoint, tmp_path_factory):
    """The tiny checkpoint tuned for 30 LoRA steps on the greetings, and the exports of it and of its base."""
    root = tmp_path_factory.mktemp("lora-chat")
    torch.manual_seed(0)
    finetune_chat(str(checkpoint), str(root / "chat"), data=TaskFiles(train_file=str(greetings_file(root))),
                  train=FinetuneConfig(epochs=6, batch_size=8, lr=3e-3, lora_rank=4, dropout=0.0, lora_dropout=0.0,
                                       lora_targets="q_proj,v_proj,o_proj,down_proj", patience=0))
    export_hf(root / "chat", root / "chat-hf")
    export_hf(checkpoint, root / "base-hf")
    return root


def test_lora_chat_writes_tensorboard_events_and_a_peft_adapter(lora_chat):
    events = list((lora_chat / "chat" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 100
    adapter = json.loads((lora_chat / "chat" / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 4, 16.0)
    assert sorted(adapter["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]


def test_peft_adapter_on_the_exported_base_gives_the_tuned_model(lora_chat, tokenizer):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, _, _ = load_checkpoint(lora_chat / "chat")
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_chat / "base-hf", dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, lora_chat / "chat" / ADAPTER_DIR).eval()
    x = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": "Hi there, how are you?"}])])
    with torch.no_grad():
        assert (tuned(input_ids=x).logits - model(x)).abs().max().item() < 1e-4


def test_exported_chat_model_answers_as_palmkit_and_stops_at_end_of_turn(lora_chat):
    transformers = pytest.importorskip("transformers")
    model, tok, _ = load_checkpoint(lora_chat / "chat")
    hf_tok = transformers.AutoTokenizer.from_pretrained(lora_chat / "chat-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(lora_chat / "chat-hf", dtype=torch.float32)
    end = tok.sp.piece_to_id("<|end|>")
    for greeting in ("Hi", "Good morning z"):
        messages = [{"role": "user", "content": greeting}]
        ours = reply(model, tok, messages, SamplingParams(max_new_tokens=24, temperature=0))
        assert (ours.text, ours.finish_reason) == ("Hello, friend.", "stop")  # it learnt the answer and its end
        enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**enc, max_new_tokens=24, do_sample=False)
        theirs = out[0, enc["input_ids"].shape[1]:].tolist()
        assert theirs == [*ours.token_ids, end]  # stopped by <|end|>, an eos_token_id of the export
        assert hf_tok.decode(theirs, skip_special_tokens=True) == ours.text
