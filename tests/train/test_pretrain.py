"""Pretraining: what a run writes, exact resume (also after kill -9), bad losses, timed runs, fused projections."""

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.io import MANIFEST, load_tensors
from palmkit.train import engine as engine_module
from palmkit.train.config import TrainConfig
from palmkit.train.engine import Engine
from palmkit.train.metrics import read_metrics
from palmkit.train.pretrain import pretrain
from tests.train.conftest import BASE, assert_same_weights, cli_args, losses, weights


def test_training_lowers_loss_and_writes_everything(reference):
    steps = losses(reference)
    assert steps[12] < steps[1]
    assert (reference / "loss.png").stat().st_size > 1000
    assert any((reference / "tensorboard").iterdir())
    val = [r for r in read_metrics(reference / "metrics.jsonl") if "val/en/ppl" in r]
    assert val and all(math.isfinite(r["val/de/bpb"]) for r in val)
    assert sorted(os.listdir(reference / "final")) == [MANIFEST, "config.json", "model.safetensors", "tokenizer.model"]


def test_resume_after_kill_is_exact(corpus, reference, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "palmkit.cli", "pretrain", "--data", str(corpus), "--out", str(run),
           *cli_args(**BASE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step-0000006").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # kill -9 between checkpoints: no chance to clean up
    proc.wait()
    assert (run / "checkpoints" / "step-0000006").is_dir()
    assert not (run / "final").exists()
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(run), weights(reference))
    assert losses(run) == losses(reference)


def test_resume_continues_the_same_run_in_process(corpus, reference, tmp_path):
    run = tmp_path / "two-halves"
    pretrain(str(corpus), str(run), TrainConfig(**{**BASE, "max_steps": 6}))
    # A shorter run has its own cosine schedule, so continue from the step-3 checkpoint of the reference
    # set-up instead: copy it and resume with the reference's options.
    shutil.rmtree(run)
    shutil.copytree(reference / "checkpoints" / "step-0000003", run / "checkpoints" / "step-0000003")
    pretrain(str(corpus), str(run), TrainConfig(**BASE), resume=True)
    assert_same_weights(weights(run), weights(reference))


def test_non_finite_losses_stop_the_run(corpus, tmp_path):
    with pytest.raises(PalmkitError, match="not finite for 2 consecutive steps"):
        pretrain(str(corpus), str(tmp_path / "nan"), TrainConfig(**{**BASE, "lr": float("inf"), "max_bad_steps": 2,
                                                                    "warmup_steps": 0}))
    skipped = [r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl") if "event" in r]
    assert len(skipped) == 2


def test_timed_run_stops_on_time_and_resumes_its_clock(corpus, tmp_path, monkeypatch):
    # A clock that advances 50 ms per reading makes the run's length independent of the machine's load
    ticks = iter(range(10**9))
    monkeypatch.setattr("palmkit.train.engine.time.perf_counter", lambda: next(ticks) * 0.05)
    run = tmp_path / "timed"
    opts = {**BASE, "max_steps": 0, "max_minutes": 0.1, "eval_every": 0, "save_every": 0, "log_every": 4}
    pretrain(str(corpus), str(run), TrainConfig(**opts))
    state = json.loads(next(run.glob("checkpoints/step-*/trainer_state.json")).read_text())
    assert 6.0 <= state["train_seconds"] < 7.0
    assert max(losses(run)) == state["step"]  # the last step is logged, whatever log_every says
    records = [r for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    lrs = [r["lr"] for r in records]
    after_warmup = [r["lr"] for r in records if r["step"] >= BASE["warmup_steps"]]
    assert len(after_warmup) > 3 and all(b <= a for a, b in itertools.pairwise(after_warmup))
    assert after_warmup[-1] < 0.5 * max(lrs)
    # A resumed run counts the time already spent: with the budget used up it stops after one step
    pretrain(str(corpus), str(run), TrainConfig(**opts), resume=True)
    assert max(losses(run)) == state["step"] + 1
    with pytest.raises(ValueError, match="max_steps or max_minutes"):
        pretrain(str(corpus), str(tmp_path / "endless"), TrainConfig(**{**opts, "max_minutes": 0}))


def test_bad_options_are_clear(corpus, tmp_path):
    with pytest.raises(TypeError, match="learning_rate"):
        TrainConfig(learning_rate=1)
    with pytest.raises(ValueError, match="not a multiple"):
        pretrain(str(corpus), str(tmp_path), TrainConfig(**{**BASE, "batch_tokens": 100}))
    r = subprocess.run([sys.executable, "-m", "palmkit.cli", "pretrain", "--data", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tokenizer model not found" in r.stderr and "Traceback" not in r.stderr


def test_metrics_jsonl_is_json(reference):
    for line in open(reference / "metrics.jsonl"):
        json.loads(line)


@pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread
def test_pretraining_fused_matches_plain_and_resumes_from_plain_checkpoints(corpus, tmp_path):
    from palmkit.train.config import TrainConfig
    from palmkit.train.pretrain import pretrain

    opts = dict(preset="tiny", seq_len=32, batch_tokens=256, micro_batch=4, max_steps=4, warmup_steps=2,
                eval_every=0, save_every=2, dtype="float32")
    pretrain(str(corpus), str(tmp_path / "plain"), TrainConfig(**opts))
    pretrain(str(corpus), str(tmp_path / "fused"), TrainConfig(**{**opts, "max_steps": 2, "fuse_projections": True}))
    step2 = load_tensors(tmp_path / "fused" / "checkpoints" / "step-0000002" / "model.safetensors")
    assert "layers.0.self_attn.q_proj.weight" in step2 and not any("in_proj" in k for k in step2)
    pretrain(str(corpus), str(tmp_path / "fused"), TrainConfig(**opts, fuse_projections=True), resume=True)
    plain = load_tensors(tmp_path / "plain" / "final" / "model.safetensors")
    fused = load_tensors(tmp_path / "fused" / "final" / "model.safetensors")
    assert plain.keys() == fused.keys()
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=1e-4)


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(corpus, tmp_path, monkeypatch):
    real = Engine._micro_step
    calls = itertools.count()

    def poisoned(self, *args, **kwargs):  # the 3rd micro-batch leaves an inf in one gradient, its loss finite
        out = real(self, *args, **kwargs)
        if next(calls) == 2:
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(Engine, "_micro_step", poisoned)
    run = tmp_path / "inf-grad"
    pretrain(str(corpus), str(run), TrainConfig(**{**BASE, "max_steps": 3, "eval_every": 0, "micro_batch": 8}))
    assert all(bool(torch.isfinite(v).all()) for v in weights(run).values())
    records = read_metrics(run / "metrics.jsonl")
    assert [r["event"] for r in records if "event" in r] == ["non-finite gradient, batch skipped"]
    assert records[-1]["step"] == 3 and records[-1]["skipped_batches"] == 1


def test_non_finite_weights_never_become_the_latest_checkpoint(corpus, tmp_path, monkeypatch):
    real = engine_module.optimizer_step
    calls = itertools.count(1)

    def corrupting(model, *args, **kwargs):  # the 4th update leaves an inf in the weights
        norm = real(model, *args, **kwargs)
        if next(calls) == 4:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return norm

    monkeypatch.setattr(engine_module, "optimizer_step", corrupting)
    run = tmp_path / "inf-weights"
    with pytest.raises(PalmkitError, match=r"weights at step 4 are not finite .* latest checkpoint stays step-0000002"):
        pretrain(str(corpus), str(run), TrainConfig(**{**BASE, "eval_every": 0, "save_every": 2, "keep_last": 1}))
    assert json.loads((run / "latest.json").read_text())["path"] == "step-0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]  # not pruned


@pytest.mark.parametrize("damage", ["weights", "latest.json"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(corpus, reference, tmp_path, capsys, damage):
    run = tmp_path / "damaged"
    for step in (3, 6):
        shutil.copytree(reference / "checkpoints" / f"step-{step:07d}", run / "checkpoints" / f"step-{step:07d}")
    (run / "latest.json").write_text(json.dumps({"step": 6, "path": "step-0000006"}))
    if damage == "weights":  # a torn write or a bad disk: the newest checkpoint is not whole
        weights_file = run / "checkpoints" / "step-0000006" / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    else:
        (run / "latest.json").write_text('{"step": 6, "pa')
    pretrain(str(corpus), str(run), TrainConfig(**BASE), resume=True)
    err = capsys.readouterr().err
    if damage == "weights":
        assert "cannot resume from step-0000006" in err and "trying the checkpoint before it" in err
    else:
        assert "latest.json" in err and "using the newest complete checkpoint instead" in err
    assert_same_weights(weights(run), weights(reference))


def test_resume_with_no_checkpoint_that_loads_is_an_error(corpus, reference, tmp_path):
    run = tmp_path / "all-damaged"
    shutil.copytree(reference / "checkpoints" / "step-0000003", run / "checkpoints" / "step-0000003")
    (run / "checkpoints" / "step-0000003" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(PalmkitError, match=r"no checkpoint of .* can be loaded"):
        pretrain(str(corpus), str(run), TrainConfig(**BASE), resume=True)


def test_a_peak_measured_low_is_measured_again_rather_than_reported_over_100_percent():
    """A peak measured while other work held the cores would put MFU over 100% on every step."""
    from types import SimpleNamespace

    import torch

    from palmkit.train.pretrain import Pretraining

    run = SimpleNamespace(flops_per_step=2e9, peak=1.0, peak_remeasures=0,
                          engine=SimpleNamespace(dtype=torch.float32),
                          d=SimpleNamespace(device=torch.device("cpu"), world_size=1))
    mfu = Pretraining._mfu(run, seconds=1e3)  # 2 MFLOP/s achieved against a "peak" of 1 FLOP/s
    assert run.peak_remeasures == 1 and run.peak > 1e6  # measured again: any CPU multiplies faster than 1 MFLOP/s
    assert mfu == pytest.approx(2e6 / run.peak) and mfu < 1
    peak = run.peak
    Pretraining._mfu(run, seconds=1e3)  # under the peak now: nothing measured
    assert run.peak_remeasures == 1 and run.peak == peak
