"""Pretraining: exact resume (also after kill -9), DDP and FSDP2 against one process, schedules."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.io import load_tensors
from palmkit.train.config import TrainConfig
from palmkit.train.metrics import read_metrics
from palmkit.train.pretrain import pretrain
from palmkit.train.step import PaLMAdafactor, lr_factor

BASE = dict(preset="tiny", seq_len=32, batch_tokens=256, micro_batch=4, max_steps=12, warmup_steps=3,
            eval_every=6, eval_sequences=4, save_every=3, log_every=1, dtype="float32", keep_last=10)


def cli_args(resume: bool = False, **opts) -> list[str]:
    """`palmkit pretrain` arguments for the TrainConfig options `opts`."""
    args = ["--resume"] if resume else []
    for k, v in opts.items():
        args += [f"--train.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def weights(run, step=None):
    path = run / "final" if step is None else run / "checkpoints" / f"step-{step:07d}"
    return load_tensors(path / "model.safetensors")


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    pretrain(str(corpus), str(run), TrainConfig(**BASE))
    return run


def test_training_lowers_loss_and_writes_everything(reference):
    steps = losses(reference)
    assert steps[12] < steps[1]
    assert (reference / "loss.png").stat().st_size > 1000
    assert any((reference / "tensorboard").iterdir())
    val = [r for r in read_metrics(reference / "metrics.jsonl") if "val/en/ppl" in r]
    assert val and all(math.isfinite(r["val/de/bpb"]) for r in val)
    assert sorted(os.listdir(reference / "final")) == ["config.json", "model.safetensors", "tokenizer.model"]


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
    import shutil

    shutil.rmtree(run)
    shutil.copytree(reference / "checkpoints" / "step-0000003", run / "checkpoints" / "step-0000003")
    pretrain(str(corpus), str(run), TrainConfig(**BASE), resume=True)
    assert_same_weights(weights(run), weights(reference))


def torchrun(nproc, corpus, run, **opts):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "palmkit.cli", "pretrain", "--data", str(corpus), "--out", str(run), *cli_args(**opts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(corpus, reference, tmp_path, strategy):
    run = tmp_path / strategy
    torchrun(2, corpus, run, **{**BASE, "max_steps": 6, "save_every": 6, "strategy": strategy})
    ref = losses(reference)
    got = losses(run)
    # Same global batch; the learning-rate schedule differs only in max_steps, which the cosine
    # reaches after warm-up, so compare the warm-up steps, where both runs are identical.
    for step in (1, 2, 3):
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])


def test_compiled_training_matches_eager(corpus, reference, tmp_path):
    run = tmp_path / "compiled"
    pretrain(str(corpus), str(run), TrainConfig(**{**BASE, "max_steps": 3, "save_every": 3, "compile": True}))
    ref = losses(reference)
    # Up to the end of warm-up both runs have the same learning rates (see test_two_ranks_match_one_process).
    for step, loss in losses(run).items():
        assert abs(loss - ref[step]) < 1e-5, (step, loss, ref[step])


def test_checkpoints_move_between_world_sizes(corpus, reference, tmp_path):
    # Two ranks resume a one-process checkpoint ...
    run = tmp_path / "one-to-two"
    import shutil

    shutil.copytree(reference / "checkpoints" / "step-0000006", run / "checkpoints" / "step-0000006")
    torchrun(2, corpus, run, resume=True, **{**BASE, "strategy": "fsdp"})
    assert_same_weights(weights(run), weights(reference), atol=1e-5)
    # ... and one process resumes a two-rank FSDP checkpoint.
    run2 = tmp_path / "two-to-one"
    shutil.copytree(run / "checkpoints" / "step-0000009", run2 / "checkpoints" / "step-0000009")
    pretrain(str(corpus), str(run2), TrainConfig(**BASE), resume=True)
    assert_same_weights(weights(run2), weights(reference), atol=1e-5)


def test_non_finite_losses_stop_the_run(corpus, tmp_path):
    with pytest.raises(PalmkitError, match="not finite for 2 consecutive steps"):
        pretrain(str(corpus), str(tmp_path / "nan"), TrainConfig(**{**BASE, "lr": float("inf"), "max_bad_steps": 2,
                                                                    "warmup_steps": 0}))
    skipped = [r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl") if "event" in r]
    assert len(skipped) == 2


def test_schedules():
    # 10 warm-up steps, then a cosine over 100 steps down to 10% of the peak
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(39, 10, 2000, schedule="rsqrt") == pytest.approx(0.5)
    # A timed run decays by the share of its time spent, or by steps when those run out first
    assert lr_factor(20, 10, 0, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_factor(20, 10, 0, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1, time_fraction=0.1) == pytest.approx(0.55)
    assert lr_factor(20, 10, 100, 0.1, time_fraction=0.5) == pytest.approx(0.55)


def test_timed_run_stops_on_time_and_resumes_its_clock(corpus, tmp_path, monkeypatch):
    # A clock that advances 50 ms per reading makes the run's length independent of the machine's load
    ticks = iter(range(10**9))
    monkeypatch.setattr("palmkit.train.pretrain.time.perf_counter", lambda: next(ticks) * 0.05)
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


def test_adafactor_matches_its_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    g = torch.randn(4, 3)
    p0 = p.detach().clone()
    opt = PaLMAdafactor([p], lr=1e-2)
    p.grad = g.clone()
    opt.step()
    v = g.square() + 1e-30  # beta2 = 1 - 1**-0.8 = 0 at step 1
    u = g / v.sqrt()
    u = u / max(1.0, float(u.square().mean().sqrt()))
    m = 0.1 * u
    scale = max(1e-3, float(p0.square().mean().sqrt()))
    expected = p0 * (1 - 1e-4) - 1e-2 * scale * m
    torch.testing.assert_close(p.detach(), expected)


def test_weight_decay_only_on_matrices():
    from palmkit.model.palm import build_model, preset
    from palmkit.train.step import make_optimizer

    model = build_model(preset("tiny", vocab_size=100))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2), name


def test_only_trainable_parameters_are_optimised():
    from palmkit.model.palm import build_model, preset
    from palmkit.train.step import make_optimizer

    model = build_model(preset("tiny", vocab_size=100))
    model.embed_tokens.weight.requires_grad_(False)
    for source in (model, model.parameters()):
        opt = make_optimizer(source, lr=1e-3)
        kept = {id(p) for g in opt.param_groups for p in g["params"]}
        assert kept == {id(p) for p in model.parameters() if p.requires_grad}
        assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_mean_lm_loss_is_the_mean_over_all_unmasked_tokens():
    import torch.nn.functional as F

    from palmkit.model.palm import build_model, preset
    from palmkit.train.lm_eval import mean_lm_loss

    model = build_model(preset("tiny", vocab_size=100), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for rows, length, masked in ((2, 7, 3), (3, 5, 4)):  # batches of unequal sizes: a mean of means would be wrong
        x = torch.randint(3, 100, (rows, length), generator=g)
        y = torch.randint(3, 100, (rows, length), generator=g)
        y[0, :masked] = -100
        batches.append((x, y))
    loss, n = mean_lm_loss(model, batches)
    with torch.no_grad():
        logits = torch.cat([model(x).flatten(0, 1) for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    assert n == int((targets != -100).sum()) == 2 * 7 + 3 * 5 - 3 - 4
    assert loss == pytest.approx(F.cross_entropy(logits, targets, ignore_index=-100).item(), rel=1e-5)


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
