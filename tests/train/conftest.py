"""What the pretraining tests share: tiny-run options, reading a run's losses and weights, a reference run."""

import pytest
import torch

from palmkit.io import load_tensors
from palmkit.train.config import TrainConfig
from palmkit.train.metrics import read_metrics
from palmkit.train.pretrain import pretrain

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


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """One process trained for BASE's 12 steps, checkpoints every 3: what resumed and distributed runs must equal."""
    run = tmp_path_factory.mktemp("ref")
    pretrain(str(corpus), str(run), TrainConfig(**BASE))
    return run
