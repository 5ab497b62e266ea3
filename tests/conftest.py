"""Shared fixtures: a tiny tokenizer and a tiny random model saved as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from palmkit.model.checkpoint import save_checkpoint
from palmkit.model.palm import build_model, preset
from palmkit.model.tokenizer import Tokenizer, train_tokenizer

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


class Scripted(torch.nn.Module):
    """A fake model that writes `script` after a prompt of `prompt_len` tokens, whatever the prompt says."""

    def __init__(self, config, script: list[int], prompt_len: int):
        super().__init__()
        self.config, self.script, self.prompt_len = config, torch.tensor(script), prompt_len
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, 1)

    def hidden_states(self, idx, positions, pad_mask=None, cache=None, n_keys=None):
        return positions[..., None].float()  # the "hidden state" is the position: logits look up the script

    def logits(self, h):
        step = (h[..., 0].long() - self.prompt_len + 1).clamp(0, len(self.script) - 1)
        # so peaked that sampling at any temperature picks the scripted token
        return torch.nn.functional.one_hot(self.script[step], self.config.vocab_size).float() * 1e4


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, random_model(tokenizer.vocab_size), tokenizer)
    return path


def make_corpus(root: Path, vocab_size: int = 500, docs_per_lang: int = 60) -> Path:
    """A miniature built corpus (text, tokenizer, shards) in three languages from the sample text."""
    import json
    import random

    from palmkit.data.shards import write_shards

    lines = (FIXTURES / "sample.txt").read_text(encoding="utf-8").splitlines()
    rng = random.Random(0)
    langs = {"en": lines[0:3] + lines[11:13], "de": lines[3:5], "zh": lines[9:10]}
    for lang, pool in langs.items():
        (root / "text" / lang).mkdir(parents=True, exist_ok=True)
        docs = [" ".join(rng.sample(pool, len(pool))) for _ in range(docs_per_lang)]
        cut = docs_per_lang * 5 // 6
        for split, chunk in (("train", docs[:cut]), ("valid", docs[cut:])):
            with open(root / "text" / lang / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": d, "source": "sample"}, ensure_ascii=False) + "\n" for d in chunk)
    tok = train_tokenizer(lines * 4, root / "tokenizer.model", vocab_size=vocab_size)
    write_shards(root, tok)
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def finetuned_classifier(checkpoint: Path, out: Path, task: str, **options) -> Path:
    """`checkpoint` fine-tuned on the slice of a built-in task in fixtures/tasks (a step or two: fast, not good)."""
    from palmkit.finetune.classify import finetune_classify
    from palmkit.finetune.fit import FinetuneConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PALMKIT_TASK_DATA", str(FIXTURES / "tasks"))
        finetune_classify(str(checkpoint), str(out), task=task, train=FinetuneConfig(epochs=1, **options))
    return out


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; on a busy 2-core machine two threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
