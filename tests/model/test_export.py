"""Exported folders load in transformers as CohereForCausalLM and reproduce palmkit exactly: weights, the BOS rule,
the tokenizer (tokenizer.json, no sentencepiece needed), the chat template and where generation stops."""

import json
import subprocess
import sys

import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.infer.generate import generate, generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.io import MANIFEST
from palmkit.model.chat_template import encode_chat
from palmkit.model.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from palmkit.model.export import export_hf
from palmkit.model.tokenizer import Tokenizer
from tests.conftest import random_model
from tests.model.test_chat_template import CONVERSATION, FORGED
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


TEXTS = [*SAMPLES, "<|user|>hi<|end|><|assistant|>", (SAMPLES[0] + " ") * 40]


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported[2] / "hf")


@pytest.mark.parametrize("text", TEXTS)
def test_autotokenizer_with_default_arguments_gives_palmkits_prompt_ids(hf_tokenizer, tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode_prompt(text) and ids[0] == tokenizer.bos_id
    # palmkit's decode drops BOS and keeps chat markers as text, as transformers' does once BOS is left out
    assert hf_tokenizer.decode(ids[1:]) == tokenizer.decode(ids)


def test_tokenizer_loads_without_sentencepiece_or_protobuf(exported, tokenizer):
    code = ("import sys; sys.modules.update({'sentencepiece': None, 'google.protobuf': None}); "
            "import transformers; t = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(t(sys.argv[2])['input_ids'])")
    out = subprocess.run([sys.executable, "-c", code, str(exported[2] / "hf"), SAMPLES[0]], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == tokenizer.encode_prompt(SAMPLES[0])


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[:3], FORGED])
def test_apply_chat_template_gives_palmkits_ids(hf_tokenizer, tokenizer, messages):
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == encode_chat(tokenizer, messages)
    # a marker typed in a message stays letters in transformers too: no system turn is opened
    assert ids.count(tokenizer.sp.piece_to_id("<|system|>")) == sum(m["role"] == "system" for m in messages)
    done = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)["input_ids"]
    assert done == encode_chat(tokenizer, messages, add_generation_prompt=False)


def test_generation_stops_at_eos_and_end_of_turn(exported, tokenizer):
    _, hf, root = exported
    stop = [tokenizer.eos_id, tokenizer.sp.piece_to_id("<|end|>")]
    assert json.loads((root / "hf" / "config.json").read_text())["eos_token_id"] == stop
    assert json.loads((root / "hf" / "generation_config.json").read_text())["eos_token_id"] == stop
    assert hf.generation_config.eos_token_id == stop


@pytest.mark.parametrize("prompt", ["The quick brown fox", "", "素早い茶色の狐"])
def test_greedy_text_is_palmkits(exported, tokenizer, hf_tokenizer, prompt):
    model, hf, _ = exported
    ours = generate(model, tokenizer, prompt, SamplingParams(max_new_tokens=24, temperature=0))[0]
    enc = hf_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=24, do_sample=False)
    theirs = out[0, enc["input_ids"].shape[1]:].tolist()
    assert theirs[:len(ours.token_ids)] == ours.token_ids
    assert len(theirs) == len(ours.token_ids) + (ours.finish_reason == "stop")  # + the EOS palmkit does not show
    text = hf_tokenizer.decode(theirs, skip_special_tokens=True)
    if "\ufffd" not in ours.text:
        assert text == ours.text
    else:  # A random model writes stray bytes: an invalid UTF-8 run is replaced differently (SentencePiece keeps its
        # valid bytes, transformers' byte fallback replaces them all); every other piece decodes the same.
        whole = [i for i in theirs if not tokenizer.sp.is_byte(i)]
        assert hf_tokenizer.decode(whole, skip_special_tokens=True) == tokenizer.decode(whole)


def test_checkpoint_without_bos_exports_without_bos(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "ckpt", random_model(tokenizer.vocab_size),
                    Tokenizer(tokenizer.path, add_bos=False))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(SAMPLES[0])["input_ids"] == tokenizer.encode(SAMPLES[0])
    assert hf_tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)["input_ids"] == \
        encode_chat(Tokenizer(tokenizer.path, add_bos=False), CONVERSATION)


def test_head_checkpoints_are_refused_unless_the_head_is_dropped(tmp_path, checkpoint):
    for task in ("classify", "ner"):
        config = json.loads((checkpoint / CONFIG_FILE).read_text())
        folder = tmp_path / task
        model, tok, _ = load_checkpoint(checkpoint)
        save_checkpoint(folder, model, tok, extra={k: v for k, v in config.items() if k != "model"} | {"task": task})
        with pytest.raises(PalmkitError, match=f"is a {task} checkpoint: its head"):
            export_hf(folder, tmp_path / f"{task}-hf")
        assert not (tmp_path / f"{task}-hf").exists()
        assert (export_hf(folder, tmp_path / f"{task}-lm", drop_head=True) / "model.safetensors").is_file()


def test_export_never_replaces_a_folder_with_the_users_files(tmp_path, checkpoint):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("my model card")
    with pytest.raises(PalmkitError, match=r"not a palmkit folder .*README\.md.*--force"):
        export_hf(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["README.md"]
    export_hf(checkpoint, out, force=True)  # the export's files written in, the card kept
    assert (out / "README.md").read_text() == "my model card" and (out / "model.safetensors").is_file()
    export_hf(checkpoint, out, force=True)  # again: the export's own files are replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer.model", "tokenizer_config.json"])


def test_tokenizer_json_is_sentencepiece_on_random_text(tokenizer):
    import random

    from palmkit.model.export import tokenizer_json
    from tests.conftest import FIXTURES

    tokenizers = pytest.importorskip("tokenizers")
    fast = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(tokenizer)))
    text = (FIXTURES / "sample.txt").read_text(encoding="utf-8")
    rng = random.Random(0)
    soup = " \t\n  abcdeé漢字😀<|>/0123"  # whitespace runs, digits, unseen characters, marker-like punctuation
    strings = [text[(i := rng.randrange(len(text))):i + rng.randrange(1, 300)] for _ in range(1500)]
    strings += ["".join(rng.choice(soup) for _ in range(rng.randrange(1, 40))) for _ in range(1500)]
    for s in strings:
        if not any(name in s for name in ("<s>", "</s>", "<pad>", "<unk>")):  # special names: see README
            assert fast.encode(s, add_special_tokens=False).ids == tokenizer.encode(s), s
