"""LoRA: merged weights give the same logits, and training moves only the adapters (a low-rank update) and the head."""

import copy
import json

import pytest
import torch

from palmkit.finetune.encode import Item
from palmkit.finetune.fit import FinetuneConfig, Objective, fit
from palmkit.finetune.heads import SequenceClassifier
from palmkit.io import load_tensors
from palmkit.model.lora import LoRALinear, add_lora, merge_lora, merged_state_dict
from palmkit.model.palm import PaLM
from tests.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


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
    objective = Objective(items, lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y),
                          lambda: {"loss": 0.0, "accuracy": next(rising)}, "accuracy",
                          {"task": "classify", "labels": ["a", "b"], "pooling": "last"})
    fit(module, model, tokenizer, objective, cfg, tmp_path / "out")
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


def test_peft_adapter_on_the_exported_base_is_the_merged_model(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from palmkit.model.checkpoint import save_checkpoint
    from palmkit.model.export import export_hf
    from palmkit.model.lora import ADAPTER_CONFIG, write_peft_adapter

    # GQA with 2 key/value heads: k_proj and v_proj are narrower than q_proj
    model = random_model(tokenizer.vocab_size, seed=3, n_kv_heads=2)
    save_checkpoint(tmp_path / "base", model, tokenizer)
    export_hf(tmp_path / "base", tmp_path / "base-hf")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    add_lora(model, rank=4, alpha=8, targets=targets)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    write_peft_adapter(tmp_path / "adapter", model)
    merged = merge_lora(copy.deepcopy(model)).eval()
    assert peft.LoraConfig.from_pretrained(tmp_path / "adapter").r == 4
    assert sorted(json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["target_modules"]) \
        == sorted(targets)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)
    x = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        before = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs, ours = tuned(input_ids=x).logits, merged(x)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (before - ours).abs().max().item() > 1e-2  # the adapters really change the model
