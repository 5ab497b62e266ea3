"""Task heads: the sequence classifier's pooling ignores right padding."""

import pytest
import torch

from palmkit.finetune.encode import Item, pad
from palmkit.finetune.heads import SequenceClassifier
from tests.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_pooling_ignores_right_padding(tokenizer):
    model = random_model(tokenizer.vocab_size)
    short, long = [*tokenizer.encode("The fox"), 2], [*tokenizer.encode("A language model predicts the next token"), 2]
    ids, lengths = pad([Item(short), Item(long)], tokenizer.pad_id)
    for pooling in ("last", "mean"):
        module = SequenceClassifier(model, 3, pooling).eval()
        batch = module(ids, lengths)
        alone = torch.cat([module(torch.tensor([x]), torch.tensor([len(x)])) for x in (short, long)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        h = model.hidden_states(torch.tensor([short]))[0]
        pooled = h[-1] if pooling == "last" else h.mean(0)
        torch.testing.assert_close(batch[0], module.head(pooled), atol=1e-5, rtol=1e-5)
