"""Fixtures and helpers shared by every test folder: fixture paths, a tiny tokenizer, model, checkpoint and corpus,
fake models, a FAQ file and an easy classification task."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.palm import build_model, preset
from palmkit.model.tokenizer import Tokenizer, train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TASK_ROOT = FIXTURES / "tasks"  # slices of the built-in tasks' package files (fixtures/tasks/README.md)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    lines = (FIXTURES / "sample.txt").read_text(encoding="utf-8").splitlines()
    return train_tokenizer(lines * 4, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=600)


# PALMKIT_TEST_DEVICE=cuda runs tests on a GPU (benchmarks/gpu_check.sh does, for the device-generic test files):
# new tensors default to that device and random_model puts its model there.
DEVICE = os.environ.get("PALMKIT_TEST_DEVICE", "cpu")
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)


def random_model(vocab_size: int, seed: int = 0, **overrides):
    """A tiny model whose embeddings are small enough that greedy outputs vary from step to step."""
    model = build_model(preset("tiny", vocab_size=vocab_size, **overrides), seed=seed)
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.05)
    return model.to(DEVICE).eval()


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


class Slow(torch.nn.Module):
    """The same model, sleeping before every forward pass so that requests overlap on a fast machine."""

    def __init__(self, inner, delay: float):
        super().__init__()
        self.inner, self.delay, self.config, self.embed_tokens = inner, delay, inner.config, inner.embed_tokens

    def hidden_states(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.hidden_states(*args, **kwargs)

    def logits(self, h):
        return self.inner.logits(h)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, random_model(tokenizer.vocab_size), tokenizer)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tok, _ = load_checkpoint(checkpoint)
    return model, tok


def make_corpus(root: Path, vocab_size: int = 500, docs_per_lang: int = 60) -> Path:
    """A miniature built corpus (text, tokenizer, shards) in three languages from the sample text."""
    import json
    import random

    from palmkit.data.corpus.build import shard_text

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
    train_tokenizer(lines * 4, root / "tokenizer.model", vocab_size=vocab_size)
    shard_text(root)  # the corpus build's own encode stage and shard writer
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def finetuned_classifier(checkpoint: Path, out: Path, task: str, **options) -> Path:
    """`checkpoint` fine-tuned on the slice of a built-in task in fixtures/tasks (a step or two: fast, not good)."""
    from palmkit.data.tasks import TaskFiles
    from palmkit.finetune.classify import finetune_classify
    from palmkit.finetune.fit import FinetuneConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
        finetune_classify(str(checkpoint), str(out), data=TaskFiles(task=task),
                          train=FinetuneConfig(epochs=1, **options))
    return out


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; on a busy 2-core machine two threads spin-wait on each other (the
    matmul tests in tests/model/ take ~8 s on one thread, 53 s measured on two when another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL_FAQ = """question,answer
How do I reset my password?,"Click ""Forgot password"" on the sign-in page and follow the link we email you."
How do I cancel my subscription?,"Go to Billing > Plan and click Cancel subscription."
Which payment methods do you accept?,"Visa, Mastercard and PayPal."
"""


@pytest.fixture
def faq_file(tmp_path) -> Path:
    path = tmp_path / "faq.csv"
    path.write_text(SMALL_FAQ, encoding="utf-8")
    return path


FILLER = "the quick brown over lazy language model predicts next token from ones before it many".split()


def easy_task(folder: Path, n: int = 160, seed: int = 0) -> Path:
    """Which animal does the sentence mention? Random filler words around one key word."""
    import csv
    import random

    rng = random.Random(seed)
    path = folder / "animals.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "animal"])
        for i in range(n):
            words = rng.sample(FILLER, 6)
            key = ("fox", "dog")[i % 2]
            words.insert(rng.randrange(7), key)
            w.writerow([" ".join(words), key])
    return path


def movielens_files(root: Path, n_users: int = 24, n_items: int = 30, seed: int = 0) -> Path:
    """A miniature MovieLens 100K in RecBole's atomic files, under root/recbole-1.2.1/ where
    `load_movielens(root)` looks. Two tastes: users of the first half like (4-5 stars) the "Comedy" movies and
    rate the "Horror" ones low, the others the reverse; the last user rates everything 2 (no likes), and the
    last movie is rated by nobody."""
    import random

    rng = random.Random(seed)
    folder = root / "recbole-1.2.1" / "recbole" / "dataset_example" / "ml-100k"
    folder.mkdir(parents=True, exist_ok=True)
    genre = ["Comedy" if i % 2 else "Horror" for i in range(1, n_items + 1)]
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\t{'Funny' if genre[i - 1] == 'Comedy' else 'Scary'} Film {i}, The\t{1980 + i}\t{genre[i - 1]}"
              for i in range(1, n_items + 1)]
    ratings = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        taste = "Comedy" if u <= n_users // 2 else "Horror"
        seen = rng.sample(range(1, n_items), 14)
        for t, i in enumerate(seen):
            stars = 2 if u == n_users else (rng.choice((4, 5)) if genre[i - 1] == taste else rng.choice((1, 2)))
            ratings.append(f"{u}\t{i}\t{stars}\t{880000000 + 1000 * t + u}")
    (folder / "ml-100k.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    (folder / "ml-100k.inter").write_text("\n".join(ratings) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def recommender_dir(tmp_path_factory, checkpoint) -> tuple[Path, str]:
    """(folder, summary) of `palmkit recipe recommend` on the miniature MovieLens from the tiny random checkpoint
    (a few tuning steps: it runs everything, it learns little); the recommender is OUT/model."""
    from palmkit.apps.recommend import recipe

    root = movielens_files(tmp_path_factory.mktemp("movielens"))
    out = tmp_path_factory.mktemp("recommend")
    summary = recipe(checkpoint=str(checkpoint), out=str(out), max_train=32, batch_size=8, history_len=24, dim=8,
                     factors=4, data=str(root))
    return out, summary


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The bin folder of llama.cpp built from the pinned sdist (palmkit.model.llamacpp): built on first use, then cached
    (.ci/run builds it before the tests). Skipped where cmake or ninja is missing."""
    import shutil

    from palmkit.model.llamacpp import llama_cpp_bin

    missing = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"building llama.cpp needs {' and '.join(missing)}")
    return llama_cpp_bin(quiet=True)
