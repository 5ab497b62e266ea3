"""Turning examples into token ids: texts, word-aligned tags, chat turns with their loss mask; batching."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from palmkit.model.chat_template import END, chat_pieces, chat_template
from palmkit.model.tokenizer import Tokenizer


@dataclass
class Item:
    """One encoded example: token ids and a target (a class index, or one label per position)."""

    ids: list[int]
    target: int | list[int] | None = None
    words: list[int] = field(default_factory=list)  # NER: position of each word's first piece, -1 if cut off


def encode_text(tokenizer: Tokenizer, text: str, max_len: int) -> list[int]:
    """Ids of a text to classify: truncated, then EOS, whose state sums up the text for last-token pooling."""
    return [*tokenizer.encode(text)[:max_len - 1], tokenizer.eos_id]


def align_words(tokenizer: Tokenizer, words: Sequence[str], tags: Sequence[int] | None, max_len: int,
                char_level: bool = False, echo: bool = False) -> Item:
    """Pieces of a pre-split sentence with the tag on each word's first piece and -100 on the rest.

    Words are encoded one by one (with the space that precedes them in running text, except for
    characters of Chinese or Japanese, which have none), so a piece never spans two words. echo: the
    sentence is given twice and tagged on the second copy, whose every token has read the whole sentence
    once (a causal model otherwise tags a word without seeing what follows it; Springer et al. 2024).
    """
    ids: list[int] = []
    labels: list[int] = []
    firsts: list[int] = []
    budget = max_len // 2 if echo else max_len
    for i, word in enumerate(words):
        pieces = tokenizer.encode(word if char_level or i == 0 else " " + word) or [tokenizer.sp.unk_id()]
        if len(ids) + len(pieces) > budget:
            firsts += [-1] * (len(words) - i)  # truncated: these words are predicted O
            break
        firsts.append(len(ids))
        labels += [tags[i] if tags is not None else -100] + [-100] * (len(pieces) - 1)
        ids += pieces
    if not ids:  # an empty text (or a first word longer than the context) still makes a valid input
        ids, labels = [tokenizer.eos_id], [-100]
    if echo:
        firsts = [f + len(ids) if f >= 0 else -1 for f in firsts]
        ids, labels = ids + ids, [-100] * len(ids) + labels
    return Item(ids, labels, firsts)


def chat_item(tokenizer: Tokenizer, messages: list[dict], max_len: int, template: str | None = None) -> Item:
    """Ids of a conversation in the chat template (`encode_chat`'s, so content is plain text) with targets on
    exactly the assistant replies and their `<|end|>` (every other position is -100)."""
    ids, mask = [tokenizer.bos_id] * tokenizer.add_bos, [False] * tokenizer.add_bos
    after_reply = False
    for text, index in chat_pieces(messages, add_generation_prompt=False, template=chat_template(template)):
        if index is not None:
            reply = messages[index]["role"] == "assistant"
            parts = [(tokenizer.encode_plain(text), reply)]
        else:
            cut = text.index(END) + len(END) if after_reply and END in text else 0  # the reply's end is learnt
            parts = [(tokenizer.encode(text[:cut]) if cut else [], True), (tokenizer.encode(text[cut:]), False)]
            reply = False
        for piece_ids, trained in parts:
            ids += piece_ids
            mask += [trained] * len(piece_ids)
        after_reply = reply
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    # position t predicts token t+1: a target is kept where the predicted token is the assistant's
    targets = [tok if m else -100 for tok, m in zip(ids[1:], mask[1:], strict=True)]
    return Item(ids[:-1], targets)


def chat_items(tokenizer: Tokenizer, conversations: Sequence[list[dict]], max_len: int,
               template: str | None = None) -> list[Item]:
    """`chat_item` of each conversation, less those cut before any reply: they have nothing to learn or score."""
    items = [chat_item(tokenizer, c, max_len, template) for c in conversations]
    return [it for it in items if any(t != -100 for t in it.target)]


def collate(items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded, lengths (B,), targets (B,) or (B, T) padded with -100)."""
    ids, lengths = pad(items, pad_id)
    if isinstance(items[0].target, int):
        return ids, lengths, torch.tensor([it.target for it in items])
    targets = torch.full(ids.shape, -100, dtype=torch.long)
    for i, it in enumerate(items):
        targets[i, : len(it.target)] = torch.tensor(it.target)
    return ids, lengths, targets


def pad(items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, lengths (B,))."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids)
    return ids, torch.tensor([len(it.ids) for it in items])


def batches(items: Sequence[Item], batch_size: int, shuffle: bool = False, seed: int = 0):
    """Lists of items; without shuffling they go by length so that little is padded."""
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: len(items[i].ids))
    for i in range(0, len(order), batch_size):
        yield [items[j] for j in order[i:i + batch_size]]


def lm_batches(items: Sequence[Item], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, targets) of items with a target per position (chat), by length: what `mean_lm_loss` scores."""
    for batch in batches(items, batch_size):
        ids, _, targets = collate(batch, pad_id)
        yield ids, targets
