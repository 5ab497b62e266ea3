"""The fine-tuning loop: early stopping keeps the best checkpoint; several processes train as one; a killed run
resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from palmkit.cli import main
from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item
from palmkit.finetune.fit import MODULE_FILE, FinetuneConfig, Objective, fit
from palmkit.finetune.heads import HEAD_FILE, SequenceClassifier
from palmkit.io import load_tensors
from palmkit.model.checkpoint import load_config
from palmkit.train.metrics import read_metrics
from tests.conftest import TASK_ROOT, easy_task, random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def objective(items, validate) -> Objective:
    """A two-class classification objective on `items`, judged by accuracy."""
    return Objective(items, lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y), validate,
                     "accuracy", {"task": "classify", "labels": ["a", "b"], "pooling": "last"})


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
    best = fit(module, model, tokenizer, objective(items, validate), cfg, tmp_path / "run")
    assert best["step"] == 2 and best["valid/accuracy"] == 0.8 and best["steps"] == 4  # 0.7, 0.6: stop
    saved = load_tensors(tmp_path / "run" / HEAD_FILE)
    torch.testing.assert_close(saved["weight"], heads[1], rtol=0, atol=0)
    assert not torch.equal(saved["weight"], heads[3])
    assert load_config(tmp_path / "run")["best"]["step"] == 2
    assert any("early stop" in r.get("event", "") for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_finetune_never_replaces_a_folder_with_the_users_files(tokenizer, tmp_path):
    model = random_model(tokenizer.vocab_size)
    module = SequenceClassifier(model, 2)
    items = [Item([5, 6, 7, tokenizer.eos_id], i % 2) for i in range(4)]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("text,label\n")
    validated = []

    def run(**kw):
        return fit(module, model, tokenizer,
                   objective(items, lambda: validated.append(1) or {"loss": 1.0, "accuracy": 0.5}),
                   FinetuneConfig(epochs=1, batch_size=4), out, **kw)

    with pytest.raises(PalmkitError, match=r"not a palmkit folder .*data\.csv.*--force"):
        run()
    assert not validated and [p.name for p in out.iterdir()] == ["data.csv"]  # refused before training
    run(force=True)
    assert (out / "data.csv").read_text() == "text,label\n" and (out / HEAD_FILE).is_file()
    run(force=True)  # again: palmkit's files (its manifest) replaced, the user's kept
    assert (out / "data.csv").read_text() == "text,label\n" and (out / "learning_curve.png").is_file()


def test_force_never_deletes_user_files_that_carry_palmkits_names(tokenizer, tmp_path):
    """eval/ and tensorboard/ made by the user are not palmkit's: refused with or without --force, untouched."""
    model = random_model(tokenizer.vocab_size)
    module = SequenceClassifier(model, 2)
    items = [Item([5, 6, 7, tokenizer.eos_id], i % 2) for i in range(4)]
    out = tmp_path / "mine"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "gold.jsonl").write_text('{"label": "a"}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.mine").write_text("my runs")
    for force in (False, True):
        with pytest.raises(PalmkitError, match="eval, tensorboard"):
            fit(module, model, tokenizer, objective(items, lambda: {"loss": 1.0, "accuracy": 0.5}),
                FinetuneConfig(epochs=1, batch_size=4), out, force=force)
    assert (out / "eval" / "gold.jsonl").read_text() == '{"label": "a"}\n'
    assert (out / "tensorboard" / "events.mine").read_text() == "my runs"
    assert sorted(p.name for p in out.iterdir()) == ["eval", "tensorboard"]


# Fine-tuning under torchrun and across a kill -9: every kind of task, full and LoRA, on the training engine.
TINY = {"epochs": 1, "batch_size": 8, "max_train": 24, "max_valid": 16, "max_len": 32, "lr": 1e-3, "log_every": 1,
        "eval_every": 2, "dropout": 0.0, "lora_dropout": 0.0}


def finetune_args(kind: str, data_dir, out, lora: bool = False, **opts) -> list[str]:
    """`palmkit finetune KIND` arguments on a small task of that kind, with FinetuneConfig options `opts`."""
    task = {"classify": ["--data.train_file", str(easy_task(data_dir, n=60)), "--data.text_field", "sentence",
                         "--data.label_field", "animal"],
            "ner": ["--data.task", "ner-zh"], "chat": ["--data.task", "dialogue-en"]}[kind]
    opts = {**opts, **({"lora_rank": 2, "lora_targets": "q_proj,v_proj"} if lora else {})}
    return ["finetune", kind, "--out", str(out), *task, *(a for k, v in opts.items() for a in (f"--train.{k}", str(v)))]


def torchrun(nproc: int, args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PALMKIT_TASK_DATA": str(TASK_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "palmkit.cli", *args] if nproc > 1 else [sys.executable, "-m", "palmkit.cli", *args]
    # a session of its own, so that kill -9 reaches torchrun and every rank it started
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def finished(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def last_state(out) -> dict:
    """The weights of a run's newest training checkpoint (the whole module: model, LoRA, head)."""
    latest = json.loads((out / "latest.json").read_text())["path"]
    return load_tensors(out / "checkpoints" / latest / MODULE_FILE)


def train_losses(out) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize(("kind", "lora", "strategy"), [
    *((kind, lora, "ddp") for kind in ("classify", "ner", "chat") for lora in (False, True)),
    ("classify", True, "fsdp"), ("chat", False, "fsdp")])
def test_two_processes_match_one_with_the_same_global_batch(checkpoint, tmp_path, monkeypatch, kind, lora, strategy):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    one, two = tmp_path / "one", tmp_path / "two"
    opts = {**TINY, "batch_size": 3} if kind == "chat" else TINY  # dialogue-en's slice has 7 conversations
    assert main(["finetune", kind, "--checkpoint", str(checkpoint),
                 *finetune_args(kind, tmp_path, one, lora, **opts)[2:]]) == 0
    finished(torchrun(2, ["finetune", kind, "--checkpoint", str(checkpoint),
                          *finetune_args(kind, tmp_path, two, lora, **opts, strategy=strategy)[2:]]))
    # Each process took half of every batch (dropout is off: its masks would differ by process); the gradient is
    # the mean over the whole batch's targets either way, so only float rounding differs. AdamW moves a weight by
    # about lr x sign(gradient) a step, so a near-zero gradient's rounding shows at up to 10% of one step (1e-4);
    # each process training its own copy, or a mean of the processes' means, moves weights by ~1e-3.
    a, b = last_state(one), last_state(two)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
    la, lb = train_losses(one), train_losses(two)
    assert la.keys() == lb.keys() == {1, 2, 3}  # three batches: the processes' batches differ at each
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)
    assert load_config(two)["best"]["step"] == load_config(one)["best"]["step"]
    for name in ("model.safetensors", *([HEAD_FILE] if kind != "chat" else [])):  # the best model, gathered
        best_one, best_two = load_tensors(one / name), load_tensors(two / name)
        assert best_one.keys() == best_two.keys()
        for k in best_one:
            torch.testing.assert_close(best_two[k], best_one[k], rtol=0, atol=1e-4)
    assert '"world_size": 2' in (two / "metrics.jsonl").read_text()


LONG = {"epochs": 3, "batch_size": 8, "max_len": 32, "lr": 1e-3, "eval_every": 5, "save_every": 5, "patience": 0,
        "log_every": 5}  # dropout stays on: the resumed run must draw the same masks


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_after_kill_gives_the_same_weights_and_best_checkpoint(checkpoint, tmp_path, nproc):
    lora = nproc == 2
    args = ["--checkpoint", str(checkpoint)]
    data = tmp_path / "data"
    data.mkdir()
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    whole = finetune_args("classify", data, ref, lora, **LONG)
    finished(torchrun(nproc, [*whole[:2], *args, *whole[2:]]))
    cut = finetune_args("classify", data, killed, lora, **LONG)
    proc = torchrun(nproc, [*cut[:2], *args, *cut[2:]])
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000010").is_dir():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of torchrun and its ranks: no chance to clean up
    proc.wait()
    total = json.loads((ref / "latest.json").read_text())["step"]
    assert (killed / "checkpoints").is_dir() and not (killed / "checkpoints" / f"step-{total:07d}").exists()
    finished(torchrun(nproc, [*cut[:2], *args, *cut[2:], "--resume"]))
    assert_same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert assert_same(last_state(killed), last_state(ref))
    for name in ("model.safetensors", HEAD_FILE):  # the best model, chosen the same way
        assert assert_same(load_tensors(killed / name), load_tensors(ref / name))
    assert load_config(killed)["best"] == load_config(ref)["best"]
    assert train_losses(killed) == train_losses(ref)
    assert any("resume at step" in r.get("event", "") for r in read_metrics(killed / "metrics.jsonl"))


def test_micro_batches_and_activation_checkpointing_train_the_same_model(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    states = []
    for name, extra in (("whole", {}), ("micro", {"micro_batch": 3, "activation_checkpointing": "true"})):
        out = tmp_path / name
        assert main(["finetune", "ner", "--checkpoint", str(checkpoint),
                     *finetune_args("ner", tmp_path, out, True, **TINY, **extra)[2:]]) == 0
        states.append(last_state(out))
    a, b = states
    assert a.keys() == b.keys()
    for k in a:  # batches of 8 as 3 + 3 + 2, each weighted by its targets; blocks recomputed in the backward pass
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
