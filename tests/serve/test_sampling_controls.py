"""The per-request sampling controls end to end through the openai client: greedy completions with penalties and
logit_bias equal transformers' generate on the export (its logits processors) or a hand-written greedy loop."""

import pytest
import torch

pytestmark = pytest.mark.timeout(300)

PROMPTS = ("The quick brown fox", "Once upon a time", "Der schnelle")


@pytest.fixture(scope="module")
def hf(checkpoint, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from palmkit.model.export import export_hf

    out = tmp_path_factory.mktemp("hf") / "hf"
    export_hf(checkpoint, out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def hf_greedy(hf, tok, prompt: str, n: int, **kwargs) -> list[int]:
    ids = torch.tensor([tok.encode_prompt(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eos_id)] if tok.eos_id in out else out


def served_ids(client, prompt: str, n: int, **extra) -> list[int]:
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
                                    extra_body={"return_tokens_as_token_ids": True, **extra})
    return [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]


def test_repetition_penalty_equals_transformers(client, loaded, hf):
    _, tok = loaded
    changed = 0
    for prompt in PROMPTS:
        ours = served_ids(client, prompt, 16, repetition_penalty=1.8)
        assert ours == hf_greedy(hf, tok, prompt, 16, repetition_penalty=1.8)
        changed += ours != served_ids(client, prompt, 16)
    assert changed  # the penalty changed at least one completion: the comparison is not vacuous


def test_logit_bias_equals_transformers_sequence_bias(client, loaded, hf):
    _, tok = loaded
    for prompt in PROMPTS:
        plain = served_ids(client, prompt, 8)
        bias = {plain[0]: -100.0, plain[2]: 3.0}
        ours = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                                         logit_bias={str(k): v for k, v in bias.items()},
                                         extra_body={"return_tokens_as_token_ids": True})
        ids = [int(t.split(":")[1]) for t in ours.choices[0].logprobs.tokens]
        assert ids == hf_greedy(hf, tok, prompt, 8, sequence_bias={(k,): v for k, v in bias.items()})
        assert ids[0] != plain[0]


def test_presence_and_frequency_penalties_equal_a_hand_written_loop(client, loaded):
    model, tok = loaded
    presence, frequency = 0.7, 0.9
    for prompt in PROMPTS:
        ids = tok.encode_prompt(prompt)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(16):
                logits = model.logits(model.hidden_states(torch.tensor([ids + out]))[0, -1]).float()
                for t in set(out):  # OpenAI's definition, over the completion's own tokens
                    logits[t] -= presence + frequency * out.count(t)
                nxt = int(logits[: tok.vocab_size].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
        assert served_ids(client, prompt, 16, presence_penalty=presence, frequency_penalty=frequency) == out
