"""The recommendation recipe, `palmkit recipe recommend`, and `palmkit recommend`.

MovieLens 100K ratings become likes (4 or 5 stars) split by time per user; an ALS retriever learns from the
likes, a base language model is fine-tuned as a two-tower scorer of (history text, candidate text), and a
weighted sum of the two and popularity, its weights chosen on the validation stage, makes the final ranking. One
evaluation ranks every unseen item for every test user with each of the four; the recommender folder then serves
`palmkit recommend`, `load_recommender(DIR).recommend(user)` and `POST /v1/recommend` (`palmkit serve`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

from palmkit.apps.recipes import base_checkpoint
from palmkit.data.recommend import load_movielens, temporal_split
from palmkit.finetune.fit import FINETUNE_FILES, FinetuneConfig
from palmkit.io import check_destination
from palmkit.recommend.evaluate import LABELS, evaluate_split, stage_recommender, write_report
from palmkit.recommend.recommender import RECOMMENDER_JSON, RECOMMENDER_TENSORS, load_recommender
from palmkit.recommend.retriever import RetrieverConfig
from palmkit.recommend.scorer import ScorerConfig, finetune_scorer, load_scorer


def recipe(checkpoint: str = "", out: str = "runs/recommend", max_train: int = 1000, epochs: int = 1,
           lr: float = 0.0, batch_size: int = 16, lora_rank: int = 0, history_len: int = 64, dim: int = 64,
           factors: int = 32, k: int = 10, seed: int = 0, base_minutes: float = 3.0, data: str = "") -> str:
    """Movie recommendations from MovieLens 100K: ALS, a tuned language-model scorer, their combination, evaluated.

    Likes (4-5 stars) are split by time per user; the language model is fine-tuned on (history, candidate) texts;
    the combination's weights are chosen on the validation stage; popularity, ALS, the language model and the
    combination each rank every unseen movie of every test user.

    OUT/model is the recommender (a checkpoint folder plus recommender.json and recommender.safetensors);
    OUT/eval holds report.md, report.json and metrics.png. The data is fetched on first use (DATA.md).

    Args:
        checkpoint: the base model (default: the quickstart's, else a short English pretraining now)
        out: folder of the recommender and its evaluation
        max_train: (history, candidate) pairs the scorer is tuned on, half liked, half never rated (bounds the
            tuning time)
        epochs: passes over the pairs
        lr: peak learning rate; 0: 3e-4 for full fine-tuning, 2e-3 for LoRA
        batch_size: pairs per step
        lora_rank: rank of LoRA adapters; 0: full fine-tuning
        history_len: tokens of a user's text (the titles of their latest likes)
        dim: size of the scorer's user and item vectors
        factors: latent factors of the ALS retriever
        k: length of the evaluated lists (Recall@k, NDCG@k, HR@k)
        seed: seed of the pairs, the tuning and the retriever
        base_minutes: pretraining time of a base model when there is none to start from
        data: a folder holding recbole-1.2.1/ (an offline copy of the package's files); default: fetched
    """
    started = time.perf_counter()
    base = base_checkpoint(checkpoint, minutes=base_minutes)
    t0 = time.perf_counter()
    ratings, movies = load_movielens(data or None)
    split = temporal_split(ratings, list(movies))
    catalogue = [movies[i] for i in split.items]
    seconds = {"read data and split": time.perf_counter() - t0}
    print(f"MovieLens 100K: {len(ratings)} ratings, {len(split.users)} users, {len(catalogue)} movies; likes: "
          f"{sum(map(len, split.train.values()))} train, {sum(map(len, split.valid.values()))} validation, "
          f"{sum(map(len, split.test.values()))} test")
    model_dir = Path(out) / "model"
    # a previous run's recommender files are stale once the scorer is tuned again; anything else not palmkit's
    # in the folder stops the run here, before a file is touched
    check_destination(model_dir, FINETUNE_FILES | {RECOMMENDER_JSON, RECOMMENDER_TENSORS})
    for name in (RECOMMENDER_JSON, RECOMMENDER_TENSORS):
        (model_dir / name).unlink(missing_ok=True)
    # one validation per epoch, on 200 pairs: on a CPU each pair costs as much as a training step's example
    options = FinetuneConfig(max_train=max_train, epochs=epochs, lr=lr, batch_size=batch_size, max_valid=200,
                             patience=0, max_len=history_len + 32, lora_rank=lora_rank, seed=seed)
    t0 = time.perf_counter()
    best = finetune_scorer(str(base), str(model_dir), split, movies, options,
                           ScorerConfig(dim=dim, history_len=history_len))
    seconds["fine-tune the language-model scorer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = load_scorer(model_dir, catalogue)
    retriever = RetrieverConfig(factors=factors, seed=seed)
    result, combination = evaluate_split(split, catalogue, scorer, retriever, k)
    seconds["evaluate (both stages, four systems)"] = time.perf_counter() - t0
    final = stage_recommender(split, catalogue, "all", scorer, retriever, combination)
    final.likes, final.rated = split.histories("all"), split.rated
    final.save(model_dir)
    seconds = {**seconds, **{f"  {name}": t for name, t in result["seconds"].items()},
               "total": time.perf_counter() - started}
    result.update(checkpoint=str(model_dir), base=str(base), tuning=best, seconds=seconds,
                  cpu_threads=os.cpu_count(), notes=_notes(best, max_train))
    report = write_report(result, Path(out) / "eval")
    user = next(u for u in split.users if split.test[u])
    metric = f"ndcg@{k}"
    table = "\n".join(f"  {LABELS[s]:<16} NDCG@{k} {m[metric]:.4f}  Recall@{k} {m[f'recall@{k}']:.4f}  "
                      f"cold Recall@{k} {result['cold'][s][f'recall@{k}']:.4f}" for s, m in result["systems"].items())
    return "\n".join([f"done in {seconds['total'] / 60:.1f} min (scorer tuned in "
                      f"{seconds['fine-tune the language-model scorer'] / 60:.1f} min, validation AUC "
                      f"{best.get('valid/auc', float('nan')):.3f})", table, f"report: {report}", "",
                      final.recommend(user, 5).text(), "",
                      f"Next: palmkit recommend --checkpoint {model_dir} --user {user}",
                      f"      palmkit serve --checkpoint {model_dir}   (POST /v1/recommend)"])


def _notes(best: dict, max_train: int) -> list[str]:
    return [f"What scored what: popularity, the retriever and the language model each scored every unseen item "
            f"of every test user; the language model is a two-tower scorer (item texts encoded once, one "
            f"encoding per user history), tuned on {max_train} (history, candidate) pairs from the training "
            f"likes (validation AUC {best.get('valid/auc', float('nan')):.3f} on held-out pairs)."]


def recommend_command(checkpoint: str, user: str, k: int = 10,
                      system: Literal["combination", "lm", "retriever", "popularity"] = "combination",
                      json_output: bool = False) -> str:
    """A user's top K movies with their scores and the liked movies each one came from.

    An unknown user, or one who has liked nothing, gets the most popular movies, labelled as such.

    Args:
        checkpoint: a recommender folder written by `palmkit recipe recommend` (OUT/model)
        user: the user's id in the data (MovieLens: 1 to 943)
        k: length of the list
        system: rank by the combination, or by one signal alone
        json_output: print the result as one JSON object instead
    """
    result = load_recommender(checkpoint).recommend(user, k, system)
    return json.dumps(result.as_dict(), ensure_ascii=False) if json_output else result.text()
