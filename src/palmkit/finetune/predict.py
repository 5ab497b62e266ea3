"""Using fine-tuned models: `load_classifier(DIR).predict(texts)` and `load_tagger(DIR).tag(texts)`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from palmkit.data.tasks import words_of
from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item, align_words, batches, encode_text, pad
from palmkit.finetune.heads import HEAD_FILE, SequenceClassifier, TokenClassifier
from palmkit.finetune.scores import extract_entities
from palmkit.io import load_tensors
from palmkit.model.checkpoint import load_checkpoint, load_config
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer


@torch.no_grad()
def predict_logits(module: nn.Module, items: Sequence[Item], pad_id: int, batch_size: int = 32,
                   ) -> list[torch.Tensor]:
    """Logits of each item in input order (per text for classifiers, per position for taggers); more than one
    batch shows a progress bar (examples/s) on stderr."""
    out: list[torch.Tensor | None] = [None] * len(items)
    position = {id(it): i for i, it in enumerate(items)}
    device = next(module.parameters()).device
    with tqdm(total=len(items), unit="ex", desc="predict", leave=False, disable=len(items) <= batch_size,
              dynamic_ncols=True) as bar:
        for batch in batches(items, batch_size):
            ids, lengths = pad(batch, pad_id)
            logits = module(ids.to(device), lengths.to(device)).float().cpu()
            for it, row, n in zip(batch, logits, lengths.tolist(), strict=True):
                out[position[id(it)]] = row if row.dim() == 1 else row[:n]
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def word_tags(logits: Sequence[torch.Tensor], items: Sequence[Item], labels: Sequence[str]) -> list[list[str]]:
    """The predicted tag of each word (its first piece's argmax; O for words cut off by truncation)."""
    out = []
    for row, it in zip(logits, items, strict=True):
        best = row.argmax(-1).tolist()
        out.append([labels[best[f]] if f >= 0 else "O" for f in it.words])
    return out


def load_head(path: Path, kind: str, model: PaLM | None, tokenizer: Tokenizer | None,
               device: str) -> tuple[PaLM, Tokenizer, dict, dict]:
    """(model, tokenizer, config, head weights) of a fine-tuned folder of the given kind."""
    config = load_config(path)
    if config.get("task") != kind:
        raise PalmkitError(f"{path} is not a {kind} checkpoint (config.json task: {config.get('task')!r})")
    if model is None or tokenizer is None:
        model, tokenizer, config = load_checkpoint(path, device)
    head = load_tensors(path / HEAD_FILE)
    return model, tokenizer, config, head


class Classifier:
    """A fine-tuned text classifier: `predict(texts)` -> [(label, {label: probability})]."""

    def __init__(self, module: SequenceClassifier, tokenizer: Tokenizer, labels: list[str], max_len: int):
        self.module, self.tokenizer, self.labels, self.max_len = module.eval(), tokenizer, labels, max_len

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (N, n_labels), columns in the order of `labels`."""
        items = [Item(encode_text(self.tokenizer, t, self.max_len)) for t in texts]
        if not items:
            return torch.empty(0, len(self.labels))
        return torch.stack(predict_logits(self.module, items, self.tokenizer.pad_id, batch_size)).softmax(-1)

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, dict[str, float]]]:
        """The most probable label of each text and the probability of every label."""
        probs = self.predict_proba(texts, batch_size)
        return [(self.labels[int(row.argmax())], {lab: float(p) for lab, p in zip(self.labels, row, strict=True)})
                for row in probs]


def load_classifier(path: str | Path, device: str = "cpu", model: PaLM | None = None,
                    tokenizer: Tokenizer | None = None) -> Classifier:
    """A Classifier from a `finetune classify` folder. A server that already holds the folder's model passes
    it (and its tokenizer) to share the weights; the head is small and loaded here."""
    path = Path(path)
    model, tokenizer, config, head = load_head(path, "classify", model, tokenizer, device)
    module = SequenceClassifier(model, len(config["labels"]), config.get("pooling", "last"), 0.0)
    module.head.load_state_dict(head)
    module.head.to(model.embed_tokens.weight.device)
    return Classifier(module, tokenizer, list(config["labels"]), int(config.get("max_len", model.config.max_seq_len)))


class Tagger:
    """A fine-tuned BIO tagger: `tag(texts)` -> entities with character offsets."""

    def __init__(self, module: TokenClassifier, tokenizer: Tokenizer, labels: list[str], max_len: int,
                 char_level: bool, echo: bool):
        self.module, self.tokenizer, self.labels = module.eval(), tokenizer, labels
        self.max_len, self.char_level, self.echo = max_len, char_level, echo

    def tag_words(self, sentences: Sequence[Sequence[str]], batch_size: int = 32) -> list[list[str]]:
        """The tag of each word of pre-split sentences."""
        items = [align_words(self.tokenizer, s, None, self.max_len, self.char_level, self.echo) for s in sentences]
        if not items:
            return []
        logits = predict_logits(self.module, items, self.tokenizer.pad_id, batch_size)
        return word_tags(logits, items, self.labels)

    def tag(self, texts: Sequence[str]) -> list[list[dict]]:
        """Entities of raw texts: [{"text", "type", "start", "end"}] with character offsets into the text."""
        split = [words_of(t, self.char_level) for t in texts]
        tags = self.tag_words([[w for w, _ in ws] for ws in split])
        out = []
        for text, ws, ts in zip(texts, split, tags, strict=True):
            ents = []
            for etype, first, last in extract_entities(ts):
                start, end = ws[first][1], ws[last][1] + len(ws[last][0])
                ents.append({"text": text[start:end], "type": etype, "start": start, "end": end})
            out.append(ents)
        return out


def load_tagger(path: str | Path, device: str = "cpu") -> Tagger:
    """A Tagger from a `finetune ner` folder."""
    path = Path(path)
    model, tokenizer, config, head = load_head(path, "ner", None, None, device)
    module = TokenClassifier(model, len(config["labels"]), 0.0)
    module.head.load_state_dict(head)
    module.head.to(model.embed_tokens.weight.device)
    return Tagger(module, tokenizer, list(config["labels"]), int(config.get("max_len", model.config.max_seq_len)),
                  bool(config.get("char_level")), config.get("context") == "echo")
