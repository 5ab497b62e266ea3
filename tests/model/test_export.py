"""Exported folders load in transformers as CohereForCausalLM and reproduce palmkit exactly."""

import json

import pytest
import torch

from palmkit.infer.generate import generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.export import export_hf
from tests.conftest import random_model
from tests.model.test_tokenizer import SAMPLES

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    # GQA with 2 key/value heads exercises the head layout more than MQA's single head.
    save_checkpoint(root / "ckpt", random_model(tokenizer.vocab_size, seed=7, n_kv_heads=2, rope_theta=5000.0),
                    tokenizer)
    export_hf(root / "ckpt", root / "hf")
    model, _, _ = load_checkpoint(root / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return model, hf, root


def test_loads_as_cohere_with_our_rope_theta(exported):
    _, hf, root = exported
    assert type(hf).__name__ == "CohereForCausalLM"
    assert hf.config.rope_parameters["rope_theta"] == 5000.0
    assert json.loads((root / "hf" / "config.json").read_text())["num_key_value_heads"] == 2


def test_logits_match(exported, tokenizer):
    model, hf, _ = exported
    x = torch.randint(0, tokenizer.vocab_size, (3, 40))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4


def test_left_padded_batch_matches_with_attention_mask(exported, tokenizer):
    model, hf, _ = exported
    x = torch.randint(3, tokenizer.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(x, positions=positions, pad_mask=mask.bool())
        theirs = hf(x, attention_mask=mask, position_ids=positions).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() < 1e-4


def test_kv_cache_decoding_matches(exported, tokenizer):
    model, hf, _ = exported
    prompt = tokenizer.encode("The quick brown fox", bos=True)
    ours = [s[0] for s in generate_ids(model, [prompt], SamplingParams(max_new_tokens=16, temperature=0,
                                                                         stop_at_eos=False))]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == ours
    # Step-by-step logits through transformers' own cache agree with our cached decoding.
    with torch.no_grad():
        first = hf(torch.tensor([prompt]), use_cache=True)
        step = hf(torch.tensor([[ours[0]]]), cache=first.cache, use_cache=True).logits[0, -1]
        full = model(torch.tensor([[*prompt, ours[0]]]))[0, -1]
    assert (step - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("text", [*SAMPLES, "<|user|>hi<|end|><|assistant|>"])
def test_autotokenizer_gives_the_same_ids(exported, tokenizer, text):
    _, _, root = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
