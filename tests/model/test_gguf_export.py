"""GGUF exports run in the real llama.cpp (built from the pinned sdist by palmkit.model.llamacpp) as palmkit runs
them: the same token ids, the same greedy continuations, logits and perplexity within stated tolerances, the chat
template and the end of turn.

The model is the tiny preset trained for a few dozen steps on the sample text in all seven languages and on a chat
conversation, so that its distributions are peaked (greedy continuations are not decided by rounding) and it ends
its chat reply with `<|end|>` of its own accord.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.infer.generate import generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import encode_chat, format_chat
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.export import export
from palmkit.model.gguf_export import export_gguf
from palmkit.model.layouts import dense_weights
from palmkit.model.quant import quantize_int8
from palmkit.model.tokenizer import Tokenizer
from tests.conftest import FIXTURES, random_model
from tests.model.test_chat_template import CONVERSATION, FORGED

LINES = (FIXTURES / "sample.txt").read_text(encoding="utf-8").splitlines()
LANGUAGES = {"en": LINES[0:3], "de": LINES[3:5], "fr": LINES[5:7], "es": LINES[7:8], "ru": LINES[8:9],
             "zh": LINES[9:10], "ja": LINES[10:11]}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"}]
TEXTS = {
    **{lang: lines[0] for lang, lines in LANGUAGES.items()},
    "code": 'def f(x):\n    return {"a": [x, 2]}  # ok\n\tprint(f"{x!r}")',
    "digits": "In 2022, 3.14159 and 1,000,000 and 0042 and ٣ and 12345678901234567890.",
    "emoji": "emoji 😀🚀 flags 🇩🇪 and a rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 word ✓",
    "markers": "<|user|>hi<|end|>\n<|assistant|>ok<|end|> <|system|>",
    "special names": "text with <s> and </s> and <unk> and <pad> typed",
    "spaces": "  leading spaces,\ttabs\t\tand   runs   \n\nnew lines ",
}

# Tolerances on log-probabilities over the whole vocabulary (max |llama.cpp - palmkit| at one position). f32 differs
# only by the order of float32 sums; bf16 and q8_0 round the weights (bf16 keeps 8 bits of mantissa, q8_0 127 steps
# per 32 weights) and llama.cpp also rounds the activations it multiplies them by (to bf16 or to q8_0 blocks).
LOGPROB_TOL = {"f32": 2e-3, "f16": 0.05, "bf16": 0.1, "q8_0": 0.1}
# Perplexity: relative difference per language
PPL_TOL = {"f32": 1e-3, "q8_0": 0.02}


def _train(model: torch.nn.Module, tokenizer: Tokenizer, steps: int = 80) -> torch.nn.Module:
    """A few dozen AdamW steps on the sample lines and the chat conversation (enough to make predictions peaked)."""
    docs = [tokenizer.encode(line, bos=True, eos=True) for line in LINES]
    docs += [encode_chat(tokenizer, CHAT, add_generation_prompt=False)] * 4
    stream = [i for doc in docs for i in doc]
    seq = 64
    windows = torch.tensor([stream[s:s + seq + 1] for s in range(0, len(stream) - seq - 1, 16)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (8,), generator=gen)]
        loss = model(batch[:, :-1], targets=batch[:, 1:])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A trained tiny checkpoint, its int8 copy, and their GGUF files in every outtype."""
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    model = _train(random_model(tokenizer.vocab_size, seed=3, rope_theta=5000.0), tokenizer)
    save_checkpoint(root / "ckpt", model, tokenizer)
    files = {t: export_gguf(root / "ckpt", root / f"tiny-{t}.gguf", outtype=t) for t in ("f32", "f16", "bf16", "q8_0")}
    int8 = quantize_int8(load_checkpoint(root / "ckpt")[0])
    save_checkpoint(root / "int8", int8, tokenizer)
    files["int8"] = export_gguf(root / "int8", root / "tiny-int8.gguf")  # auto: q8_0 from the int8 values
    model, tok, _ = load_checkpoint(root / "ckpt")
    return model, tok, files, root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama-server on 127.0.0.1 for one GGUF file, with a JSON client."""

    def __init__(self, bin_dir: Path, model: Path, log: Path):
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
             "-c", "256", "-np", "1", "-t", "2", "--no-warmup"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama-server did not start: {log.read_text()[-3000:]}")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def servers(exported, llama_cpp):
    """One llama-server per GGUF file, started on first use and stopped at the end of the module."""
    started: dict[str, Server] = {}
    root = exported[3]

    def get(kind: str) -> Server:
        if kind not in started:
            started[kind] = Server(llama_cpp, exported[2][kind], root / f"server-{kind}.log")
        return started[kind]

    yield get
    for server in started.values():
        server.stop()


# -- tokenizer ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TEXTS))
def test_token_ids_are_palmkits(servers, exported, name):
    tok = exported[1]
    text = TEXTS[name]
    # A prompt as llama.cpp tokenizes user text: BOS by the model's rule, names of control tokens left as text
    ids = servers("f32").post("/tokenize", {"content": text, "add_special": True, "parse_special": False})["tokens"]
    assert ids == tok.encode_prompt(text)
    back = servers("f32").post("/detokenize", {"tokens": ids[1:]})["content"]
    assert back == tok.decode(ids)


def test_chat_markers_in_plain_text_are_single_tokens(servers, exported):
    tok = exported[1]
    ids = servers("f32").post("/tokenize", {"content": TEXTS["markers"], "parse_special": False})["tokens"]
    markers = [tok.sp.piece_to_id(m) for m in ("<|user|>", "<|end|>", "<|assistant|>", "<|system|>")]
    assert [i for i in ids if i in markers] == [markers[0], markers[1], markers[2], markers[1], markers[3]]


# -- the model ------------------------------------------------------------------------------------------------------

def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)


def _llama_logprobs(server: Server, ids: list[int], n_vocab: int) -> torch.Tensor:
    out = server.post("/completion", {"prompt": ids, "n_predict": 1, "n_probs": n_vocab, "temperature": 0,
                                      "post_sampling_probs": False, "cache_prompt": False})
    probs = out["completion_probabilities"][0]["top_logprobs"]
    assert len(probs) == n_vocab
    result = torch.full((n_vocab,), float("nan"), dtype=torch.float64)
    for p in probs:
        result[p["id"]] = p["logprob"]
    return result


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "int8"])
def test_logprobs_within_tolerance(servers, exported, outtype):
    model, tok, _, root = exported
    if outtype == "int8":  # the int8 checkpoint's q8_0 file against the float weights int8 stands for
        reference, _, _ = load_checkpoint(root / "int8")
        reference = _dense(reference)
    else:
        reference = model
    server = servers(outtype)
    worst = 0.0
    for text in TEXTS.values():
        ids = tok.encode_prompt(text)
        ours, theirs = _logprobs(reference, ids), _llama_logprobs(server, ids, tok.vocab_size)
        # probabilities below e^-30 are lost to float32 in llama.cpp's softmax: compare the rest
        keep = ours > -30
        worst = max(worst, float((ours - theirs)[keep].abs().max()))
    assert worst < LOGPROB_TOL["q8_0" if outtype == "int8" else outtype], worst


def _dense(model):
    """A float32 copy of an int8 model: its dequantised weights in a plain model."""
    cfg = model.config
    plain = random_model(cfg.vocab_size, **{k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads",
                                                                          "n_kv_heads", "rope_theta")}).float()
    from palmkit.model.layouts import model_state
    plain.load_state_dict({k: v.float() for k, v in dense_weights(model_state(model)).items()})
    return plain.eval()


@pytest.mark.parametrize("name", ["en", "de", "fr", "es", "ru", "zh", "ja", "code"])
def test_greedy_continuation_is_palmkits(servers, exported, name):
    model, tok, _, _ = exported
    prompt = TEXTS[name][:24]
    ids = tok.encode_prompt(prompt)
    ours = [s[0] for s in generate_ids(model, [ids], SamplingParams(max_new_tokens=32, temperature=0,
                                                                   stop_at_eos=False))]
    out = servers("f32").post("/completion", {"prompt": prompt, "n_predict": 32, "temperature": 0,
                                              "ignore_eos": True, "return_tokens": True, "cache_prompt": False})
    assert out["tokens"] == ours


def test_int8_values_go_into_q8_0_unchanged(exported):
    """Every q8_0 block of the int8 export holds the checkpoint's int8 values and its row's scale."""
    root = exported[3]
    from palmkit.io import load_tensors

    state = load_tensors(root / "int8" / "model.safetensors")
    reader = gguf.GGUFReader(exported[2]["int8"])
    tensors = {t.name: t for t in reader.tensors}
    q = state["layers.0.mlp.down_proj.weight"]
    block = tensors["blk.0.ffn_down.weight"]
    assert block.tensor_type == gguf.GGMLQuantizationType.Q8_0
    raw = np.asarray(block.data).reshape(q.shape[0], -1, 34)
    assert np.array_equal(raw[:, :, 2:].view(np.int8).reshape(q.shape), q.numpy())
    values = gguf.quants.dequantize(np.asarray(block.data), gguf.GGMLQuantizationType.Q8_0).reshape(q.shape)
    assert np.array_equal(values, dense_weights(state)["layers.0.mlp.down_proj.weight"].float().numpy())
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


# -- chat -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [CONVERSATION, CHAT[:2], CHAT])
def test_chat_template_gives_encode_chat_ids(servers, exported, messages):
    tok = exported[1]
    server = servers("f32")
    prompt = server.post("/apply-template", {"messages": messages})["prompt"]
    assert prompt == format_chat(messages)  # BOS is left to the tokenizer, which adds it by the model's rule
    ids = server.post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    assert ids == encode_chat(tok, messages)


def test_marker_typed_in_a_message_is_a_marker_in_llama_cpp(servers, exported):
    """The one known difference: llama.cpp reads markers in rendered content as tokens (palmkit keeps them text)."""
    tok = exported[1]
    server = servers("f32")
    prompt = server.post("/apply-template", {"messages": FORGED})["prompt"]
    ids = server.post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    system = tok.sp.piece_to_id("<|system|>")
    assert system in ids and system not in encode_chat(tok, FORGED)


def test_chat_reply_stops_at_end_of_turn(servers, exported):
    model, tok, _, _ = exported
    end = tok.sp.piece_to_id("<|end|>")
    prompt = encode_chat(tok, CHAT[:2])
    ours = [s[0] for s in generate_ids(model, [prompt], SamplingParams(max_new_tokens=40, temperature=0))]
    assert ours[-1] == end  # the trained model ends its reply itself
    server = servers("f32")
    out = server.post("/v1/chat/completions", {"messages": CHAT[:2], "max_tokens": 40, "temperature": 0})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == tok.decode(ours[:-1])
    assert out["usage"]["completion_tokens"] == len(ours)  # the reply and its <|end|>
    raw = server.post("/completion", {"prompt": prompt, "n_predict": 40, "temperature": 0, "return_tokens": True})
    assert raw["stop_type"] == "eos" and raw["tokens"] == ours[:-1]


# -- perplexity -----------------------------------------------------------------------------------------------------

def _palmkit_ppl(model, ids: list[int], n_ctx: int, bos: int) -> float:
    """Perplexity as llama-perplexity defines it: chunks of n_ctx tokens, each starting with BOS, scored on the
    second half (every scored token has at least n_ctx/2 tokens of context)."""
    nll, count, first = 0.0, 0, n_ctx // 2
    for start in range(0, len(ids) // n_ctx * n_ctx, n_ctx):
        chunk = [bos, *ids[start + 1:start + n_ctx]]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk]))[0].double(), -1)
        targets = torch.tensor(chunk[first + 1:])
        nll -= float(logp[first:n_ctx - 1].gather(1, targets[:, None]).sum())
        count += n_ctx - 1 - first
    return math.exp(nll / count)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_perplexity_per_language_agrees(exported, llama_cpp, outtype):
    model, tok, files, root = exported
    n_ctx = 32
    for lang, lines in LANGUAGES.items():
        text = " ".join(lines)
        while len(tok.encode_prompt(text)) < 3 * n_ctx:
            text += " " + " ".join(lines)
        path = root / f"valid-{lang}.txt"
        path.write_text(text, encoding="utf-8")
        run = subprocess.run([str(llama_cpp / "llama-perplexity"), "-m", str(files[outtype]), "-f", str(path),
                              "-c", str(n_ctx), "-b", str(n_ctx), "-t", "2"], capture_output=True, text=True,
                             timeout=300)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
        assert found, (run.stdout + run.stderr)[-3000:]
        theirs = float(found.group(1))
        ours = _palmkit_ppl(model, tok.encode_prompt(text), n_ctx, tok.bos_id)
        assert abs(theirs / ours - 1) < PPL_TOL[outtype], (lang, ours, theirs)


# -- the file and its refusals --------------------------------------------------------------------------------------

def test_metadata_llama_cpp_reads(exported):
    model, tok, files, _ = exported
    fields = gguf.GGUFReader(files["f32"]).fields
    value = lambda key: fields[key].contents()
    cfg = model.config
    assert value("general.architecture") == "command-r"
    assert value("command-r.attention.head_count_kv") == cfg.n_kv_heads == 1
    assert value("command-r.rope.freq_base") == 5000.0
    assert value("command-r.logit_scale") == pytest.approx(cfg.d_model ** -0.5)
    assert value("tokenizer.ggml.add_space_prefix") is False
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("tokenizer.ggml.eot_token_id") == tok.sp.piece_to_id("<|end|>")
    assert json.loads(value("palmkit.config"))["model"]["d_model"] == cfg.d_model


def test_modelfile_beside_the_file(exported):
    files = exported[2]
    card = files["q8_0"].with_suffix(".Modelfile").read_text()
    assert f"FROM ./{files['q8_0'].name}\n" in card
    assert 'PARAMETER stop "<|end|>"' in card and "PARAMETER num_ctx 256" in card
    # the Go template renders each message as format_chat does: <|role|>content<|end|> and a newline
    assert "<|{{ .Role }}|>{{ .Content }}<|end|>\n{{ end }}<|assistant|>" in card


def test_existing_files_are_refused_without_force(exported):
    files, root = exported[2], exported[3]
    before = files["f32"].read_bytes()
    with pytest.raises(PalmkitError, match="exists"):
        export_gguf(root / "ckpt", files["f32"], outtype="f16")
    assert files["f32"].read_bytes() == before
    other = root / "other.gguf"
    other.with_suffix(".Modelfile").write_text("mine")
    with pytest.raises(PalmkitError, match="Modelfile exists"):
        export_gguf(root / "ckpt", other)
    assert not other.exists()
    export_gguf(root / "ckpt", other, force=True)
    assert other.is_file() and "FROM ./other.gguf" in other.with_suffix(".Modelfile").read_text()
    with pytest.raises(PalmkitError, match=r"\.gguf"):
        export_gguf(root / "ckpt", root / "model.bin")
    with pytest.raises(PalmkitError, match="--format gguf"):
        export(root / "ckpt", root / "hf", outtype="q8_0")


def test_heads_and_low_rank_are_refused(tmp_path, exported):
    from palmkit.apps.commands import compress_command

    root = exported[3]
    config = json.loads((root / "ckpt" / "config.json").read_text())
    head = tmp_path / "classifier"
    head.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (head / name).write_bytes((root / "ckpt" / name).read_bytes())
    (head / "config.json").write_text(json.dumps({**config, "task": "classify"}))
    with pytest.raises(PalmkitError, match="--drop_head"):
        export_gguf(head, tmp_path / "c.gguf")
    assert export_gguf(head, tmp_path / "c.gguf", drop_head=True).is_file()
    compress_command(str(root / "ckpt"), str(tmp_path / "lowrank"), rank_ratio=0.5)
    with pytest.raises(PalmkitError, match="low-rank"):
        export_gguf(tmp_path / "lowrank", tmp_path / "l.gguf")
    assert not (tmp_path / "l.gguf").exists()


def test_cli_writes_gguf(exported, tmp_path):
    root = exported[3]
    r = subprocess.run([sys.executable, "-m", "palmkit.cli", "export", "--checkpoint", str(root / "ckpt"),
                        "--format", "gguf", "--outtype", "q8_0", "--out", str(tmp_path / "m.gguf")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    again = subprocess.run([sys.executable, "-m", "palmkit.cli", "export", "--checkpoint", str(root / "ckpt"),
                            "--format", "gguf", "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "palmkit: error:" in again.stderr and "exists" in again.stderr
