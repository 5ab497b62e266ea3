"""Multiple choice by log-likelihood: items from a built-in task, the harness's token split, and lm-evaluation-harness
scoring the same items through `palmkit serve` (local-completions) and on the export (hf) exactly as palmkit does."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.infer.choices import (
    choice_loglikelihoods,
    continuation_logprob,
    read_choice_items,
    score_choices,
    split_continuation,
    write_choice_items,
)
from palmkit.model.export import export_hf
from palmkit.serve.app import create_app
from tests.conftest import TASK_ROOT
from tests.serve.conftest import running

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"


@pytest.fixture
def task_data(monkeypatch):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))


def test_items_of_a_classification_task(tmp_path, task_data):
    path = write_choice_items("sentiment-en", str(tmp_path / "items.jsonl"), split="all")
    items = read_choice_items(path)
    assert len(items) == 40  # the fixture slice: 31 + 6 + 3
    assert all(i["choices"] == ["negative", "positive"] and i["prompt"].endswith("\nAnswer:") for i in items)
    assert {i["label"] for i in items} == {0, 1}
    assert len(read_choice_items(write_choice_items("sentiment-en", str(tmp_path / "t.jsonl"), max_items=2))) == 2
    with pytest.raises(PalmkitError, match="classification"):
        write_choice_items("ner-en", str(tmp_path / "ner.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "choices": ["a"], "label": 0}\n', encoding="utf-8")
    with pytest.raises(PalmkitError, match=r"bad\.jsonl:1"):
        read_choice_items(tmp_path / "bad.jsonl")


def test_split_moves_trailing_space_into_the_continuation(loaded):
    _, tok = loaded
    head, tail = split_continuation(tok, "The film was ", "great")
    assert head == tok.encode_prompt("The film was")
    assert head + tail == tok.encode_prompt("The film was great")


def test_continuation_logprob_sums_the_tokens_log_probabilities(loaded):
    model, tok = loaded
    head, tail = split_continuation(tok, "The quick brown", " fox jumps")
    ids = head + tail
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    expected = sum(ref[t - 1, ids[t]].item() for t in range(len(head), len(ids)))
    assert continuation_logprob(model, head, tail) == pytest.approx(expected, abs=1e-4)
    # past the window the context loses its start, as the harness cuts it
    long_head = [tok.bos_id] + [40] * model.config.max_seq_len
    window = long_head[-(model.config.max_seq_len - len(tail) + 1):]
    assert continuation_logprob(model, long_head, tail) == pytest.approx(continuation_logprob(model, window, tail),
                                                                         abs=1e-4)


def lm_eval(run: Path, model: str, model_args: str, out: Path) -> tuple[float, list[list[float]]]:
    """(acc, per-item log-likelihoods) of the harness on examples/lm_eval/palmkit_choices.yaml, with no network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(run / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "palmkit_choices",
           "--include_path", str(EXAMPLES), "--output_path", str(out), "--log_samples", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())
    samples = [json.loads(line) for line in open(glob.glob(f"{out}/**/samples_*.jsonl", recursive=True)[0])]
    samples.sort(key=lambda s: s["doc_id"])
    return (results["results"]["palmkit_choices"]["acc,none"],
            [[float(r[0]) for r in s["filtered_resps"]] for s in samples])


@pytest.mark.timeout(900)
def test_lm_eval_through_the_server_and_on_the_export_scores_as_palmkit_does(tmp_path, checkpoint, loaded,
                                                                             task_data):
    model, tok = loaded
    run = tmp_path / "run"
    items = read_choice_items(write_choice_items("sentiment-en", str(run / "palmkit_choices.jsonl"), split="all"))
    export_hf(checkpoint, tmp_path / "hf")
    mine = score_choices(str(checkpoint), str(run / "palmkit_choices.jsonl"))
    ours = choice_loglikelihoods(model, tok, items)
    context = model.config.max_seq_len
    with running(create_app(checkpoint)) as base:
        api_acc, api = lm_eval(run, "local-completions",
                               f"model=tiny,base_url={base}/v1/completions,tokenizer={tmp_path / 'hf'},"
                               f"tokenizer_backend=huggingface,add_bos_token=True,max_length={context - 1},"
                               "num_concurrent=1,max_retries=1", tmp_path / "api")
    hf_acc, hf = lm_eval(run, "hf", f"pretrained={tmp_path / 'hf'},dtype=float32,add_bos_token=True",
                         tmp_path / "hf_out")
    assert api_acc == hf_acc == mine["accuracy"]
    assert mine["items"] == len(items) == len(api) == len(hf)
    for a, h, o in zip(api, hf, ours, strict=True):
        assert a == pytest.approx(o, abs=1e-4) and h == pytest.approx(o, abs=1e-4)
