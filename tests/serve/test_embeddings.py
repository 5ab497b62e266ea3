"""`/v1/embeddings`, `/tokenize` and `/detokenize` through the openai client and plain HTTP; embeddings checked
against transformers on the export, token counts against the generation routes' usage."""

import base64

import httpx
import numpy as np
import pytest
import torch

from palmkit.infer.embeddings import embed

pytestmark = pytest.mark.timeout(300)

TEXTS = ["The quick brown fox", "Der schnelle braune Fuchs", "敏捷的"]


def test_embeddings_equal_transformers_mean_pooled_hidden_states(client, checkpoint, loaded, tmp_path):
    transformers = pytest.importorskip("transformers")
    from palmkit.model.export import export_hf

    export_hf(checkpoint, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    out = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in out.data] == [0, 1, 2]
    for text, item in zip(TEXTS, out.data, strict=True):
        enc = hf_tok(text, return_tensors="pt")
        with torch.no_grad():
            h = hf(**enc, output_hidden_states=True).hidden_states[-1][0]  # after the final norm
        ref = torch.nn.functional.normalize(h.mean(0), dim=0)
        assert torch.allclose(torch.tensor(item.embedding), ref, atol=1e-4)
    assert out.usage.prompt_tokens == sum(len(hf_tok(t)["input_ids"]) for t in TEXTS)


def test_same_text_same_embedding_across_requests_batches_and_formats(server, client, loaded):
    model, tok = loaded
    alone = client.embeddings.create(model="tiny", input="The quick brown fox").data[0].embedding
    batch = client.embeddings.create(model="tiny", input=["x", "The quick brown fox", "y" * 50]).data[1].embedding
    assert alone == batch  # exactly: each input runs alone
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "tiny", "input": "The quick brown fox",
                                                    "encoding_format": "float"}, timeout=30).json()
    assert r["data"][0]["embedding"] == alone
    ids = [tok.encode_prompt("The quick brown fox")]
    raw = httpx.post(f"{server}/v1/embeddings", json={"model": "tiny", "input": ids, "encoding_format": "base64"},
                     timeout=30).json()
    assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4").tolist() == alone
    # a second code path: the same function on the model as loaded. The server's engine may store the weights in
    # another layout (--engine.weight_layout), which changes float32 rounding in the last bits, not the result.
    direct = embed(model, tok.encode_prompt("The quick brown fox"))
    assert torch.allclose(torch.tensor(alone), direct, rtol=0, atol=1e-6)
    assert abs(np.linalg.norm(alone) - 1) < 1e-5


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"), ({"input": ["a"] * 300}, "input"), ({"input": [[]]}, "input"),
    ({"input": [99999]}, "input"), ({"input": "a", "dimensions": 3}, "dimensions"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"), ({"input": "a" * 10**6}, "input")])
def test_bad_embedding_requests_are_400(server, body, param):
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_counts_equal_usage_prompt_tokens(server, client):
    prompt = "Once upon a time, ç€"
    usage = client.completions.create(model="tiny", prompt=prompt, max_tokens=1).usage.prompt_tokens
    r = httpx.post(f"{server}/tokenize", json={"model": "tiny", "prompt": prompt, "return_token_strs": True}).json()
    assert r["count"] == usage == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] > 0
    assert httpx.post(f"{server}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": prompt}
    tools = [{"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is order 42?"}]
    for extra in ({}, {"tools": tools}):
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, **extra)
        r = httpx.post(f"{server}/tokenize", json={"model": "tiny", "messages": messages, **extra}).json()
        assert r["count"] == chat.usage.prompt_tokens
    without, with_tools = (httpx.post(f"{server}/tokenize", json={"messages": messages, **e}).json()["count"]
                           for e in ({}, {"tools": tools}))
    assert with_tools > without  # the tools are in the prompt


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
                                  "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "model"), ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"), ("/tokenize", {"prompt": "a" * 10**6}, "prompt")])
def test_bad_tokenize_requests_are_4xx(server, path, body, param):
    r = httpx.post(f"{server}{path}", json=body, timeout=30)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
