"""Shared fixtures: a tiny tokenizer and a tiny random model saved as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from palmkit.checkpoint import save_checkpoint
from palmkit.model import build_model, preset
from palmkit.tokenizer import Tokenizer, train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    lines = (FIXTURES / "sample.txt").read_text(encoding="utf-8").splitlines()
    return train_tokenizer(lines * 4, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=600)


def random_model(vocab_size: int, seed: int = 0, **overrides):
    """A tiny model whose embeddings are small enough that greedy outputs vary from step to step."""
    model = build_model(preset("tiny", vocab_size=vocab_size, **overrides), seed=seed)
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, random_model(tokenizer.vocab_size), tokenizer)
    return path
